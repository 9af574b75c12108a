"""Activation ranges from a calibration set: absmax, minmax, percentile, MSE and KL.

An `Observer` sees every batch of one tensor once and keeps its minimum, maximum and a
histogram of |x| (`BINS` bins over [0, range), the range a power of two; when a batch reaches
beyond it, it doubles, two
neighbouring bins merging into one, so the histogram stays exact at its current resolution and
never needs a second pass). The methods then read a clipping threshold from it:

- `absmax`: the largest |x|; `minmax`: (min, max), for an asymmetric range;
- `percentile`: the `percentile`-th percentile of |x| (to a bin's width);
- `mse`: the threshold, among the bins' upper edges, whose symmetric quantization of the
  histogram's values (each bin at its centre) has the least mean squared error, the clipped
  tail included;
- `kl`: TensorRT's entropy calibration. For each candidate threshold (bin edge i >= the number
  of levels), the reference distribution P is the histogram's first i bins with all the mass
  beyond added to the last of them (clipping); Q merges the first i bins into the grid's levels
  (bin b into level b x levels // i) and shares each level's mass evenly among its non-empty
  bins. The threshold with the least KL(P || Q) is
  taken: it keeps the bulk's resolution and gives up the rare outliers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BINS = 2048
METHODS = ("absmax", "minmax", "percentile", "mse", "kl")


@dataclasses.dataclass
class Observer:
  """Running statistics of one tensor over a calibration set."""
  bins: int = BINS
  lo: float = np.inf
  hi: float = -np.inf
  top: float = 0.0  # the histogram's range [0, top]
  counts: np.ndarray | None = None
  seen: int = 0

  def update(self, x) -> None:
    x = np.asarray(x, np.float32).ravel()
    if not x.size:
      return
    if not np.all(np.isfinite(x)):
      raise ValueError("a calibration batch holds inf or nan")
    self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
    a = np.abs(x)
    m = float(a.max())
    if self.counts is None:  # a power of two above the first batch's |x|: exact bin edges
      self.top = 2.0 ** (np.floor(np.log2(m)) + 1) if m > 0 else 1.0
      self.counts = np.zeros(self.bins, np.int64)
    while m >= self.top:  # double the range: bin pairs merge, nothing re-read
      self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(1),
                                    np.zeros(self.bins // 2, np.int64)])
      self.top *= 2
    idx = np.minimum((a / self.top * self.bins).astype(np.int64), self.bins - 1)
    self.counts += np.bincount(idx, minlength=self.bins)
    self.seen += x.size

  @property
  def width(self) -> float:
    return self.top / self.bins

  def threshold(self, method: str, bits: int = 8, percentile: float = 99.99) -> float:
    """The clipping threshold of |x| by `method` (not minmax) for a symmetric `bits` grid."""
    if self.counts is None:
      raise ValueError("the observer saw no values")
    if method == "absmax":
      return max(abs(self.lo), abs(self.hi))
    if method == "percentile":
      return percentile_threshold(self.counts, self.width, percentile)
    if method == "mse":
      return mse_threshold(self.counts, self.width, bits)
    if method == "kl":
      return kl_threshold(self.counts, self.width, 2 ** (bits - 1))
    raise ValueError(f"{method!r} is not one of absmax, percentile, mse, kl")

  def range(self, method: str, bits: int = 8, percentile: float = 99.99) -> tuple[float, float]:
    """(lo, hi) to quantize between: minmax's observed range, or +-threshold."""
    if method == "minmax":
      return min(self.lo, 0.0), max(self.hi, 0.0)
    t = self.threshold(method, bits, percentile)
    return -t, t


def percentile_threshold(counts, width: float, percentile: float) -> float:
  cum = np.cumsum(counts)
  i = int(np.searchsorted(cum, cum[-1] * percentile / 100.0))
  return (min(i, len(counts) - 1) + 1) * width


def mse_threshold(counts, width: float, bits: int) -> float:
  centres = (np.arange(len(counts)) + 0.5) * width
  levels = 2 ** (bits - 1) - 1
  best, best_err = len(counts), np.inf
  for i in range(1, len(counts) + 1):
    t = i * width
    step = t / levels
    rounded = np.minimum(np.round(centres / step), levels) * step
    err = float((counts * (centres - rounded) ** 2).sum())
    if err < best_err:
      best, best_err = i, err
  return best * width


def kl_threshold(counts, width: float, levels: int = 128) -> float:
  counts = np.asarray(counts, np.float64)
  n = len(counts)
  if n <= levels:
    return n * width
  best, best_kl = n, np.inf
  for i in range(levels, n + 1):
    p = counts[:i].copy()
    p[-1] += counts[i:].sum()  # the clipped tail lands in the last bin
    nonzero = (counts[:i] > 0).astype(np.float64)
    level = np.arange(i) * levels // i  # bin b of the first i falls in level b * levels // i
    mass = np.bincount(level, weights=counts[:i], minlength=levels)
    filled = np.bincount(level, weights=nonzero, minlength=levels)
    q = nonzero * mass[level] / np.maximum(filled[level], 1.0)
    kl = _kl(p, q)
    if kl < best_kl:
      best, best_kl = i, kl
  return best * width


def _kl(p, q) -> float:
  p, q = p / p.sum(), q / max(q.sum(), 1e-300)
  m = p > 0
  if np.any(q[m] == 0):
    return np.inf
  return float((p[m] * np.log(p[m] / q[m])).sum())
