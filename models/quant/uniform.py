"""Uniform integer quantization: int8 and int4, symmetric (absmax scale) or asymmetric (scale and
zero point), per tensor, per output channel or per group of inputs.

A weight is seen as (..., in, out), as everywhere in models/: a "channel" is an output column
and a group is `group` consecutive inputs of one column. With scale s (and zero point z):

  symmetric:  q = clip(round(w / s), -qmax, qmax),       w ~ q * s,       qmax = 2^(bits-1) - 1
  asymmetric: q = clip(round(w / s) + z, 0, 2^bits - 1), w ~ (q - z) * s

The symmetric scale is absmax / qmax (the code -2^(bits-1) is left out, so the grid is
symmetric around 0). The asymmetric range is [min(w, 0), max(w, 0)]: it always holds 0, and
because z is an integer, 0 is represented exactly (padding, ReLU outputs, pruned weights stay
0). int4 codes are stored two per byte along `in` (the low nibble first); symmetric int4 codes
are stored with +8 so that every stored code is unsigned.

`quantize` returns {"qweight": codes, "scales": float32, ["zeros": uint8]}; `dequantize`
inverts it. `fake_quant` quantizes and dequantizes in one go, with a straight-through gradient
(zero outside the clipping range) for quantization-aware training.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PER_TENSOR = -1  # Scheme.group: one scale for the whole tensor
PER_CHANNEL = 0  # one per output column (the whole input dimension)


@dataclasses.dataclass(frozen=True)
class Scheme:
  """How a tensor is quantized. `group`: PER_TENSOR, PER_CHANNEL or a group size (inputs per
  scale; it must divide the input dimension)."""
  bits: int = 8
  symmetric: bool = True
  group: int = PER_CHANNEL

  def __post_init__(self):
    if self.bits not in (4, 8):
      raise ValueError(f"{self.bits} bits: int8 and int4 are supported")
    if self.group < PER_TENSOR:
      raise ValueError(f"group size {self.group}: a positive size, 0 (per channel) or -1 "
                       "(per tensor)")

  @property
  def qmin(self) -> int:
    return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

  def groups(self, n_in: int) -> int:
    """How many scales one column has along the input dimension."""
    if self.group in (PER_TENSOR, PER_CHANNEL):
      return 1
    if n_in % self.group:
      raise ValueError(f"group size {self.group} does not divide the input dimension {n_in}")
    return n_in // self.group

  def check(self, shape: tuple[int, ...], what: str) -> None:
    """ValueError naming `what` when a (..., in, out) weight of `shape` cannot take it."""
    n_in = shape[-2]
    try:
      self.groups(n_in)
    except ValueError as e:
      raise ValueError(f"{what}: {e}") from None
    if self.bits == 4 and n_in % 2:
      raise ValueError(f"{what}: int4 packs two inputs per byte; {n_in} inputs is odd")


def _grouped(w, scheme: Scheme):
  """w (..., in, out) as (..., groups, in per group, out)."""
  *lead, n_in, n_out = w.shape
  g = scheme.groups(n_in)
  return w.reshape(*lead, g, n_in // g, n_out)


def params_from_range(lo, hi, scheme: Scheme):
  """(scale, zero point or None) for values in [lo, hi] (arrays of one shape)."""
  lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
  tiny = jnp.finfo(jnp.float32).tiny
  if scheme.symmetric:
    absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return jnp.maximum(absmax / scheme.qmax, tiny), None
  lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  scale = jnp.maximum((hi - lo) / scheme.qmax, tiny)
  zero = jnp.clip(jnp.round(-lo / scale), 0, scheme.qmax)
  return scale, zero


def weight_params(w, scheme: Scheme):
  """(scale, zero or None), each (..., groups, 1, out) for PER_CHANNEL / group sizes, or of
  w's rank with ones for PER_TENSOR: the round-to-nearest parameters of weight w."""
  wf = jnp.asarray(w, jnp.float32)
  if scheme.group == PER_TENSOR:
    axes = tuple(range(wf.ndim))
    return params_from_range(wf.min(axes, keepdims=True), wf.max(axes, keepdims=True), scheme)
  g = _grouped(wf, scheme)
  return params_from_range(g.min(-2, keepdims=True), g.max(-2, keepdims=True), scheme)


def quantize_with(w, scale, zero, scheme: Scheme):
  """Integer codes (int32, w's shape) of w for given parameters (as `weight_params` shapes
  them)."""
  wf = jnp.asarray(w, jnp.float32)
  grouped = scheme.group != PER_TENSOR
  x = _grouped(wf, scheme) if grouped else wf
  q = jnp.round(x / scale) + (0 if zero is None else zero)
  q = jnp.clip(q, scheme.qmin, scheme.qmax).astype(jnp.int32)
  return q.reshape(wf.shape)


def _dequantize_codes(q, scale, zero, scheme: Scheme):
  grouped = scheme.group != PER_TENSOR
  x = _grouped(q.astype(jnp.float32), scheme) if grouped else q.astype(jnp.float32)
  x = (x - (0 if zero is None else zero)) * scale
  return x.reshape(q.shape)


def pack(q, scheme: Scheme):
  """Codes (int32, (..., in, out)) as stored: int8 (symmetric int8), uint8 (asymmetric int8),
  or two int4 codes per uint8 along `in`."""
  if scheme.bits == 8:
    return q.astype(jnp.int8 if scheme.symmetric else jnp.uint8)
  u = (q + (8 if scheme.symmetric else 0)).astype(jnp.uint8)
  return u[..., 0::2, :] | (u[..., 1::2, :] << 4)


def unpack(stored, scheme: Scheme):
  """The int32 codes back from `pack`."""
  if scheme.bits == 8:
    return stored.astype(jnp.int32)
  *lead, half, n_out = stored.shape
  u = jnp.stack([stored & 0x0F, stored >> 4], axis=-2).reshape(*lead, 2 * half, n_out)
  return u.astype(jnp.int32) - (8 if scheme.symmetric else 0)


def quantize(w, scheme: Scheme, scale=None, zero=None) -> dict:
  """w (..., in, out) float -> {"qweight", "scales"[, "zeros"]} (round to nearest; `scale`,
  `zero`: parameters found otherwise, e.g. by a clipping search)."""
  scheme.check(w.shape, f"a weight of shape {tuple(w.shape)}")
  if scale is None:
    scale, zero = weight_params(w, scheme)
  q = quantize_with(w, scale, zero, scheme)
  out = {"qweight": pack(q, scheme), "scales": jnp.asarray(scale, jnp.float32)}
  if zero is not None:
    out["zeros"] = jnp.asarray(zero).astype(jnp.uint8)
  return out


def dequantize(stored: dict, scheme: Scheme, dtype=jnp.float32):
  """The (..., in, out) weight back from `quantize`'s dict, in `dtype`."""
  q = unpack(stored["qweight"], scheme)
  zero = stored.get("zeros")
  zero = None if zero is None else zero.astype(jnp.float32)
  return _dequantize_codes(q, stored["scales"], zero, scheme).astype(dtype)


def rounded(w, scale, zero, scheme: Scheme):
  """numpy, in w's precision: (the codes of w on the grid of `scale` and `zero` (None:
  symmetric), clipped to [qmin, qmax], and the values they stand for). The search loops of
  GPTQ and AWQ's clipping use it on float64 weights."""
  z = 0.0 if zero is None else zero
  q = np.clip(np.round(w / scale) + z, scheme.qmin, scheme.qmax)
  return q, (q - z) * scale


def quantize_scaled(w, s, scheme: Scheme, scale=None, zero=None):
  """A weight (in, out) whose inputs are divided by s (in,) (AWQ, SmoothQuant): (quantize()'s
  arrays of diag(s) w, as numpy; diag(1/s) x their dequantized weight, float64, which is what
  float inputs see)."""
  scaled = (np.asarray(w, np.float64) * s[:, None]).astype(np.float32)
  stored = {k: np.asarray(v) for k, v in quantize(scaled, scheme, scale, zero).items()}
  return stored, np.asarray(dequantize(stored, scheme), np.float64) / s[:, None]


def stored_bytes(stored: dict) -> int:
  return int(sum(np.prod(v.shape) * jnp.dtype(v.dtype).itemsize for v in stored.values()))


# -- fake quantization (QAT, calibrated activations) -----------------------------------------

def fake_quant(x, scale, zero, scheme: Scheme):
  """dequantize(quantize(x)) with broadcastable `scale` (and `zero`, asymmetric), differentiable
  as the straight-through estimator: the gradient with respect to x is 1 where x / scale + zero
  rounds into [qmin, qmax] and 0 where it was clipped (the scale and zero point get none)."""
  z = 0.0 if zero is None else zero
  u = jax.lax.stop_gradient(x / scale + z)
  y = jax.lax.stop_gradient((jnp.clip(jnp.round(u), scheme.qmin, scheme.qmax) - z) * scale)
  inside = (u >= scheme.qmin - 0.5) & (u <= scheme.qmax + 0.5)
  return jnp.where(inside, x + jax.lax.stop_gradient(y - x), y)


def fake_quant_weight(w, scheme: Scheme):
  """A (..., in, out) weight through round-to-nearest quantize-dequantize with its own
  parameters (held constant in the gradient), the gradient passing straight through:
  quantization-aware training. Equals dequantize(quantize(w))."""
  scale, zero = weight_params(jax.lax.stop_gradient(w), scheme)
  if scheme.group == PER_TENSOR:
    return fake_quant(w, scale, zero, scheme)
  return fake_quant(_grouped(w, scheme), scale, zero, scheme).reshape(w.shape)
