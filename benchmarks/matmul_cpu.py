"""The three products of a matmul's forward and backward pass on this CPU: as JAX writes them by
default, as models/kernels/matmul.py writes them, and torch's, in GFLOP/s, same process.

For each dtype (float32, bfloat16) and each shape (m, k, n) of the medium config's projections:
  forward   y = x @ w         jnp: x @ w                 ours: mm(x, w)
  input     dx = dy @ w^T     jnp: dy @ w.T              ours: mm_nt(dy, w)
  weight    dw = x^T @ dy     jnp: x.T @ dy              ours: mm_tn(x, dy, float32)
each jitted alone, timed over `--iters` calls, median of `--rounds`; torch runs the same
products on tensors of the same dtype. Shows where XLA:CPU's library (YNNPACK) takes bf16
(AMX / AVX512-BF16) and where it falls back to float32 code.

python benchmarks/matmul_cpu.py [--rounds 3 --iters 10 --out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host import describe, host_info  # noqa: E402
from models.kernels.matmul import mm, mm_nt, mm_tn  # noqa: E402

SHAPES = [(4096, 512, 1536), (4096, 1536, 512), (4096, 512, 512), (4096, 512, 8192)]
PRODUCTS = {
    "forward": (lambda x, w, dy: x @ w, lambda x, w, dy: mm(x, w)),
    "input": (lambda x, w, dy: dy @ w.T, lambda x, w, dy: mm_nt(dy, w)),
    "weight": (lambda x, w, dy: x.T @ dy, lambda x, w, dy: mm_tn(x, dy, jnp.float32)),
}


def _seconds(fn, iters: int) -> float:
  jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / iters


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  host = host_info()
  print(describe(host), flush=True)
  rng = np.random.default_rng(0)
  rows = []
  for dtype in ("float32", "bfloat16"):
    tdt = getattr(torch, dtype)
    for m, k, n in SHAPES:
      x, w, dy = (rng.standard_normal(s, np.float32) for s in ((m, k), (k, n), (m, n)))
      jx, jw, jdy = (jnp.asarray(a, dtype) for a in (x, w, dy))
      tx, tw, tdy = (torch.from_numpy(a).to(tdt) for a in (x, w, dy))
      torch_fns = {"forward": lambda: tx @ tw, "input": lambda: tdy @ tw.T,
                   "weight": lambda: tx.T @ tdy}
      for product, (plain, ours) in PRODUCTS.items():
        fns = {"jnp": jax.jit(plain), "ours": jax.jit(ours)}
        times = {side: [] for side in (*fns, "torch")}
        for _ in range(args.rounds):
          for side, f in fns.items():
            times[side].append(_seconds(lambda f=f: f(jx, jw, jdy), args.iters))
          times["torch"].append(_seconds(torch_fns[product], args.iters))
        gflops = {side: 2 * m * k * n / statistics.median(t) / 1e9 for side, t in times.items()}
        rows.append({"dtype": dtype, "m": m, "k": k, "n": n, "product": product,
                     "gflops": gflops})
        print(f"{dtype:9} {m}x{k}x{n} {product:8} " +
              "  ".join(f"{side} {g:6.0f}" for side, g in gflops.items()) + " GFLOP/s",
              flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"host": host, "jax": jax.__version__, "torch": torch.__version__,
                 "rounds": args.rounds, "iters": args.iters, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
