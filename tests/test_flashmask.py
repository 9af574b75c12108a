"""FlashMask vectors against masks written out densely from their definitions, and the tile
classification against the dense mask."""

import numpy as np
import pytest

from models.kernels import flashmask as fm


def tril(n):
  return np.tril(np.ones((n, n), bool))


def test_causal_and_sliding_window():
  n = 13
  np.testing.assert_array_equal(fm.causal(2, n).dense(), np.broadcast_to(tril(n), (2, n, n)))
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  np.testing.assert_array_equal(fm.sliding_window(1, n, 4).dense()[0], (j <= i) & (i - j < 4))


@pytest.mark.parametrize("is_causal", [True, False])
def test_document_mask_equals_segment_rule(is_causal):
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(5, 40))
    seg = np.sort(rng.integers(0, 5, (3, n)), axis=1)
    seg[:, -int(rng.integers(0, 4)):] = 0 if rng.random() < 0.5 else seg[:, -1:]  # padding tail
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    want = seg[:, :, None] == seg[:, None, :]
    # consecutive runs, not equal ids: padding after a segment of id 0 is a new run
    runs = np.concatenate([np.zeros((3, 1), int), np.cumsum(np.diff(seg, axis=1) != 0, 1)], 1)
    want = runs[:, :, None] == runs[:, None, :]
    if is_causal:
      want &= j <= i
    np.testing.assert_array_equal(fm.document(seg, is_causal).dense(), want)


def test_shared_prompt_answers_see_prompt_and_themselves():
  p, answers, n = 4, [3, 5, 2], 17
  m = fm.shared_prompt(p, answers, n).dense()[0]
  owner = np.full(n, -2)
  owner[:p] = -1
  s = p
  for k, length in enumerate(answers):
    owner[s:s + length] = k
    s += length
  end = s
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  in_group = (i < end) & (j < end)
  want = in_group & (j <= i) & ((owner[None, :] == -1) | (owner[None, :] == owner[:, None]))
  want |= (i >= end) & (j >= end) & (j <= i)  # trailing padding, causal among itself
  np.testing.assert_array_equal(m, want)


def test_prefix_lm():
  n = 10
  m = fm.prefix_lm(np.array([0, 4]), n).dense()
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  np.testing.assert_array_equal(m[0], j <= i)
  np.testing.assert_array_equal(m[1], (j <= i) | (j < 4))


def test_user_vectors_are_checked():
  with pytest.raises(ValueError, match="start <= end"):
    fm.from_vectors([[3]], [[2]], [[0]], [[0]])
  with pytest.raises(ValueError, match="one shape"):
    fm.from_vectors([[3, 3]], [[3]], [[0]], [[0]])


def random_mask(rng, b, n):
  a = np.sort(rng.integers(0, n + 1, (2, b, n)), axis=0)
  c = np.sort(rng.integers(0, n + 1, (2, b, n)), axis=0)
  return fm.from_vectors(a[0], a[1], c[0], c[1])


def dense_tile_kinds(dense, bq, bk):
  b, n_q, n_k = dense.shape
  nq, nk = -(-n_q // bq), -(-n_k // bk)
  out = np.empty((b, nq, nk), np.int8)
  for qb in range(nq):
    for kb in range(nk):
      tile = dense[:, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
      out[:, qb, kb] = np.where(~tile.any((1, 2)), fm.SKIP,
                                np.where(tile.all((1, 2)), fm.FULL, fm.PARTIAL))
  return out


STRUCTURED = ["causal", "document", "shared", "prefix", "window"]


@pytest.mark.parametrize("kind", STRUCTURED + ["random"])
def test_tile_kinds_agree_with_the_dense_mask(kind):
  """The exact classification equals the dense mask's; the kernel's min/max one is never wrong
  (SKIP and FULL only where true) and, on the structured masks, equals the exact one."""
  rng = np.random.default_rng(1)
  n, bq, bk = 48, 8, 16  # multiples, so that padding does not enter the exact comparison
  mask = {"causal": lambda: fm.causal(2, n),
          "document": lambda: fm.document(np.sort(rng.integers(0, 4, (2, n)), 1)),
          "shared": lambda: fm.shared_prompt(10, [12, 9, 15], n),
          "prefix": lambda: fm.prefix_lm(np.array([7, 30]), n),
          "window": lambda: fm.sliding_window(2, n, 9),
          "random": lambda: random_mask(rng, 3, n)}[kind]()
  want = dense_tile_kinds(mask.dense(), bq, bk)
  np.testing.assert_array_equal(fm.tile_kinds_exact(mask, n, bq, bk), want)
  fast = np.asarray(fm.tile_kinds(mask, n, bq, bk))
  assert ((fast == want) | (fast == fm.PARTIAL)).all()
  if kind != "random":
    np.testing.assert_array_equal(fast, want)
    assert (want == fm.SKIP).any()
  if kind == "causal":
    assert (want == fm.FULL).any()


def test_tile_kinds_with_lengths_off_the_blocks():
  """Keys past the end count as hidden from every row (the kernel pads them so)."""
  rng = np.random.default_rng(2)
  for _ in range(10):
    n = int(rng.integers(10, 60))
    mask = random_mask(rng, 2, n)
    kinds = np.asarray(fm.tile_kinds(mask, n, 8, 16))
    dense = mask.dense()
    padded = np.zeros((2, kinds.shape[1] * 8, kinds.shape[2] * 16), bool)
    padded[:, :n, :n] = dense
    padded[:, n:, :n] = mask.dense(kinds.shape[1] * 8)[:, n:]  # rows past the end: the bands
    want = dense_tile_kinds(padded, 8, 16)
    assert ((kinds == want) | (kinds == fm.PARTIAL)).all()
