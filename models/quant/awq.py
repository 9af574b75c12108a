"""AWQ (Lin et al. 2023, arXiv 2306.00978): activation-aware per-input-channel scales.

The weights that read one input (q, k and v; gate and up; o; down) share a scale per input
channel, s = mean|x|^alpha (normalised by sqrt(max s x min s)), found by a grid search over
alpha in [0, 1): the stored integers quantize diag(s) W (round to nearest, the scheme's groups)
and the layer computes (x / s) Q(diag(s) W), so the channels that carry large activations keep
more precision. The search minimises the output error summed over the weights,
||X W - (X / s) Q(diag(s) W)||^2 = tr(D^T X^T X D), D = W - diag(1/s) Q(diag(s) W), over the
calibration inputs X. alpha = 0 is plain round to nearest, so the search never does worse than
it on the calibration set. Then, as AWQ does, a clipping search: per group of inputs and
output column, the weight range shrunk by the ratio (down to 0.5) that gives that group's least
output error.
"""

from __future__ import annotations

import numpy as np

from models.quant import uniform
from models.quant.uniform import Scheme

GRID = 20


def scales(x_absmean, alpha: float) -> np.ndarray:
  s = np.maximum(np.asarray(x_absmean, np.float64), 1e-4) ** alpha
  return s / np.sqrt(s.max() * s.min())


def clip(w_scaled, x_scaled, scheme: Scheme, shrink: float = 0.5, grid: int = GRID):
  """AWQ's clipping search: per group of inputs and output column, the range shrunk by the ratio
  r in [shrink, 1] (`grid` steps) whose quantized weights give that group's least output error
  ||X_g (w_g - q_g)||^2 over the calibration inputs: (scale, zero or None) as
  uniform.weight_params shapes them."""
  n_in, n_out = w_scaled.shape
  g = scheme.groups(n_in) if scheme.group != uniform.PER_TENSOR else 1
  size = n_in // g
  w = np.asarray(w_scaled, np.float64).reshape(g, size, n_out)
  x = np.asarray(x_scaled, np.float64).reshape(-1, g, size)
  grams = np.einsum("tgi,tgj->gij", x, x)
  lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
  best_err = np.full((g, 1, n_out), np.inf)
  best_scale, best_zero = np.zeros((g, 1, n_out)), np.zeros((g, 1, n_out))
  for r in 1.0 - (1.0 - shrink) * np.arange(grid) / grid:
    scale, zero = uniform.params_from_range(r * lo, r * hi, scheme)
    scale = np.asarray(scale, np.float64)
    z = 0.0 if zero is None else np.asarray(zero, np.float64)
    d = w - uniform.rounded(w, scale, z, scheme)[1]
    err = np.einsum("gio,gij,gjo->go", d, grams, d)[:, None, :]
    better = err < best_err
    best_err = np.where(better, err, best_err)
    best_scale = np.where(better, scale, best_scale)
    best_zero = np.where(better, z, best_zero)
  return best_scale.astype(np.float32), None if scheme.symmetric else best_zero.astype(np.float32)


def _round_trip(w, s, scheme: Scheme, x=None):
  """(stored dict, diag(1/s) Q(diag(s) w)); with the inputs x, AWQ's clipping search first."""
  scale = zero = None
  if x is not None:
    scale, zero = clip((w * s[:, None]).astype(np.float32), x / s, scheme)
  return uniform.quantize_scaled(w, s, scheme, scale, zero)


def quantize(weights: dict[str, np.ndarray], x_ni, scheme: Scheme, grid: int = GRID,
             clipping: bool = True):
  """{name: (stored dict with "smooth", the weight as the model will compute with it)} for
  weights (in, out) that read the inputs x (tokens, in); and the alpha chosen. The scale search
  first, then (`clipping`) the clipping search on the scaled weights."""
  x = np.asarray(x_ni, np.float64)
  gram = x.T @ x
  mean = np.abs(x).mean(0)
  best_alpha, best_loss = 0.0, np.inf
  for alpha in np.arange(grid) / grid:
    s = scales(mean, alpha)
    loss = 0.0
    for w in weights.values():
      d = np.asarray(w, np.float64) - _round_trip(np.asarray(w, np.float64), s, scheme)[1]
      loss += float(np.sum(d * (gram @ d)))
    if loss < best_loss:
      best_alpha, best_loss = float(alpha), loss
  s = scales(mean, best_alpha)
  out = {}
  for name, w in weights.items():
    stored, deq = _round_trip(np.asarray(w, np.float64), s, scheme, x if clipping else None)
    out[name] = ({**stored, "smooth": s.astype(np.float32)}, deq)
  return out, best_alpha
