"""Seeds as every generator here takes them."""

from __future__ import annotations


def fold_seed(seed: int) -> int:
  """`train.seed` (or `--seed`) as every generator here takes it: any Python int, folded into
  [0, 2**32) by `seed % 2**32`. numpy's generators refuse negative seeds and jax's keys overflow
  past 64 bits; seeds already in that range (every seed a run used before) are unchanged, so
  their runs stay bit-identical, and -1 is 4294967295."""
  return int(seed) % 2**32
