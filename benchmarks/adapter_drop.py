"""AdapterDrop's speed-up (issue 29): the train step and the forward pass of Houlsby adapters on
every layer against adapters only above the lowest n layers (`peft.adapter_drop`).

Shape: configs/medium.py's model (8 layers, d=512, 8 heads / 2 KV heads, ffn 1536, vocab 8192),
float32, adapters of bottleneck 64 on both sublayers, batch --batch x --seq random tokens, one
CPU device. The train step is the one `trainer.main` runs (train.plan, AdamW on the adapters);
the forward pass is the model's logits (what evaluation and a prefill run). Every variant is
compiled first, then they run in turns, --rounds rounds of --steps steps each (the order
rotating), and each variant's median round time is divided by that of n = 0 in the same process.

python benchmarks/adapter_drop.py --drops=0,2,4,6 --rounds=5 --steps=5
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import parallel  # noqa: E402
import train_throughput as tt  # noqa: E402
from benchmarks import host  # noqa: E402
from configs import medium  # noqa: E402
from trainer import train  # noqa: E402
from trainer.validate import model_config  # noqa: E402

_DROPS = flags.DEFINE_list("drops", ["0", "2", "4", "6"], "values of peft.adapter_drop")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "rounds of every variant, in turns")
_STEPS = flags.DEFINE_integer("steps", 5, "train steps (and forward passes) per round")
_BATCH = flags.DEFINE_integer("batch", 4, "sequences per step")
_SEQ = flags.DEFINE_integer("seq", 256, "tokens per sequence")
_OUT = flags.DEFINE_string("out", "benchmarks/results/adapter_drop.json", "the JSON")


def config(drop: int):
  c = medium.get_config()
  c.train.update(batch_size=_BATCH.value, seq_len=_SEQ.value)
  c.peft.update(method="adapter", adapter_dim=64, adapter_drop=drop)
  return c


def forward(cfg):
  """run(n): n forward passes (the logits of one batch) of the model `train.plan` builds."""
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                            jax.devices()[:1])
  pl = train.plan(cfg, model_config(cfg, cfg.model.vocab_size), mesh)
  params = pl.init_state(0)["params"]
  toks = jnp.asarray(tt.tokens(cfg)[:, :-1])
  with parallel.activate(mesh, pl.rules):
    fn = jax.jit(lambda p, t: jnp.sum(pl.handle.bind(p)(t))).lower(params, toks).compile()
  jax.block_until_ready(fn(params, toks))

  def run(n):
    for _ in range(n):
      out = fn(params, toks)
    return float(out)
  return run


def main(argv):
  del argv
  drops = [int(d) for d in _DROPS.value]
  runs = {}
  for d in drops:
    runs[("train", d)] = tt.compiled_step(config(d))[0]
    runs[("forward", d)] = forward(config(d))
  times = {k: [] for k in runs}
  keys = list(runs)
  for r in range(_ROUNDS.value):
    for k in keys[r % len(keys):] + keys[:r % len(keys)]:
      t = time.perf_counter()
      runs[k](_STEPS.value)
      times[k].append((time.perf_counter() - t) / _STEPS.value)
  median = {k: statistics.median(v) for k, v in times.items()}
  print(f"Houlsby adapters (bottleneck 64) on configs/medium.py's model, batch {_BATCH.value} x "
        f"{_SEQ.value}; time relative to adapters on all 8 layers\n")
  print("| peft.adapter_drop | train step | forward pass |")
  print("| --- | --- | --- |")
  for d in drops:
    print(f"| {d} | {median[('train', d)] / median[('train', drops[0])]:.2f} | "
          f"{median[('forward', d)] / median[('forward', drops[0])]:.2f} |")
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"host": host.host_info(), "batch": _BATCH.value, "seq": _SEQ.value,
               "rounds": _ROUNDS.value, "steps": _STEPS.value,
               "seconds": {f"{k} drop={d}": v for (k, d), v in times.items()}}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
