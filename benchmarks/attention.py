"""Attention benchmark: FlashMask tile skipping (any machine) and kernel speed (GPU).

Tile shares (default): for rows of 2048 and 8192 tokens in 128 x 128 tiles, the share of tiles the
Pallas kernel skips (fully masked), runs without mask work (fully visible) and must mask
(partial), as the kernel classifies them (per-block min/max), and the skipped share an exact
per-column classification would give, for
  causal          one document per row
  packed SFT      stdlib functions/classes (tokenized) greedy-packed, document-causal mask
  DPO             a prompt and two answers per row (lengths drawn from the same definitions),
                  shared-prompt mask
  prefix-LM       a bidirectional prefix of a quarter of the row, causal after it
  sliding window  4096-token window (Mistral)

Timing (--timing): forward and forward+backward TFLOP/s of our Pallas kernel against
jax.nn.dot_product_attention (xla, and cudnn on NVIDIA GPUs) at --lengths tokens per row
(bf16, 16 heads / 8 KV heads of 128, batch so that a step holds 32k tokens), causal; then the
packed-SFT document mask: the FlashMask kernel against the same attention with a dense mask.
FLOPs count only visible (query, key) pairs: 4 * pairs * heads * head_dim forward, 2.5x that
backward. On a CPU the kernel runs interpreted, so there --timing only checks that the code runs.

python benchmarks/attention.py
python benchmarks/attention.py --timing --lengths=2048,8192,32768 --json=out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.host import host_info  # noqa: E402
from benchmarks.packing import stdlib_definitions  # noqa: E402
from models.kernels import flashmask as fm  # noqa: E402
from models.kernels.flash_attention import flash_attention  # noqa: E402
from trainer.data import packing  # noqa: E402
from trainer.data.tokenizer import Tokenizer  # noqa: E402

BLOCK = 128


def example_lengths(chars: int = 3_000_000, vocab: int = 4096) -> list[int]:
  """Token counts (+2 for the document markers) of the stdlib's functions and classes in the first
  `chars` characters, with a tokenizer of `vocab` pieces trained on them."""
  defs = stdlib_definitions(chars)
  return [len(x) + 2 for x in Tokenizer.train(defs, vocab).encode_batch(defs)]


def packed_segments(lengths, n: int, rows: int) -> np.ndarray:
  """Segment ids of `rows` greedy-packed rows of n tokens (0: padding)."""
  plan = packing.plan_rows(packing.fit_examples(lengths, n, "truncate", {}), n, "greedy", 512)
  seg = np.zeros((min(rows, len(plan)), n), np.int32)
  for r, row in enumerate(plan[:len(seg)]):
    at = 0
    for k, (_, s, e) in enumerate(row, 1):
      seg[r, at:at + e - s - 1] = k
      at += e - s - 1
  return seg


def dpo_mask(lengths, n: int, rows: int, rng) -> fm.FlashMask:
  masks = []
  for _ in range(rows):
    p, a, b = (int(x) for x in rng.choice(lengths, 3))
    scale = min(1.0, n / (p + a + b))
    p, a, b = max(1, int(p * scale)), max(1, int(a * scale)), max(1, int(b * scale))
    masks.append(fm.shared_prompt(p, [a, b], n))
  return fm.FlashMask(*(np.concatenate([getattr(m, f) for m in masks])
                        for f in ("lts", "lte", "uts", "ute")))


def tile_shares(lengths) -> list[dict]:
  rng = np.random.default_rng(0)
  out = []
  for n in (2048, 8192):
    layouts = {"causal": fm.causal(1, n),
               "packed SFT (document)": fm.document(packed_segments(lengths, n, 32)),
               "DPO (shared prompt)": dpo_mask(lengths, n, 16, rng),
               "prefix-LM (1/4 prefix)": fm.prefix_lm(np.array([n // 4]), n),
               "sliding window 4096": fm.sliding_window(1, n, 4096)}
    for name, mask in layouts.items():
      kinds = np.asarray(fm.tile_kinds(mask, n, BLOCK, BLOCK))
      exact = fm.tile_kinds_exact(mask, n, BLOCK, BLOCK)
      out.append(dict(layout=name, tokens=n, skip=float((kinds == fm.SKIP).mean()),
                      full=float((kinds == fm.FULL).mean()),
                      partial=float((kinds == fm.PARTIAL).mean()),
                      skip_exact=float((exact == fm.SKIP).mean())))
  return out


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def compile_and_time(fn, *args, repeats: int = 5, options=None) -> tuple[float, float]:
  """(compile seconds, best of `repeats` run seconds) of a jitted `fn`: compiled ahead of time
  (with XLA `options`), so compile time is measured apart; one untimed run before the timed
  ones (allocation, autotuning)."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile(options)
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - t0)
  return compile_s, best


def _time(fn, *args, repeats: int = 5) -> float:
  return compile_and_time(fn, *args, repeats=repeats)[1]


def _fwd_bwd(attend):
  """jit(grad) of sum(attend(q, k, v, *rest)) with respect to q, k and v: forward + backward."""
  def loss(q, k, v, *rest):
    return jnp.sum(attend(q, k, v, *rest).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def timing(lengths_to_run, example_lens, tokens_per_step: int = 32768, heads: int = 16,
           kv_heads: int = 8, head_dim: int = 128) -> list[dict]:
  gpu = jax.default_backend() == "gpu"
  rows = []
  for n in lengths_to_run:
    b = max(1, tokens_per_step // n)
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(key[0], (b, n, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(key[1], (b, n, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(key[2], (b, n, kv_heads, head_dim), jnp.bfloat16)
    seg = packed_segments(example_lens, n, b)
    seg = np.concatenate([seg] * -(-b // len(seg)))[:b]
    document = fm.document(seg)
    dense_doc = jnp.asarray(document.dense())[:, None]  # (b, 1, n, n) for the dense paths
    causal = fm.causal(b, n)
    cases = {
        ("causal", "pallas"): lambda q, k, v: flash_attention(q, k, v, causal)[0],
        ("causal", "xla"): lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla"),
        ("document", "pallas FlashMask"): lambda q, k, v: flash_attention(q, k, v, document)[0],
        ("document", "xla dense mask"): lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=dense_doc, implementation="xla"),
    }
    if gpu:
      cases[("causal", "cudnn")] = lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation="cudnn")
      cases[("document", "cudnn dense mask")] = lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, mask=dense_doc, implementation="cudnn")
    pairs = {"causal": b * n * (n + 1) / 2, "document": float(document.dense().sum())}
    for (mask_name, impl), attend in cases.items():
      flops = 4 * pairs[mask_name] * heads * head_dim
      row = dict(tokens=n, batch=b, mask=mask_name, impl=impl)
      try:
        fwd = _time(jax.jit(attend), q, k, v)
        both = _time(_fwd_bwd(attend), q, k, v)
        row.update(fwd_s=fwd, fwd_bwd_s=both, fwd_tflops=flops / fwd / 1e12,
                   fwd_bwd_tflops=3.5 * flops / both / 1e12)
      except Exception as e:  # e.g. out of memory for a dense 32k mask: record, go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--timing", action="store_true")
  ap.add_argument("--lengths", default="2048,8192,32768")
  ap.add_argument("--tokens_per_step", type=int, default=32768)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  lengths = example_lengths()
  result = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "host": host_info()}
  if args.timing:
    result["timing"] = timing([int(x) for x in args.lengths.split(",")], lengths,
                              args.tokens_per_step)
  else:
    result["tile_shares"] = tile_shares(lengths)
    print("| layout | tokens per row | tiles skipped | fully visible | partial | skipped, exact |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["tile_shares"]:
      print(f"| {r['layout']} | {r['tokens']} | {r['skip']:.1%} | {r['full']:.1%} | "
            f"{r['partial']:.1%} | {r['skip_exact']:.1%} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
