"""FlashMask tile skipping on realistic layouts (CPU part of the attention benchmark).

For rows of 2048 and 8192 tokens in tiles of 128 x 128: the share of tiles a FlashMask kernel
skips (fully masked), runs without mask work (fully visible) and must mask (partial), for
  causal          one document per row
  packed SFT      stdlib functions/classes (tokenized) greedy-packed, document-causal mask
  DPO             a prompt and two answers per row (prompt and answer lengths drawn from the
                  same tokenized stdlib definitions), shared-prompt mask
The kernel itself and its GPU timings are not in this script yet.

python benchmarks/attention.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.packing import stdlib_definitions  # noqa: E402
from models.kernels import flashmask as fm  # noqa: E402
from trainer.data import packing  # noqa: E402
from trainer.data.tokenizer import Tokenizer  # noqa: E402

BLOCK = 128


def shares(mask: fm.FlashMask, n: int) -> tuple[float, float, float]:
  kinds = fm.tile_kinds(mask, n, BLOCK, BLOCK)
  return tuple(float((kinds == k).mean()) for k in (fm.SKIP, fm.FULL, fm.PARTIAL))


def main():
  defs = stdlib_definitions(3_000_000)
  lengths = [len(x) + 2 for x in Tokenizer.train(defs, 4096).encode_batch(defs)]
  rng = np.random.default_rng(0)
  print("| layout | tokens per row | tiles skipped | fully visible | partial |")
  print("| --- | --- | --- | --- | --- |")
  for n in (2048, 8192):
    rows = packing.plan_rows(packing.fit_examples(lengths, n, "truncate", {}), n, "greedy", 512)
    rows = rows[:32]
    seg = np.zeros((len(rows), n), np.int32)
    for r, row in enumerate(rows):
      at = 0
      for k, (_, s, e) in enumerate(row, 1):
        seg[r, at:at + e - s - 1] = k
        at += e - s - 1
    dpo = []
    for _ in range(16):
      p, a, b = (int(x) for x in rng.choice(lengths, 3))
      scale = min(1.0, n / (p + a + b))
      p, a, b = max(1, int(p * scale)), max(1, int(a * scale)), max(1, int(b * scale))
      dpo.append(fm.shared_prompt(p, [a, b], n))
    dpo_mask = fm.FlashMask(*(np.concatenate([getattr(m, f) for m in dpo])
                              for f in ("lts", "lte", "uts", "ute")))
    for name, mask in (("causal", fm.causal(1, n)), ("packed SFT (document)", fm.document(seg)),
                       ("DPO (shared prompt)", dpo_mask)):
      skip, full, part = shares(mask, n)
      print(f"| {name} | {n} | {skip:.1%} | {full:.1%} | {part:.1%} |")


if __name__ == "__main__":
  main()
