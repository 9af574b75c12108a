"""Training throughput of our trainer against Hugging Face transformers on torch, same run.

The shape of configs/medium.py (8 layers, d=512, 8 heads over 2 KV heads, ffn 1536, vocab 8192,
seq 512, global batch 8: 32M parameters), AdamW with clipping, on one device: full fine-tuning
and LoRA r=16 on every linear layer, in float32 and in bfloat16 (torch: autocast). Ours is the
step `trainer.train.plan` builds from the config, exactly what `trainer.main` runs; the peer is
`LlamaForCausalLM` (sdpa attention) and, for LoRA, HF PEFT's `get_peft_model`. Each side runs
in a process of its own (`--same_process`: both in this one) and they alternate in rounds, so a
noisy shared machine affects them alike; the figure that matters is the ratio ours / peer (and it
differs by host: the JSON records the CPU model and its ISA flags, benchmarks/host.py). Each
round gives each side one untimed step before its timed ones (`--warm_steps`), so that the
figures are the steady state of a training run, not the first step after a pause (which costs
ours more on the Firecracker VMs we test on: BENCHMARKS.md, "after a pause"). Like
`trainer.main`, the script first restarts itself with glibc's huge pages for malloc
(trainer/hugepages.py); ours has them, the peer's process does not (they slow torch here), unless
`--same_process`. Also prints the machine's measured f32 matmul peak and our MFU against it (the
README's FLOP formula).

python benchmarks/train_throughput.py [--rounds 3 --steps 2 --warm_steps 1
    --dtypes float32,bfloat16 --methods full,lora --out FILE.json --plot FILE.png
    --remat POLICY --same_process]
    (the plot needs matplotlib:
    pip install -e '.[bench]')
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parallel  # noqa: E402
from benchmarks.host import host_info  # noqa: E402
from configs import medium  # noqa: E402
from models.kernels import matmul as matmul_lib  # noqa: E402
from trainer import hugepages, metrics as metrics_lib, train  # noqa: E402
from trainer.validate import model_config  # noqa: E402

LORA_RANK = 16


def config(dtype: str, method: str):
  cfg = medium.get_config()
  cfg.precision.compute_dtype = dtype
  cfg.mesh.update(data=1)
  cfg.train.update(lr=1e-4, warmup_steps=0, lr_schedule="constant")
  if method == "lora":
    cfg.peft.update(method="lora", rank=LORA_RANK, alpha=2.0 * LORA_RANK, targets="all-linear")
  return cfg


def tokens(cfg, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1),
                      dtype=np.int32)


def ours(dtype: str, method: str, remat: str = ""):
  """`remat`: instead of the config's model.remat."""
  cfg = config(dtype, method)
  if remat:
    cfg.model.remat = remat
  return compiled_step(cfg)


def compiled_step(cfg):
  """(run(n) -> loss after n more steps, compile seconds) for the train step `train.plan` builds
  from `cfg` on one device, as `trainer.main` runs it, fed one fixed batch of random tokens.
  The step is compiled alone (AOT) and run once before returning. benchmarks/device_check.py
  times its accelerator train steps with this too."""
  tc = cfg.train
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1), jax.devices()[:1])
  pl = train.plan(cfg, model_config(cfg, cfg.model.vocab_size), mesh)
  holder = {"state": pl.init_state(tc.seed)}
  toks = tokens(cfg)
  b, s = tc.batch_size, tc.seq_len
  batch = train.to_global({
      "inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((b, s), np.float32),
      "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
      "segment_ids": np.ones((b, s), np.int32)}, pl.batch_sharding)

  with parallel.activate(mesh, pl.rules):  # compile alone (AOT), without running a step
    t = time.perf_counter()
    compiled = pl.train_step.lower(holder["state"], batch).compile()
    compile_s = time.perf_counter() - t

  def step():
    holder["state"], m = compiled(holder["state"], batch)
    return m
  jax.block_until_ready(step())

  def run(n):
    for _ in range(n):
      m = step()
    return float(jax.device_get(m)["loss"])
  return run, compile_s


def hf_llama(cfg):
  """transformers' LlamaForCausalLM (sdpa attention) of the config's shape, on all host cores."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  m = cfg.model
  torch.manual_seed(0)
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  hf = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
                   num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                   num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
                   rope_theta=m.rope_theta, tie_word_embeddings=False)
  hf._attn_implementation = "sdpa"
  return LlamaForCausalLM(hf)


def peer(dtype: str, method: str):
  import torch

  cfg = config(dtype, method)
  model = hf_llama(cfg)
  if method == "lora":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                             target_modules="all-linear", lora_dropout=0.0))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  toks = torch.from_numpy(tokens(cfg).astype(np.int64))
  inputs, labels = toks[:, :-1], toks[:, 1:]

  def one():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  return runner(one)


def runner(one):
  """(run(n): n more steps of `one`, returning the last loss; the first step's seconds), after
  taking that first step (the peer's warm-up)."""
  t = time.perf_counter()
  one()
  first_s = time.perf_counter() - t

  def run(n):
    for _ in range(n):
      loss = one()
    return loss
  return run, first_s


def _build(side: str, dtype: str, method: str, remat: str):
  return ours(dtype, method, remat) if side == "ours" else peer(dtype, method)


def _timed(run, n: int, warm: int) -> float:
  """Seconds for `n` steps, after `warm` untimed ones."""
  if warm:
    run(warm)
  t = time.perf_counter()
  run(n)
  return time.perf_counter() - t


def _serve(side: str, dtype: str, method: str, remat: str, conn) -> None:
  """A worker process's loop: build one side's step, then time steps per (n, warm) request."""
  run, setup_s = _build(side, dtype, method, remat)
  conn.send(setup_s)
  while (request := conn.recv()) is not None:
    conn.send(_timed(run, *request))


def peer_tunables() -> str:
  """GLIBC_TUNABLES for the peer's process: this one's, less the huge pages `hugepages.reexec()`
  asks for, so that transformers runs as its users run it (huge pages slow it: BENCHMARKS.md)."""
  return hugepages.without_tunable(os.environ.get("GLIBC_TUNABLES", ""))


class Runner:
  """One side of the comparison, in a process of its own (default) or in this one. Separate
  processes are what users run, and keep each framework's threads and allocator state out of the
  other's way (both ways measured the same ratios on 2026-12-01: BENCHMARKS.md). Ours inherits
  this process's environment, as `trainer.main` runs; the peer's has `peer_tunables()`."""

  def __init__(self, side: str, dtype: str, method: str, remat: str, same_process: bool):
    if same_process:
      self._run, self.setup_s = _build(side, dtype, method, remat)
      self._conn = None
      return
    ctx = multiprocessing.get_context("spawn")  # a child starts with this os.environ
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(target=_serve, args=(side, dtype, method, remat, child),
                             daemon=True)
    saved = os.environ.get("GLIBC_TUNABLES")
    if side == "peer":
      os.environ["GLIBC_TUNABLES"] = peer_tunables()
    try:
      self._proc.start()
    finally:
      if saved is None:
        os.environ.pop("GLIBC_TUNABLES", None)
      else:
        os.environ["GLIBC_TUNABLES"] = saved
    self.setup_s = self._conn.recv()

  def time(self, n: int, warm: int = 0) -> float:
    """Seconds for n steps, after `warm` untimed ones."""
    if self._conn is None:
      return _timed(self._run, n, warm)
    self._conn.send((n, warm))
    return self._conn.recv()

  def close(self) -> None:
    if self._conn is not None:
      self._conn.send(None)
      self._proc.join()


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(results["runs"])
  x = np.arange(len(names))
  ours_tps = [results["runs"][n]["ours_tokens_per_sec"] for n in names]
  peer_tps = [results["runs"][n]["peer_tokens_per_sec"] for n in names]
  fig, ax = plt.subplots(figsize=(7, 3.6))
  ax.bar(x - 0.2, ours_tps, 0.4, label="ours (JAX, XLA:CPU)")
  ax.bar(x + 0.2, peer_tps, 0.4, label="transformers / PEFT (torch CPU)")
  for i, n in enumerate(names):
    ax.text(i, max(ours_tps[i], peer_tps[i]) * 1.02, f"{results['runs'][n]['ratio']:.2f}x",
            ha="center")
  ax.set_xticks(x, names)
  ax.set_ylabel("tokens / s")
  ax.set_title(f"32M Llama, batch 8 x 512, {results['cpus']} cores of "
               f"{results['host']['cpu_model']}: ours / peer")
  ax.set_ylim(0, max(ours_tps + peer_tps) * 1.15)
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--warm_steps", type=int, default=1,
                  help="untimed steps per side at the start of each round (0: time the first "
                       "step after the other side's turn too)")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--methods", default="full,lora")
  ap.add_argument("--out", default="")
  ap.add_argument("--plot", default="")
  ap.add_argument("--remat", default="", help="our model.remat instead of the config's")
  ap.add_argument("--same_process", action="store_true",
                  help="run ours and the peer in this one process instead of one each")
  args = ap.parse_args()

  cfg = medium.get_config()
  peak = metrics_lib.measured_matmul_flops()
  flops_per_token = model_config(cfg, cfg.model.vocab_size).flops_per_token(cfg.train.seq_len)
  step_tokens = cfg.train.batch_size * cfg.train.seq_len
  host = host_info()  # ratios differ by host: CPU model and ISA (AVX-512, AMX) go with them
  results = {"config": "configs/medium.py", "lora_rank": LORA_RANK, "host": host,
             "machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
             "jax": jax.__version__, "measured_matmul_tflops": peak / 1e12,
             "flops_per_token": flops_per_token, "remat": args.remat or cfg.model.remat,
             "processes": "one" if args.same_process else "one per side",
             "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
             "peer_glibc_tunables": (os.environ.get("GLIBC_TUNABLES", "") if args.same_process
                                     else peer_tunables()),
             "timed_steps_per_round": args.steps, "warm_steps_per_round": args.warm_steps,
             # models/kernels/matmul.py's bf16 forms: "1" / "0" forced, "" decided by the host
             "matmul_forms_env": os.environ.get(matmul_lib.ENV, ""),
             "runs": {}}
  print(f"host: {host['cpu_model']} ({host['isa_summary']}), {results['cpus']} usable cores",
        flush=True)
  print(f"measured f32 matmul peak: {peak / 1e12:.3f} TFLOP/s; {flops_per_token / 1e6:.1f} "
        "MFLOPs per token", flush=True)
  for method in args.methods.split(","):
    for dtype in args.dtypes.split(","):
      runners = {side: Runner(side, dtype, method, args.remat, args.same_process)
                 for side in ("ours", "peer")}
      times = {k: [] for k in runners}
      for _ in range(args.rounds):
        for name, runner in runners.items():
          times[name].append(runner.time(args.steps, args.warm_steps) / args.steps)
      for runner in runners.values():
        runner.close()
      tps = {k: step_tokens / statistics.median(v) for k, v in times.items()}
      entry = {"ours_tokens_per_sec": tps["ours"], "peer_tokens_per_sec": tps["peer"],
               "ratio": tps["ours"] / tps["peer"], "ours_compile_s": runners["ours"].setup_s,
               "peer_first_step_s": runners["peer"].setup_s,
               "ours_mfu": tps["ours"] * flops_per_token / peak,
               "peer_mfu": tps["peer"] * flops_per_token / peak}
      name = f"{method} {dtype}"
      results["runs"][name] = entry
      print(f"{name}: ours {tps['ours']:.0f} tok/s, peer {tps['peer']:.0f} tok/s, ratio "
            f"{entry['ratio']:.2f}; our compile {entry['ours_compile_s']:.1f} s; "
            f"MFU ours {entry['ours_mfu']:.1%}, peer {entry['peer_mfu']:.1%}", flush=True)
      del runners
      if args.out:  # after every case: a long run stopped early keeps what it measured
        with open(args.out, "w") as f:
          json.dump(results, f, indent=2)
      if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
  hugepages.reexec()  # as trainer.main does; both sides' processes inherit it
  main()
