"""AWQ (Lin et al. 2023, arXiv 2306.00978): activation-aware per-input-channel scales.

The weights that read one input (q, k and v; gate and up; o; down) share a scale per input
channel, s = mean|x|^alpha (normalised by sqrt(max s x min s)), found by a grid search over
alpha in [0, 1): the stored integers quantize diag(s) W (round to nearest, the scheme's groups)
and the layer computes (x / s) Q(diag(s) W), so the channels that carry large activations keep
more precision. The search minimises the output error summed over the weights,
||X W - (X / s) Q(diag(s) W)||^2 = tr(D^T X^T X D), D = W - diag(1/s) Q(diag(s) W), over the
calibration inputs X. alpha = 0 is plain round to nearest, so the search never does worse than
it on the calibration set.
"""

from __future__ import annotations

import numpy as np

from models.quant import uniform
from models.quant.uniform import Scheme

GRID = 20


def scales(x_absmean, alpha: float) -> np.ndarray:
  s = np.maximum(np.asarray(x_absmean, np.float64), 1e-4) ** alpha
  return s / np.sqrt(s.max() * s.min())


def _round_trip(w, s, scheme: Scheme):
  """(stored dict, diag(1/s) Q(diag(s) w))."""
  stored = uniform.quantize((w * s[:, None]).astype(np.float32), scheme)
  stored = {k: np.asarray(v) for k, v in stored.items()}
  return stored, np.asarray(uniform.dequantize(stored, scheme), np.float64) / s[:, None]


def quantize(weights: dict[str, np.ndarray], x_ni, scheme: Scheme, grid: int = GRID):
  """{name: (stored dict with "smooth", the weight as the model will compute with it)} for
  weights (in, out) that read the inputs x (tokens, in); and the alpha chosen."""
  x = np.asarray(x_ni, np.float64)
  gram = x.T @ x
  mean = np.abs(x).mean(0)
  best, best_alpha, best_loss = None, 0.0, np.inf
  for alpha in np.arange(grid) / grid:
    s = scales(mean, alpha)
    loss, out = 0.0, {}
    for name, w in weights.items():
      stored, deq = _round_trip(np.asarray(w, np.float64), s, scheme)
      d = np.asarray(w, np.float64) - deq
      loss += float(np.sum(d * (gram @ d)))
      out[name] = ({**stored, "smooth": s.astype(np.float32)}, deq)
    if loss < best_loss:
      best, best_alpha, best_loss = out, float(alpha), loss
  return best, best_alpha
