"""The xla attention path's causal query blocks on CPU, against torch's fused SDPA.

One layer of the medium shape (batch 8 x 512, 8 heads over 2 KV heads, head_dim 64, float32):
forward + backward (`jax.value_and_grad` of a random linear function of the output, jitted) of
`models.layers.dot_product_attention` with 1, 2, 4 and 8 query blocks, and
`torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` forward +
backward, alternating in rounds in this one process; medians, and each as a ratio to torch.

python benchmarks/attention_cpu.py [--rounds 5 --blocks 1,2,4,8 --dtype float32]

--dtype bfloat16: q, k, v (and torch's tensors) in bfloat16; ours accumulates its products and
runs its softmax in float32, torch's SDPA as it does for bf16 inputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.layers import attention_mask, dot_product_attention  # noqa: E402

B, T, H, KV, D = 8, 512, 8, 2, 64


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--blocks", default="1,2,4,8")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = ap.parse_args()
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  rng = np.random.default_rng(0)
  q, cot = (rng.standard_normal((B, T, H, D), np.float32) for _ in range(2))
  k, v = (rng.standard_normal((B, T, KV, D), np.float32) for _ in range(2))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  seg = jnp.ones((B, T), jnp.int32)
  mask = attention_mask(pos, seg, pos, seg)
  dtype = jnp.dtype(args.dtype)
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))

  runners = {}
  for blocks in (int(b) for b in args.blocks.split(",")):
    def loss(q, k, v, blocks=blocks):
      return jnp.sum(dot_product_attention(q, k, v, mask, blocks=blocks).astype(jnp.float32)
                     * cot)
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    t = time.perf_counter()
    compiled = f.lower(q, k, v).compile()
    print(f"{blocks} block(s): compile {time.perf_counter() - t:.2f} s", flush=True)
    runners[f"{blocks} block(s)"] = lambda c=compiled: jax.block_until_ready(c(q, k, v))

  tdt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  tq, tk, tv = (torch.tensor(np.asarray(x, np.float32)).to(tdt).transpose(1, 2).requires_grad_()
                for x in (q, k, v))
  tc = torch.tensor(cot).to(tdt).transpose(1, 2)

  def torch_step():
    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                         enable_gqa=True)
    (o * tc).sum().backward()
    tq.grad = tk.grad = tv.grad = None
  runners["torch sdpa"] = torch_step

  times = {name: [] for name in runners}
  for run in runners.values():
    run()  # warm
  for _ in range(args.rounds):
    for name, run in runners.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  ref = statistics.median(times["torch sdpa"])
  for name, ts in times.items():
    m = statistics.median(ts)
    print(f"{name}: {m * 1e3:.0f} ms forward + backward, / torch {m / ref:.2f}")


if __name__ == "__main__":
  main()
