"""Fitting tokenized examples into rows of `seq_len` training positions.

An example is token ids plus a mask (1 on the tokens to learn); a piece of n tokens fills n - 1
positions (inputs ids[:-1], targets ids[1:]). A row is a list of (example, start, end) pieces.

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

Piece = tuple[int, int, int]  # (example index, first token, one past the last token)


def fit_examples(lengths: Sequence[int], seq_len: int, policy: str,
                 stats: dict) -> list[tuple[int, int, int]]:
  """Examples longer than a row (seq_len + 1 tokens) per `policy`, as pieces that fit.

  split: consecutive pieces of seq_len + 1 tokens sharing one token, so no target is lost.
  truncate: the first seq_len + 1 tokens. drop: left out. Counts go into `stats`.
  """
  if policy not in TRUNCATION:
    raise ValueError(f"data.truncation={policy!r} is not one of {', '.join(TRUNCATION)}")
  out = []
  cap = seq_len + 1
  for i, n in enumerate(lengths):
    if n < 2:
      stats["too_short"] = stats.get("too_short", 0) + 1
      continue
    if n <= cap:
      out.append((i, 0, n))
    elif policy == "drop":
      stats["dropped"] = stats.get("dropped", 0) + 1
    elif policy == "truncate":
      stats["truncated"] = stats.get("truncated", 0) + 1
      stats["tokens_cut"] = stats.get("tokens_cut", 0) + n - cap
      out.append((i, 0, cap))
    else:
      stats["split"] = stats.get("split", 0) + 1
      out += [(i, s, min(s + cap, n)) for s in range(0, n - 1, seq_len)]
  return out


def length_to_fit(lengths: Sequence[int], share: float) -> int:
  """The least seq_len whose rows hold whole at least `share` of examples of these token
  lengths (an example of n tokens fills n - 1 positions)."""
  positions = sorted(n - 1 for n in lengths)
  return positions[max(0, math.ceil(round(share * len(positions), 9)) - 1)] if positions else 0


def plan_rows(pieces: Sequence[Piece], seq_len: int, mode: str, group: int = 512) -> list[list[Piece]]:
  """Rows of pieces (in the given order), per packing `mode`."""
  if mode == "none":
    return [[p] for p in pieces]
  if mode == "concat":
    rows, row, room = [], [], seq_len
    for ex, start, end in pieces:
      while end - start > 1:
        take = min(room, end - start - 1)  # positions this row can give
        row.append((ex, start, start + take + 1))
        start, room = start + take, room - take
        if room == 0:
          rows.append(row)
          row, room = [], seq_len
    return rows + ([row] if row else [])
  if mode == "greedy":
    rows = []
    for g in range(0, len(pieces), group):
      chunk = sorted(pieces[g:g + group], key=lambda p: p[2] - p[1], reverse=True)
      group_rows: list[list[Piece]] = []
      open_rows: list[tuple[int, int]] = []  # (room left, row index), sorted
      for piece in chunk:
        need = piece[2] - piece[1] - 1
        k = bisect.bisect_left(open_rows, (need, -1))
        if k < len(open_rows):
          room, r = open_rows.pop(k)
        else:
          room, r = seq_len, len(group_rows)
          group_rows.append([])
        group_rows[r].append(piece)
        if room - need > 0:
          bisect.insort(open_rows, (room - need, r))
      rows += group_rows
    return rows
  raise ValueError(f"data.packing={mode!r} is not one of {', '.join(MODES)}")


def padding_ratio(rows: Sequence[Sequence[Piece]], seq_len: int) -> float:
  used = sum(end - start - 1 for row in rows for _, start, end in row)
  return 1.0 - used / max(1, len(rows) * seq_len)


def assemble(row: Sequence[Piece], ids: Sequence[np.ndarray], masks: Sequence[np.ndarray],
             seq_len: int) -> dict[str, np.ndarray]:
  """One training row: inputs, targets, weights, positions, segment_ids, each (seq_len,)."""
  out = {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
         "weights": np.zeros(seq_len, np.float32), "positions": np.zeros(seq_len, np.int32),
         "segment_ids": np.zeros(seq_len, np.int32)}
  at = 0
  for seg, (ex, start, end) in enumerate(row, 1):
    n = end - start - 1
    tokens, mask = ids[ex][start:end], masks[ex][start:end]
    out["inputs"][at:at + n] = tokens[:-1]
    out["targets"][at:at + n] = tokens[1:]
    out["weights"][at:at + n] = mask[1:]
    out["positions"][at:at + n] = np.arange(n)
    out["segment_ids"][at:at + n] = seg
    at += n
  return out
