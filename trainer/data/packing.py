"""Fitting tokenized examples into rows of `seq_len` training positions.

An example is token ids plus a mask (1 on the tokens to learn); a piece of n tokens fills n - 1
positions (inputs ids[:-1], targets ids[1:]). Pieces are the rows (example, start, end) of an
int64 array of shape (k, 3), and a plan is `Rows`: one array of pieces cut by offsets. An epoch of
a million examples is then a few arrays planned in numpy, not millions of Python tuples.

  none    one example per row, the rest padding.
  concat  examples one after another, an example that does not fit split across rows: no
          padding at all (zero-padding packing).
  greedy  buffer a group of examples, sort them by length, place each in the open row with the
          least room that still holds it (best-fit decreasing), open a new row otherwise.

In every mode each example is its own segment: positions restart at 0 and segment ids change, so
attention and RoPE never cross examples. Padding has segment id 0 and weight 0.
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import numpy as np

MODES = ("none", "concat", "greedy")
TRUNCATION = ("split", "truncate", "drop")


def as_pieces(pieces) -> np.ndarray:
  """(example, start, end) triples as a (k, 3) int64 array; an array of them passes through."""
  return np.asarray(pieces, np.int64).reshape(-1, 3)


def fit_examples(lengths: Sequence[int], seq_len: int, policy: str, stats: dict) -> np.ndarray:
  """Examples longer than a row (seq_len + 1 tokens) per `policy`, as pieces that fit: a (k, 3)
  int64 array of (example, start, end), in the order of the examples.

  split: consecutive pieces of seq_len + 1 tokens sharing one token, so no target is lost.
  truncate: the first seq_len + 1 tokens. drop: left out. Counts go into `stats` as plain ints,
  each key added when the first example counts it (as a loop over the examples would).
  """
  if policy not in TRUNCATION:
    raise ValueError(f"data.truncation={policy!r} is not one of {', '.join(TRUNCATION)}")
  n = np.asarray(lengths, np.int64).reshape(-1)
  cap = seq_len + 1
  short, long = n < 2, n > cap
  if policy == "split":
    count = np.where(short, 0, -(-(n - 1) // seq_len))  # piece j starts at token j * seq_len
  else:
    count = (~short & ~(long & (policy == "drop"))).astype(np.int64)
  kinds = {"split": ("split",), "truncate": ("truncated", "tokens_cut"), "drop": ("dropped",)}
  counted = [(mask, keys) for mask, keys in ((short, ("too_short",)), (long, kinds[policy]))
             if mask.any()]
  for mask, keys in sorted(counted, key=lambda c: int(np.argmax(c[0]))):  # first seen, first added
    for key in keys:
      stats[key] = stats.get(key, 0) + int(np.sum(n[mask] - cap if key == "tokens_cut" else mask))
  ex = np.repeat(np.arange(len(n), dtype=np.int64), count)
  start = (np.arange(len(ex), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)) * seq_len
  return np.stack([ex, start, np.minimum(start + cap, n[ex])], axis=1)


def length_to_fit(lengths: Sequence[int], share: float) -> int:
  """The least seq_len whose rows hold whole at least `share` of examples of these token
  lengths (an example of n tokens fills n - 1 positions)."""
  positions = np.sort(np.asarray(lengths, np.int64).reshape(-1) - 1)
  if not len(positions):
    return 0
  return int(positions[max(0, math.ceil(round(share * len(positions), 9)) - 1)])


class _Plan:
  """Rows of pieces by index: plan[r] is an (m_r, 3) array of (example, start, end); negative
  indices and slices as for a list. Subclasses give len() and `_row(r)`."""

  def _row(self, r: int) -> np.ndarray:
    raise NotImplementedError

  def __getitem__(self, r):
    if isinstance(r, slice):
      return [self[k] for k in range(*r.indices(len(self)))]
    if not -len(self) <= r < len(self):
      raise IndexError(f"row {r} of a plan of {len(self)} rows")
    return self._row(r % len(self))

  def __iter__(self):
    return (self[r] for r in range(len(self)))


class Rows(_Plan):
  """A plan held whole: row r is pieces[offsets[r]:offsets[r + 1]]. `pieces` (m, 3) and
  `offsets` (rows + 1,) are int64 arrays."""

  def __init__(self, pieces: np.ndarray, offsets: np.ndarray):
    self.pieces, self.offsets = pieces, offsets

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def _row(self, r: int) -> np.ndarray:
    return self.pieces[self.offsets[r]:self.offsets[r + 1]]


def plan_rows(pieces, seq_len: int, mode: str, group: int = 512) -> Rows | Stream:
  """Rows of pieces ((k, 3) array, taken in its order), per packing `mode`."""
  pieces = as_pieces(pieces)
  if mode == "none":
    return Rows(pieces, np.arange(len(pieces) + 1, dtype=np.int64))
  if mode == "concat":
    return Stream(pieces, seq_len)
  if mode == "greedy":
    return _greedy(pieces, seq_len, group)
  raise ValueError(f"data.packing={mode!r} is not one of {', '.join(MODES)}")


class Stream(_Plan):
  """concat's plan, a row at a time: the pieces' positions as one stream, cut every seq_len
  positions, kept as the pieces and where each one's positions end. Row r is the stream's
  positions r * seq_len .. (r + 1) * seq_len - 1; a piece across a cut is split there into parts
  that share the token at the cut (one part's last target is the next one's first input), so no
  position is lost. Memory is 32 bytes a piece, whatever the number of rows."""

  def __init__(self, pieces: np.ndarray, seq_len: int):
    size = pieces[:, 2] - pieces[:, 1] - 1
    if not (size > 0).all():  # a piece of fewer than 2 tokens fills nothing
      pieces, size = pieces[size > 0], size[size > 0]
    self.pieces, self.seq_len = pieces, seq_len
    self.hi = np.cumsum(size)  # piece k holds positions hi[k] - size[k] .. hi[k] - 1
    self.total = int(self.hi[-1]) if len(self.hi) else 0

  def __len__(self) -> int:
    return -(-self.total // self.seq_len)

  def _row(self, r: int) -> np.ndarray:
    first, last = r * self.seq_len, min((r + 1) * self.seq_len, self.total)
    a = int(np.searchsorted(self.hi, first, side="right"))  # the first piece ending past `first`
    b = int(np.searchsorted(self.hi, last, side="left"))  # the piece holding position last - 1
    parts = self.pieces[a:b + 1].copy()
    hi = self.hi[a:b + 1]
    lo = hi - (parts[:, 2] - parts[:, 1] - 1)
    shift = parts[:, 1] - lo  # a part's token = its stream position + shift
    parts[:, 1] = np.maximum(lo, first) + shift
    parts[:, 2] = np.minimum(hi, last) + shift + 1
    return parts


def _greedy(pieces: np.ndarray, seq_len: int, group: int) -> Rows:
  """Best-fit decreasing within each group of `group` pieces; the rows of a group in the order
  they were opened, the pieces of a row in the order they were placed."""
  need = pieces[:, 2] - pieces[:, 1] - 1
  g = np.arange(len(pieces)) // group
  order = np.lexsort((-need, g))  # each group longest first, equal lengths in the given order
  need = need[order]
  full = np.bincount(g[need >= seq_len], minlength=g[-1] + 1 if len(g) else 0).tolist()
  row, opened = np.empty(len(pieces), np.int64), 0
  for k, s in enumerate(range(0, len(pieces), group)):
    rows, n = _best_fit(need[s:s + group].tolist(), full[k], seq_len)
    row[s:s + group] = np.asarray(rows) + opened
    opened += n
  placed = np.argsort(row, kind="stable")  # by row, then in the order placed
  return Rows(pieces[order[placed]],
              np.concatenate([[0], np.cumsum(np.bincount(row, minlength=opened))]).astype(np.int64))


def _best_fit(need: list[int], full: int, seq_len: int) -> tuple[list[int], int]:
  """The row of each piece of a group (needing `need` positions, longest first) and the number
  of rows: each placed in the open row with the least room that holds it, ties to the row opened
  first, else in a new row. The first `full` need a whole row each: a new one, never open."""
  m = len(need)  # rows are numbered below m: an open row is room * m + row, ordered as (room, row)
  rows, opened, open_rows = list(range(full)), full, []
  for x in need[full:]:
    k = bisect.bisect_left(open_rows, x * m)  # the first open row with room >= x
    if k < len(open_rows):
      room, r = divmod(open_rows.pop(k), m)
    else:
      room, r, opened = seq_len, opened, opened + 1
    rows.append(r)
    if room > x:
      bisect.insort(open_rows, (room - x) * m + r)
  return rows, opened


def padding_ratio(rows: Rows | Stream, seq_len: int) -> float:
  used = rows.total if isinstance(rows, Stream) else int(
      np.sum(rows.pieces[:, 2] - rows.pieces[:, 1] - 1))
  return 1.0 - used / max(1, len(rows) * seq_len)


def assemble(row, ids: Sequence[np.ndarray], masks: Sequence[np.ndarray],
             seq_len: int) -> dict[str, np.ndarray]:
  """One training row (an (m, 3) array of pieces): inputs, targets, weights, positions,
  segment_ids, each (seq_len,)."""
  out = {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
         "weights": np.zeros(seq_len, np.float32), "positions": np.zeros(seq_len, np.int32),
         "segment_ids": np.zeros(seq_len, np.int32)}
  at = 0
  for seg, (ex, start, end) in enumerate(as_pieces(row).tolist(), 1):  # plain ints index ids
    n = end - start - 1
    tokens, mask = ids[ex][start:end], masks[ex][start:end]
    out["inputs"][at:at + n] = tokens[:-1]
    out["targets"][at:at + n] = tokens[1:]
    out["weights"][at:at + n] = mask[1:]
    out["positions"][at:at + n] = np.arange(n)
    out["segment_ids"][at:at + n] = seg
    at += n
  return out
