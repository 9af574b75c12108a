"""grain pipelines that turn token streams into training batches.

Language-model pretraining reads fixed windows of `seq_len + 1` tokens from one long stream of
documents joined by EOS; a batch holds `inputs`, `targets` (inputs shifted by one), `weights`
(1 where the target counts), `positions` and `segment_ids`. Shuffling is a grain index shuffle,
fresh every epoch, so the iterator's whole state is one integer that travels with checkpoints.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np


def token_stream(docs_ids: Sequence[Sequence[int]], eos_id: int, bos_id: int | None = None) -> np.ndarray:
  """One int32 array: [bos] doc0 eos [bos] doc1 eos ..."""
  parts = []
  for ids in docs_ids:
    if bos_id is not None:
      parts.append([bos_id])
    parts += [ids, [eos_id]]
  return np.concatenate([np.asarray(p, np.int32) for p in parts]) if parts else np.zeros(0, np.int32)


class _Window:
  """Window i of the stream as an example dict (a class, not a lambda, so grain can name it)."""

  def __init__(self, stream: np.ndarray, seq_len: int):
    self.stream, self.seq_len = stream, seq_len

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    start = int(i) * self.seq_len
    chunk = self.stream[start:start + self.seq_len + 1]
    return {
        "inputs": chunk[:-1],
        "targets": chunk[1:],
        "weights": np.ones(self.seq_len, np.float32),
        "positions": np.arange(self.seq_len, dtype=np.int32),
        "segment_ids": np.ones(self.seq_len, np.int32),
    }


def num_windows(stream: np.ndarray, seq_len: int) -> int:
  return max(0, (len(stream) - 1) // seq_len)


def lm_dataset(stream: np.ndarray, seq_len: int, batch_size: int, *, seed: int,
               shuffle: bool = True, repeat: bool = True,
               shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
  """Batches of `batch_size` windows. Raises ValueError if the stream is shorter than a batch.

  With `shard=(index, count)` this process reads only every count-th window from `index` and
  batches `batch_size // count` of them: the processes' batches i together hold exactly the
  windows of the single-process batch i.
  """
  index, count = shard
  n = num_windows(stream, seq_len)
  if n < batch_size:
    raise ValueError(f"the token stream ({len(stream)} tokens) holds {n} windows of "
                     f"{seq_len + 1} tokens, fewer than one batch of {batch_size}")
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  if count > 1:
    ds = ds[index::count]
  return ds.map(_Window(stream, seq_len)).batch(batch_size // count, drop_remainder=True)
