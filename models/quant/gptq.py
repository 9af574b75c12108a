"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): one weight at a time, each input row's
rounding error spread over the rows not yet quantized through the inverse Hessian of the layer's
reconstruction loss ||X W - X W_q||^2, H = 2 X^T X / n over calibration tokens.

Our weights are (in, out), so GPTQ's "columns" (input features) are rows here. The steps:
dampening (H += damp x mean(diag H) x I; a feature no calibration token used is set to 1 on
the diagonal and its weights to 0), optional act-order (the features with the largest H_ii
first), the upper Cholesky factor U of H^-1, and then, in blocks of `block` features, for each
feature i: q_i = quant(w_i), e_i = (w_i - q_i) / U_ii, w_j -= U_ij e_i for the later features j
of the block; each finished block's error moves the rest at once. Group parameters (scale and
zero point per `group` consecutive inputs of a column) are computed from the error-updated
weights when a group starts; with act-order they are computed beforehand from the weights
themselves ("static groups"), so that groups stay contiguous in the stored layout.
"""

from __future__ import annotations

import numpy as np

from models.quant import uniform
from models.quant.uniform import PER_TENSOR, Scheme


def hessian(x_ni) -> np.ndarray:
  """2 X^T X / n of calibration inputs (tokens, in), in float64."""
  x = np.asarray(x_ni, np.float64)
  return 2.0 * x.T @ x / max(len(x), 1)


def _params(w_rows, scheme: Scheme):
  """Round-to-nearest (scale, zero or None) of rows (k, out) taken as one group: (1, out)."""
  scale, zero = uniform.params_from_range(w_rows.min(0, keepdims=True),
                                          w_rows.max(0, keepdims=True), scheme)
  return np.asarray(scale, np.float64), None if zero is None else np.asarray(zero, np.float64)


def quantize(w_io, h_ii, scheme: Scheme, damp: float = 0.01, act_order: bool = False,
             block: int = 128) -> tuple[dict, np.ndarray]:
  """(quantize()'s dict for w (in, out), the dequantized weight) by GPTQ with Hessian h."""
  if scheme.group == PER_TENSOR:
    raise ValueError("GPTQ quantizes per channel or per group, not per tensor")
  w = np.array(w_io, np.float64)
  n_in, n_out = w.shape
  scheme.check(w.shape, f"a weight of shape {w.shape}")
  group = scheme.group or n_in
  if scheme.group:  # blocks of whole groups: a group's parameters see every earlier update
    block = group * max(1, block // group)
  h = np.array(h_ii, np.float64)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  h[np.diag_indices(n_in)] += damp * np.mean(np.diag(h))
  perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n_in)
  n_groups = n_in // group
  scales = np.zeros((n_groups, 1, n_out))
  zeros = None if scheme.symmetric else np.zeros((n_groups, 1, n_out))
  if act_order:  # static groups: from the weights before any error moved them
    for g in range(n_groups):
      scales[g], z = _params(w[g * group:(g + 1) * group], scheme)
      if zeros is not None:
        zeros[g] = z
  w, h = w[perm], h[np.ix_(perm, perm)]
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
  codes = np.zeros_like(w)
  for b0 in range(0, n_in, block):
    b1 = min(b0 + block, n_in)
    err = np.zeros((b1 - b0, n_out))
    for i in range(b0, b1):
      orig = perm[i]
      g = orig // group
      if not act_order and orig % group == 0:  # a group starts: its parameters, from now
        scales[g], z = _params(w[i:i + group], scheme)
        if zeros is not None:
          zeros[g] = z
      q, deq = uniform.rounded(w[i], scales[g], None if zeros is None else zeros[g], scheme)
      codes[i] = q
      e = (w[i] - deq) / u[i, i]
      w[i + 1:b1] -= np.outer(u[i, i + 1:b1], e)
      err[i - b0] = e
    w[b1:] -= u[b0:b1, b1:].T @ err
  codes = codes[np.argsort(perm)]  # back to the stored order
  stored = {"qweight": np.asarray(uniform.pack(codes.astype(np.int32), scheme)),
            "scales": np.asarray(scales, np.float32)}
  if zeros is not None:
    stored["zeros"] = zeros.astype(np.uint8)
  return stored, np.asarray(uniform.dequantize(stored, scheme))
