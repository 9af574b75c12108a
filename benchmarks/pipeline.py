"""Pipeline schedules (parallel/pipeline.py): memory per stage, bubble and step time against the
number of microbatches.

For gpipe, circular (2 chunks per stage) and 1f1b on 4 stages, with microbatches of a fixed
size (the batch grows with their number, as when one raises grad accumulation):
- the compiler's peak memory per device (`memory_analysis()`: arguments + temporaries) of the
  train step, beside the estimator's figure (trainer/memory.py);
- the table's predicted bubble, its slots and the chunk inputs a stage holds;
- step time (median of `--steps` timed steps after a warm-up one), and the unpipelined step on
  the same 4 devices (data parallel, the batch accumulated over the same microbatches) as the
  peer, in the same process.

Simulated CPU devices share the host's cores: an idle stage frees its core for another, so the
bubble does not show as time here the way it does on accelerators; what shows is the
executor's overhead (slots, recomputed forwards, messages).

XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/pipeline.py \
    [--micro 4,8,16] [--steps 3] [--out benchmarks/results/pipeline.json] [--plot FILE.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import parallel  # noqa: E402
from benchmarks.host import host_info  # noqa: E402
from parallel import pipeline as pipeline_lib  # noqa: E402
from trainer import memory, train  # noqa: E402
from trainer.validate import model_config, pipeline_of  # noqa: E402

STAGES = 4
MICRO_ROWS = 2  # sequences per microbatch
SCHEDULES = {"gpipe": {}, "circular": dict(pipeline_repeats=2), "1f1b": {}}


def config(schedule: str | None, micro: int):
  from configs import tiny
  c = tiny.get_config()
  c.model.update(vocab_size=2048, n_layers=8, remat="none")
  c.train.update(batch_size=MICRO_ROWS * micro, seq_len=256)
  if schedule is None:  # the peer: data parallel over the 4 devices, accumulating
    c.mesh.update(data=STAGES)
    c.train.grad_accum = micro // STAGES if micro >= STAGES else 1
  else:
    c.mesh.update(stage=STAGES, data=1, pipeline_schedule=schedule, microbatches=micro,
                  **SCHEDULES[schedule])
  return c


def measure(cfg, steps: int) -> dict:
  mcfg = model_config(cfg, cfg.model.vocab_size)
  sizes = {a: 1 for a in parallel.AXES} | {a: cfg.mesh[a] for a in ("stage", "data")}
  mesh = parallel.make_mesh(sizes, jax.devices()[:STAGES])
  pl = train.plan(cfg, mcfg, mesh)
  tc = cfg.train
  rng = np.random.default_rng(0)
  toks = rng.integers(0, mcfg.vocab_size, (tc.batch_size, tc.seq_len + 1), dtype=np.int32)
  b, s = tc.batch_size, tc.seq_len
  batch = train.to_global({
      "inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((b, s), np.float32),
      "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
      "segment_ids": np.ones((b, s), np.int32)}, pl.batch_sharding)
  state = pl.init_state(0)
  with parallel.activate(mesh, pl.rules):
    compiled = pl.train_step.lower(state, batch).compile()
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
           - m.alias_size_in_bytes)
  comp, _ = memory.components(cfg, pl, mcfg, sizes, train.abstract_batch(cfg, pl.batch_sharding, pl.objective))
  state, out = compiled(state, batch)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, out = compiled(state, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  row = {"compiled_bytes": total, "temp_bytes": m.temp_size_in_bytes,
         "estimate_bytes": memory.total_bytes(comp), "step_s": statistics.median(times),
         "step_times": times, "loss": float(out["loss"])}
  p = pipeline_of(cfg, sizes["stage"])
  if p is not None:
    table = pipeline_lib.build_table(p)
    row.update(slots=table.slots, bubble=table.bubble(), inputs_held=table.inputs)
  return row


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--micro", default="4,8,16")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--out", default="")
  ap.add_argument("--plot", default="")
  args = ap.parse_args()
  if jax.device_count() < STAGES:
    sys.exit(f"needs {STAGES} devices: XLA_FLAGS=--xla_force_host_platform_device_count="
             f"{STAGES}")
  rows = []
  for micro in map(int, args.micro.split(",")):
    peer = measure(config(None, micro), args.steps)
    print(f"microbatches {micro}: unpipelined {peer['compiled_bytes'] / 2**20:.1f} MiB, "
          f"{peer['step_s']:.3f} s", flush=True)
    for schedule in SCHEDULES:
      r = measure(config(schedule, micro), args.steps)
      r.update(schedule=schedule, microbatches=micro, peer_step_s=peer["step_s"],
               peer_compiled_bytes=peer["compiled_bytes"], peer_loss=peer["loss"])
      rows.append(r)
      print(f"  {schedule:8s} compiled {r['compiled_bytes'] / 2**20:7.1f} MiB (estimate "
            f"{r['estimate_bytes'] / 2**20:.1f}), inputs held {r['inputs_held']}, slots "
            f"{r['slots']}, bubble {r['bubble']:.3f}, step {r['step_s']:.3f} s "
            f"({r['step_s'] / peer['step_s']:.2f}x unpipelined), loss {r['loss']:.4f} vs "
            f"{peer['loss']:.4f}", flush=True)
  result = {"host": host_info(), "stages": STAGES, "micro_rows": MICRO_ROWS, "rows": rows,
            "command": "XLA_FLAGS=--xla_force_host_platform_device_count=4 python "
                       "benchmarks/pipeline.py " + " ".join(sys.argv[1:])}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  if args.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for schedule in SCHEDULES:
      rs = [r for r in rows if r["schedule"] == schedule]
      ms = [r["microbatches"] for r in rs]
      a.plot(ms, [r["compiled_bytes"] / 2**20 for r in rs], "o-", label=schedule)
      b.plot(ms, [r["bubble"] for r in rs], "o-", label=schedule)
    a.set(xlabel="microbatches (2 sequences each)", ylabel="compiled MiB per device",
          title=f"peak memory per stage, {STAGES} stages")
    b.set(xlabel="microbatches", ylabel="predicted bubble", title="bubble (slot tables)")
    for ax in (a, b):
      ax.set_xscale("log", base=2)
      ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
  main()
