"""KV-cache generation against recomputing the full forward pass for every new token.

The configs/tiny.py model shape (random weights), 4 prompts of 32 tokens, 96 new tokens, greedy,
float32. The peer is a jitted step that runs the model over a fixed buffer of prompt + new tokens
and reads the logits at each row's last position (what trainer/generate.py did before the cache).
Both are compiled before timing; the best of 3 runs counts. Prints tokens/s and the ratio.

python benchmarks/generate.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from models import handle as handles  # noqa: E402
from trainer import generate as gen  # noqa: E402
from trainer.validate import model_config  # noqa: E402

BATCH, PROMPT, NEW = 4, 32, 96


def full_forward_generate(handle, params, prompts, new_tokens):
  buffer = PROMPT + new_tokens
  tokens = np.zeros((BATCH, buffer), np.int32)
  tokens[:, :PROMPT] = prompts

  @jax.jit
  def step(tokens, i):
    logits = handle.bind(params)(tokens)
    nxt = jnp.argmax(logits[:, PROMPT + i - 1], axis=-1).astype(jnp.int32)
    return tokens.at[:, PROMPT + i].set(nxt)

  t = jnp.asarray(tokens)
  for i in range(new_tokens):
    t = step(t, i)
  return np.asarray(t[:, PROMPT:])


def best_of(fn, repeats=3):
  fn()  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  cfg = model_config(tiny.get_config(), vocab_size=2048)
  handle = handles.model_handle(cfg)
  params = handles.init_params(handle, seed=0)
  prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, PROMPT))
  cached = gen.generate(handle, params, prompts.tolist(), NEW)
  full = full_forward_generate(handle, params, prompts, NEW)
  same = all(list(full[r]) == cached[r] for r in range(BATCH))
  t_cache = best_of(lambda: gen.generate(handle, params, prompts.tolist(), NEW))
  t_full = best_of(lambda: full_forward_generate(handle, params, prompts, NEW))
  tokens = BATCH * NEW
  print(f"same greedy tokens: {same}")
  print(f"KV cache: {tokens / t_cache:.0f} tokens/s; full forward per token: "
        f"{tokens / t_full:.0f} tokens/s; ratio {t_full / t_cache:.2f}x "
        f"({jax.devices()[0].platform}, batch {BATCH}, prompt {PROMPT}, {NEW} new tokens)")


if __name__ == "__main__":
  main()
