"""Training throughput of our step against Hugging Face transformers on torch, same process.

A fixed Llama shape (8 layers, d=512, 8 heads, 2 KV heads, ffn 1536, vocab 8192, seq 512, global
batch 8, ~32M parameters) trained with AdamW. Both sides run in this one process, alternating in
rounds, so that a noisy shared machine affects both alike; the figure that matters is the ratio.

python benchmarks/train_throughput.py [--rounds 3 --steps 3 --dtypes float32,bfloat16 --out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import ModelConfig  # noqa: E402
from trainer import metrics as metrics_lib, optim, state as state_lib, step as step_lib  # noqa: E402

SHAPE = dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1536,
             max_seq_len=512, rope_theta=10000.0)
BATCH, SEQ = 8, 512


class _TrainCfg:  # the few `train.*` keys the optimizer reads
  steps, warmup_steps, lr, min_lr_ratio, lr_schedule = 1000, 0, 1e-4, 0.1, "constant"
  b1, b2, eps, weight_decay, clip_norm = 0.9, 0.95, 1e-8, 0.1, 1.0


def batch(seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, SHAPE["vocab_size"], (BATCH, SEQ + 1), dtype=np.int32)
  return toks


def ours(dtype: str):
  cfg = ModelConfig(**SHAPE)
  handle = state_lib.model_handle(cfg)
  tx, sched = optim.make_optimizer(_TrainCfg)
  state = state_lib.new_state(tx, state_lib.init_params(handle, 0), 0)
  step = jax.jit(step_lib.make_train_step(handle, tx, sched, jnp.dtype(dtype), 1), donate_argnums=0)
  toks = batch()
  b = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
       "weights": jnp.ones((BATCH, SEQ), jnp.float32),
       "positions": jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ)),
       "segment_ids": jnp.ones((BATCH, SEQ), jnp.int32)}
  holder = {"state": state}
  t = time.perf_counter()
  holder["state"], m = step(holder["state"], b)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t

  def run(n):
    for _ in range(n):
      holder["state"], m = step(holder["state"], b)
    jax.block_until_ready(m)
    return float(m["loss"])
  return run, compile_s


def peer(dtype: str):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  hf = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["d_model"],
                   intermediate_size=SHAPE["d_ff"], num_hidden_layers=SHAPE["n_layers"],
                   num_attention_heads=SHAPE["n_heads"], num_key_value_heads=SHAPE["n_kv_heads"],
                   max_position_embeddings=SEQ, rope_theta=10000.0, tie_word_embeddings=False)
  hf._attn_implementation = "sdpa"
  model = LlamaForCausalLM(hf)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  toks = torch.from_numpy(batch().astype(np.int64))
  inputs, labels = toks[:, :-1], toks[:, 1:]

  def one():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  one()

  def run(n):
    for _ in range(n):
      loss = one()
    return loss
  return run, 0.0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--out", default="")
  args = ap.parse_args()

  peak = metrics_lib.measured_matmul_flops()
  flops_per_token = ModelConfig(**SHAPE).flops_per_token(SEQ)
  results = {"shape": SHAPE, "batch": BATCH, "seq": SEQ, "machine": platform.processor() or
             platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
             "measured_matmul_tflops": peak / 1e12, "runs": {}}
  for dtype in args.dtypes.split(","):
    runners = {"ours": ours(dtype), "peer": peer(dtype)}
    times = {k: [] for k in runners}
    for _ in range(args.rounds):
      for name, (run, _) in runners.items():
        t = time.perf_counter()
        run(args.steps)
        times[name].append((time.perf_counter() - t) / args.steps)
    tps = {k: BATCH * SEQ / statistics.median(v) for k, v in times.items()}
    entry = {"ours_tokens_per_sec": tps["ours"], "peer_tokens_per_sec": tps["peer"],
             "ratio": tps["ours"] / tps["peer"], "ours_first_step_s": runners["ours"][1],
             "ours_mfu": tps["ours"] * flops_per_token / peak}
    results["runs"][dtype] = entry
    print(f"{dtype}: ours {tps['ours']:.0f} tok/s, transformers {tps['peer']:.0f} tok/s, "
          f"ratio {entry['ratio']:.2f}; our first step (compile) {entry['ours_first_step_s']:.1f}s, "
          f"MFU {entry['ours_mfu']:.1%} of a measured {peak / 1e12:.2f} TFLOP/s f32 matmul",
          flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
