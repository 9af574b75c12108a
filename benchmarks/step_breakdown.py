"""Where the medium config's step (float32 or bfloat16) spends its time, ours against torch, same process.

Splits one full fine-tuning step of benchmarks/train_throughput.py's shape into forward alone and
forward + backward, for the decoder stack alone (sum of the final hidden states) and for the
whole loss (logits and cross-entropy too), for ours (the trainer's loss function, jitted with
the trainer's compiler options) and for transformers' LlamaForCausalLM. Backward = the
difference. Then profiles our stack's forward + backward once and sums the XLA:CPU thunks by
kind (library matmuls show as `ynn_fusion`), which says how much of the step is matmul.

python benchmarks/step_breakdown.py [--layers 8 --rounds 3 --dtype float32 --no-profile]

--dtype bfloat16: ours computes in bfloat16 (the trainer's mixed precision: float32 weights cast
per step), torch runs under `torch.autocast("cpu", dtype=torch.bfloat16)`, as
benchmarks/train_throughput.py's bfloat16 case does.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time

if "--no-profile" not in sys.argv:  # per-thunk events in the profile; must precede jax's import
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import parallel  # noqa: E402
import train_throughput as tt  # noqa: E402
from trainer import hugepages, step as step_lib, train  # noqa: E402
from trainer.validate import model_config  # noqa: E402


def ours(cfg):
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                            jax.devices()[:1])
  pl = train.plan(cfg, model_config(cfg, cfg.model.vocab_size), mesh)
  params = pl.init_state(0)["params"]
  toks = tt.tokens(cfg)
  b, s = toks.shape[0], toks.shape[1] - 1
  batch = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
           "weights": jnp.ones((b, s)), "segment_ids": jnp.ones((b, s), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))}
  dtype = jnp.dtype(cfg.precision.compute_dtype)
  loss_fn = step_lib.make_loss_fn(pl.handle, dtype)

  def loss(p, batch):
    total, count, _ = loss_fn(p, batch)
    return total / count

  def stack(p, batch):
    model = pl.handle.bind(jax.tree.map(lambda w: w.astype(dtype), p))
    return jnp.sum(model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"]))

  compiled = {}
  with parallel.activate(mesh, pl.rules):
    for name, fn in (("stack", stack), ("loss", loss)):
      for part, f in (("fwd", fn), ("fwd+bwd", jax.value_and_grad(fn))):
        compiled[f"{name} {part}"] = jax.jit(f).lower(params, batch).compile(
            train.compiler_options(mesh))
  return {k: (lambda c=c: jax.block_until_ready(c(params, batch))) for k, c in compiled.items()}


def peer(cfg):
  import torch

  autocast = cfg.precision.compute_dtype == "bfloat16"
  model = tt.hf_llama(cfg).train()
  toks = torch.from_numpy(tt.tokens(cfg).astype(np.int64))
  inputs, labels = toks[:, :-1], toks[:, 1:]

  def stack():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      return model.model(input_ids=inputs).last_hidden_state.float().sum()

  def loss():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      logits = model(input_ids=inputs).logits
      return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                               labels.reshape(-1))

  def forward(fn):
    def run():
      with torch.no_grad():
        fn()
    return run

  def backward(fn):
    def run():
      fn().backward()
      model.zero_grad(set_to_none=True)
    return run
  return {"stack fwd": forward(stack), "stack fwd+bwd": backward(stack),
          "loss fwd": forward(loss), "loss fwd+bwd": backward(loss)}


def profile(run, rounds: int = 2) -> collections.Counter:
  """Milliseconds per step by XLA:CPU thunk kind (the name before its first dot)."""
  run()
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(rounds):
      run()
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  kinds = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):  # the threads that run the thunks
        continue
      for ev in line.events:
        if not ev.name.startswith(("ThunkExecutor", "while")):  # containers, not work
          kinds[ev.name.split(".")[0]] += ev.duration_ns / 1e6 / rounds
  return kinds


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--no-profile", action="store_true")
  args = ap.parse_args()
  cfg = tt.config(args.dtype, "full")
  cfg.model.n_layers = args.layers
  runs = {"ours": ours(cfg), "torch": peer(cfg)}
  times = collections.defaultdict(list)
  for who in runs:
    for fn in runs[who].values():
      fn()  # warm up
  for _ in range(args.rounds):  # alternate, so that the host's noise hits both alike
    for who, fns in runs.items():
      for part, fn in fns.items():
        t = time.perf_counter()
        fn()
        times[who, part].append(time.perf_counter() - t)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(f"{args.layers} layers, {args.dtype}, median of {args.rounds} rounds (s)")
  print(f"{'':16}{'ours':>8}{'torch':>8}{'ours/torch':>12}")
  for name in ("stack", "loss"):
    for part in ("fwd", "bwd", "fwd+bwd"):
      get = (lambda w: med[w, f"{name} fwd+bwd"] - med[w, f"{name} fwd"]) if part == "bwd" else (
          lambda w: med[w, f"{name} {part}"])
      o, p = get("ours"), get("torch")
      print(f"{name + ' ' + part:16}{o:8.2f}{p:8.2f}{o / p:12.2f}")
  if not args.no_profile:
    kinds = profile(runs["ours"]["stack fwd+bwd"])
    total = sum(kinds.values())
    print(f"ours, stack fwd+bwd by XLA:CPU thunk kind (thread time, {total:.0f} ms in all):")
    for kind, ms in kinds.most_common(8):
      print(f"  {kind:40}{ms:8.0f} ms {100 * ms / total:5.1f}%")


if __name__ == "__main__":
  hugepages.reexec()  # as trainer.main does
  main()
