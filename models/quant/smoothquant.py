"""SmoothQuant (Xiao et al. 2022, arXiv 2211.10438): W8A8 with activation outliers migrated
into the weights.

Activations of a few input channels are far larger than the rest, which a per-tensor int8 scale
cannot serve. Per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (the weights
that read one input share s; alpha 0.5 by default, 0: no smoothing); then X W = (X / s)
(diag(s) W) exactly, and both factors are easier to quantize: diag(s) W to int8 per output
channel, X / s to int8 with one static scale calibrated on the calibration set by
models/quant/calibrate.py (absmax, percentile, MSE or KL).
"""

from __future__ import annotations

import numpy as np

from models.quant import calibrate, uniform

WEIGHTS = uniform.Scheme(8, True, uniform.PER_CHANNEL)


def smoothing(x_absmax, w_absmax, alpha: float) -> np.ndarray:
  """s per input channel (all ones at alpha 0)."""
  x = np.maximum(np.asarray(x_absmax, np.float64), 1e-5)
  w = np.maximum(np.asarray(w_absmax, np.float64), 1e-5)
  return np.maximum(x ** alpha / w ** (1 - alpha), 1e-5)


def quantize(weights: dict[str, np.ndarray], x_ni, alpha: float = 0.5,
             act_method: str = "absmax", percentile: float = 99.99):
  """{name: (stored dict with "smooth" and "act_scale", the float weight diag(1/s) Q(diag(s)
  W) that unquantized inputs would see)} for weights (in, out) reading the inputs x (tokens,
  in)."""
  x = np.asarray(x_ni, np.float32)
  w_absmax = np.max([np.abs(np.asarray(w)).max(1) for w in weights.values()], axis=0)
  s = smoothing(np.abs(x).max(0), w_absmax, alpha)
  observer = calibrate.Observer()
  observer.update(x / s.astype(np.float32))
  threshold = observer.threshold(act_method, 8, percentile)
  act_scale = np.float32(max(threshold, 1e-8) / WEIGHTS.qmax)
  out = {}
  for name, w in weights.items():
    stored, deq = uniform.quantize_scaled(w, s, WEIGHTS)
    out[name] = ({**stored, "smooth": s.astype(np.float32), "act_scale": act_scale}, deq)
  return out
