"""FlashMask: attention masks as column-wise masked row intervals (arXiv 2410.01359).

For key column j, query rows i are masked when they fall in the lower band [lts[j], lte[j]) or
the upper band [uts[j], ute[j]). Four int32 vectors of the key length describe causal, document
(packing), shared-prompt, prefix-LM and sliding-window masks, and their combinations: O(N)
memory where a dense mask is O(N^2). "No band" is an empty interval (start == end).

`tile_kinds` classifies (query block, key block) tiles from per-key-block minima and maxima of
the vectors, O(N / block) numbers: fully masked (the kernel skips it), fully visible (no mask
work), or partial. It is what the Pallas kernel uses; `tile_kinds_exact` looks at every column
and is the yardstick for how much the min/max summary leaves on the table.

The builders below are numpy (host side, data pipelines); `from_segments` is jnp, for masks
built inside a jitted model from its segment ids.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SKIP, PARTIAL, FULL = 0, 1, 2
# The segment id of virtual tokens (prompt and prefix tuning): leading keys that every query row
# after them sees, whatever its own segment.
VIRTUAL = -2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlashMask:
  """Each field int32 (batch, keys). Rows run over queries 0..q_len-1."""
  lts: np.ndarray  # lower band start
  lte: np.ndarray  # lower band end (exclusive)
  uts: np.ndarray  # upper band start
  ute: np.ndarray  # upper band end (exclusive)

  def dense(self, q_len: int | None = None) -> np.ndarray:
    """Allowed (batch, q_len, k_len) booleans: the reference the kernel is tested against."""
    q_len = self.lts.shape[-1] if q_len is None else q_len
    i = np.arange(q_len)[None, :, None]
    lower = (i >= self.lts[:, None, :]) & (i < self.lte[:, None, :])
    upper = (i >= self.uts[:, None, :]) & (i < self.ute[:, None, :])
    return ~(lower | upper)


def _vectors(b: int, n: int):
  return (np.full((b, n), n, np.int32), np.full((b, n), n, np.int32), np.zeros((b, n), np.int32),
          np.zeros((b, n), np.int32))


def full(batch: int, n: int, q_len: int | None = None) -> FlashMask:
  """No mask: every row sees every key (bidirectional attention)."""
  q_len = n if q_len is None else q_len
  empty = np.full((batch, n), q_len, np.int32)
  return FlashMask(empty, empty.copy(), np.zeros_like(empty), np.zeros_like(empty))


def causal(batch: int, n: int) -> FlashMask:
  """Row i sees keys j <= i: for column j, rows [0, j) are masked."""
  lts, lte, uts, _ = _vectors(batch, n)
  return FlashMask(lts, lte, uts, np.broadcast_to(np.arange(n, dtype=np.int32), (batch, n)).copy())


def document(segment_ids: np.ndarray, is_causal: bool = True) -> FlashMask:
  """Packed rows: attention stays inside each segment (consecutive equal ids), causal or not.

  Key j in a segment [s, e): rows from e on are masked (lower band), and rows before j (causal) or
  before s (bidirectional) are masked (upper band). Segment id 0 (padding) is a segment too.
  """
  seg = np.asarray(segment_ids)
  b, n = seg.shape
  lts, lte, uts, ute = _vectors(b, n)
  for r in range(b):
    bounds = np.flatnonzero(np.diff(seg[r])) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [n]])
    for s, e in zip(starts, ends):
      lts[r, s:e] = e
      ute[r, s:e] = np.arange(s, e) if is_causal else s
  return FlashMask(lts, lte, uts, ute)


def shared_prompt(prompt_len: int, answer_lens: list[int], n: int, batch: int = 1) -> FlashMask:
  """One prompt followed by several answers in one row (DPO / reward models): every answer sees
  the prompt and itself, causally, never another answer. Rows past the group are padding that
  sees nothing of it (they form a segment of their own)."""
  lts, lte, uts, ute = _vectors(batch, n)
  end = prompt_len + sum(answer_lens)
  if end > n:
    raise ValueError(f"prompt {prompt_len} + answers {sum(answer_lens)} exceed the row of {n}")
  ute[:, :] = np.arange(n)  # causal everywhere; trailing padding keys are then seen by padding only
  lts[:, :prompt_len] = end  # the prompt is seen by the whole group
  s = prompt_len
  for length in answer_lens:
    lts[:, s:s + length] = s + length  # an answer is seen by itself only
    s += length
  return FlashMask(lts, lte, uts, ute)


def prefix_lm(prefix_len: np.ndarray, n: int) -> FlashMask:
  """Bidirectional attention inside the first prefix_len[b] tokens, causal after them."""
  prefix_len = np.asarray(prefix_len)
  b = len(prefix_len)
  lts, lte, uts, ute = _vectors(b, n)
  j = np.arange(n)[None, :]
  ute[:] = np.where(j < prefix_len[:, None], 0, j)
  return FlashMask(lts, lte, uts, ute)


def sliding_window(batch: int, n: int, window: int) -> FlashMask:
  """Causal, and row i sees at most the `window` keys i-window+1 .. i."""
  m = causal(batch, n)
  lts = np.minimum(np.arange(n) + window, n).astype(np.int32)
  return dataclasses.replace(m, lts=np.broadcast_to(lts, (batch, n)).copy())


def from_vectors(lts, lte, uts, ute) -> FlashMask:
  """User-given bands, checked for shape and order."""
  arrays = [np.asarray(x, np.int32) for x in (lts, lte, uts, ute)]
  if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 2:
    raise ValueError("FlashMask vectors must all be (batch, keys) arrays of one shape")
  if (arrays[0] > arrays[1]).any() or (arrays[2] > arrays[3]).any():
    raise ValueError("FlashMask bands need start <= end (lts <= lte, uts <= ute)")
  return FlashMask(*arrays)


def group_width(shared_prompt: int) -> int:
  """Segments per shared-prompt group: the prompt and its `shared_prompt` answers (0: off)."""
  if isinstance(shared_prompt, bool):  # it was a flag once: pairs are 2 answers per prompt
    raise TypeError("shared_prompt is the number of answers per prompt (2 for preference "
                    "pairs), not a bool")
  return shared_prompt + 1 if shared_prompt else 0


def from_segments(segment_ids: jax.Array, sliding_window: int = 0,
                  shared_prompt: int = 0) -> FlashMask:
  """jnp: the causal document mask of packed rows (as `document`), optionally also limited to a
  sliding window of `sliding_window` keys. Runs in O(N) inside jit: each key finds the end of its
  segment with a reversed cumulative minimum. Keys of segment `VIRTUAL` (leading virtual tokens)
  are seen by every later row, outside any window. `shared_prompt` = n answers per prompt
  (preference rows, trainer/data/pairs.py: 2; a group of n completions: n): with g = n + 1,
  segments g k + 1 .. g k + g are group k's prompt and its answers, and a prompt key is seen up
  to the end of its group (every answer), an answer key up to the end of its own segment."""
  seg = jnp.asarray(segment_ids)
  b, n = seg.shape
  idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  starts_next = jnp.concatenate([seg[:, 1:] != seg[:, :-1], jnp.ones((b, 1), bool)], axis=1)
  # end of the segment of key j: the first index k > j where a new segment starts (or n)
  boundary = jnp.where(starts_next, idx + 1, n)
  seg_end = jax.lax.cummin(boundary, axis=1, reverse=True)
  g = group_width(shared_prompt)
  if g:
    group = (seg - 1) // g
    group_next = jnp.concatenate([group[:, 1:] != group[:, :-1], jnp.ones((b, 1), bool)], axis=1)
    group_end = jax.lax.cummin(jnp.where(group_next, idx + 1, n), axis=1, reverse=True)
    seg_end = jnp.where((seg > 0) & ((seg - 1) % g == 0), group_end, seg_end)
  lts = seg_end if not sliding_window else jnp.minimum(seg_end, idx + sliding_window)
  lts = jnp.where(seg == VIRTUAL, n, lts)
  return FlashMask(lts.astype(jnp.int32), jnp.full((b, n), n, jnp.int32),
                   jnp.zeros((b, n), jnp.int32), idx)


def shift_rows(mask: FlashMask, offset, q_len: int) -> FlashMask:
  """The bands seen from query rows offset .. offset + q_len - 1, renumbered from 0: how a block of
  ring attention turns a mask over the whole sequence into one over its contiguous chunk."""
  clip = lambda x: jnp.clip(x - offset, 0, q_len).astype(jnp.int32)
  return FlashMask(clip(mask.lts), clip(mask.lte), clip(mask.uts), clip(mask.ute))


def tile_kinds(mask: FlashMask, q_len: int, block_q: int, block_k: int) -> jax.Array:
  """(batch, q_blocks, k_blocks) of SKIP / PARTIAL / FULL from per-key-block min/max (jnp).

  A tile is SKIP when one band covers its row block in every column (max start <= first row and
  min end >= last row + 1), FULL when in every column each band misses the row block or is
  empty (min start >= row block end, or max end <= first row). Conservative: what it calls SKIP or
  FULL is exactly that; a tile hidden only by the two bands together, or by different bands in
  different columns, is called PARTIAL and masked in the kernel. Keys are padded to whole blocks
  with columns hidden from every row.
  """
  b, n = mask.lts.shape
  nq, nk = -(-q_len // block_q), -(-n // block_k)
  pad = nk * block_k - n

  def blocks(x, fill):
    x = jnp.pad(jnp.asarray(x, jnp.int32), ((0, 0), (0, pad)), constant_values=fill)
    return x.reshape(b, nk, block_k)[:, None]  # (b, 1, nk, block_k)

  lts, lte = blocks(mask.lts, 0), blocks(mask.lte, nq * block_q)
  uts, ute = blocks(mask.uts, 0), blocks(mask.ute, 0)
  r0 = (jnp.arange(nq, dtype=jnp.int32) * block_q)[None, :, None]  # (1, nq, 1)
  r1 = r0 + block_q
  mn, mx = lambda x: x.min(-1), lambda x: x.max(-1)
  skip = ((mx(lts) <= r0) & (mn(lte) >= r1)) | ((mx(uts) <= r0) & (mn(ute) >= r1))
  lower_clear = (mn(lts) >= r1) | (mx(lte) <= r0)
  upper_clear = (mn(uts) >= r1) | (mx(ute) <= r0)
  return jnp.where(skip, SKIP, jnp.where(lower_clear & upper_clear, FULL, PARTIAL)).astype(jnp.int8)


def tile_kinds_exact(mask: FlashMask, q_len: int, block_q: int, block_k: int) -> np.ndarray:
  """(batch, q_blocks, k_blocks) of SKIP / PARTIAL / FULL, looking at every column (numpy).

  A column hides a row block [r0, r1) when one band covers it, or the two bands together do
  (they touch or overlap); it leaves it whole when neither band meets it. A tile is SKIP when all
  its columns hide the block, FULL when none touch it. The last blocks may be short.
  """
  b, n = mask.lts.shape
  nq, nk = -(-q_len // block_q), -(-n // block_k)
  out = np.full((b, nq, nk), PARTIAL, np.int8)
  for qb in range(nq):
    r0, r1 = qb * block_q, min((qb + 1) * block_q, q_len)
    lo_cov = (mask.lts <= r0) & (mask.lte >= r1)
    up_cov = (mask.uts <= r0) & (mask.ute >= r1)
    joint = ((mask.uts <= r0) & (mask.ute >= mask.lts) & (mask.lts <= mask.ute) & (mask.lte >= r1)) | \
            ((mask.lts <= r0) & (mask.lte >= mask.uts) & (mask.uts <= mask.lte) & (mask.ute >= r1))
    hidden = lo_cov | up_cov | joint
    lower_meets = (mask.lts < r1) & (mask.lte > r0) & (mask.lts < mask.lte)
    upper_meets = (mask.uts < r1) & (mask.ute > r0) & (mask.uts < mask.ute)
    untouched = ~(lower_meets | upper_meets)
    for kb in range(nk):
      c0, c1 = kb * block_k, min((kb + 1) * block_k, n)
      out[:, qb, kb] = np.where(hidden[:, c0:c1].all(1), SKIP,
                                np.where(untouched[:, c0:c1].all(1), FULL, PARTIAL))
  return out
