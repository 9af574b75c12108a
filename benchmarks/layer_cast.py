"""Mixed precision's weight cast, inside the layer scan or before it: the loss and gradients of
configs/medium.py's shape (8 layers, d 512, vocab 8192, 8 x 512 tokens, remat dots_no_batch) in
bfloat16, one jitted value-and-gradient each, alternating in one process.

  in_scan:    what the trainer runs (trainer/objectives/base.py `Bound`): the layer stack stays
              float32 into the scan, each layer is cast inside it (models/decoder.py
              Context.layer_dtype)
  cast_first: every parameter cast to bfloat16 before the forward (the trainer before d1b21b9)

Both give bitwise the same loss and gradients (tests/test_low_precision.py); this times them
and prints each program's temporary memory (XLA's memory_analysis of the compiled program).

python benchmarks/layer_cast.py [--rounds 16]
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
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host import describe, host_info  # noqa: E402
from models import Decoder, ModelConfig  # noqa: E402
from models.config import Execution  # noqa: E402
from models.handle import cast_floating, model_handle  # noqa: E402
from trainer.objectives.base import Bound  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=16)
  args = ap.parse_args()
  print(describe(host_info()))
  cfg = ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                    d_ff=1536, max_seq_len=512)
  run = Execution(remat="dots_no_batch")
  params = nnx.to_pure_dict(nnx.split(Decoder(cfg, nnx.Rngs(0), run))[1])
  handle = model_handle(cfg, run=run)
  tok = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (8, 512), 0, 8192))
  batch = {"inputs": tok, "positions": np.broadcast_to(np.arange(512), (8, 512)),
           "segment_ids": np.ones_like(tok)}

  def nll(model, hidden):
    logp = jax.nn.log_softmax(model.logits(hidden))
    return -jnp.mean(jnp.take_along_axis(logp, tok[..., None], -1))

  def in_scan(p):
    return nll(*Bound(handle, p, jnp.bfloat16).forward(batch))

  def cast_first(p):
    model = handle.bind(cast_floating(p, jnp.bfloat16))
    return nll(model, model.forward(batch["inputs"], batch["positions"],
                                    batch["segment_ids"])[0])

  fns = {"in_scan": jax.jit(jax.value_and_grad(in_scan)),
         "cast_first": jax.jit(jax.value_and_grad(cast_first))}
  for name, f in fns.items():
    temp = f.lower(params).compile().memory_analysis().temp_size_in_bytes
    print(f"{name}: temporary memory {temp / 2**20:.1f} MiB")
  for f in fns.values():  # compile, then one untimed call
    jax.block_until_ready(f(params))
    jax.block_until_ready(f(params))
  times = {name: [] for name in fns}
  for _ in range(args.rounds):
    for name, f in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(params))
      times[name].append(time.perf_counter() - start)
  for name, t in times.items():
    print(f"{name}: median {statistics.median(t):.3f} s over {len(t)} calls")
  ratio = statistics.median(times["cast_first"]) / statistics.median(times["in_scan"])
  print(f"cast_first / in_scan time: {ratio:.3f}")


if __name__ == "__main__":
  main()
