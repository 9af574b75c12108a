"""NF4 storage for frozen base weights (QLoRA, arXiv 2305.14314).

A weight seen as (..., in, out) is cut into blocks of 64 consecutive inputs per output column.
Each value is divided by its block's absolute maximum and replaced by the index of the nearest of
the 16 NormalFloat levels (4 bits; two indices per byte along `in`). The block maxima are
quantized again ("double quantization"): 8 bits each, relative to the largest maximum of their
column, which stays in float32 — so storage is 4 + 8/64 bits per weight plus 32 bits per column.
Maxima are rounded up, so a normalised value never leaves [-1, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2
KEYS = ("nf4_codes", "nf4_absmax", "nf4_scale")


def check(n_in: int, what: str) -> None:
  if n_in % BLOCK:
    raise ValueError(f"NF4 needs the input size of {what} ({n_in}) to be a multiple of {BLOCK}")


def quantize(w) -> dict:
  """w (..., in, out) float -> {"nf4_codes": uint8 (..., in/2, out), "nf4_absmax": uint8
  (..., in/64, out), "nf4_scale": float32 (..., 1, out)}."""
  *lead, n_in, n_out = w.shape
  check(n_in, f"a weight of shape {w.shape}")
  blocks = w.astype(jnp.float32).reshape(*lead, n_in // BLOCK, BLOCK, n_out)
  absmax = jnp.max(jnp.abs(blocks), axis=-2)  # (..., in/64, out)
  scale = jnp.max(absmax, axis=-2, keepdims=True)  # (..., 1, out)
  safe_scale = jnp.where(scale > 0, scale, 1.0)
  absmax_q = jnp.clip(jnp.ceil(absmax / safe_scale * 255.0), 0, 255).astype(jnp.uint8)
  absmax_d = absmax_q.astype(jnp.float32) / 255.0 * safe_scale
  normalised = blocks / jnp.where(absmax_d > 0, absmax_d, 1.0)[..., None, :]
  codes = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normalised).astype(jnp.uint8)
  codes = codes.reshape(*lead, n_in, n_out)
  packed = codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)
  return {"nf4_codes": packed, "nf4_absmax": absmax_q, "nf4_scale": scale.astype(jnp.float32)}


def dequantize(q: dict, dtype=jnp.float32):
  """The (..., in, out) weight back, in `dtype`."""
  packed = q["nf4_codes"]
  *lead, half, n_out = packed.shape
  codes = jnp.stack([packed & 0x0F, packed >> 4], axis=-2).reshape(*lead, 2 * half, n_out)
  values = jnp.asarray(NF4)[codes.astype(jnp.int32)]
  absmax = q["nf4_absmax"].astype(jnp.float32) / 255.0 * q["nf4_scale"].astype(jnp.float32)
  blocks = values.reshape(*lead, 2 * half // BLOCK, BLOCK, n_out) * absmax[..., None, :]
  return blocks.reshape(*lead, 2 * half, n_out).astype(dtype)


def abstract(shape_in_out: tuple[int, ...]) -> dict:
  """ShapeDtypeStructs of quantize() for a (..., in, out) weight."""
  *lead, n_in, n_out = shape_in_out
  return {"nf4_codes": jax.ShapeDtypeStruct((*lead, n_in // 2, n_out), jnp.uint8),
          "nf4_absmax": jax.ShapeDtypeStruct((*lead, n_in // BLOCK, n_out), jnp.uint8),
          "nf4_scale": jax.ShapeDtypeStruct((*lead, 1, n_out), jnp.float32)}


def is_quantized(x) -> bool:
  return isinstance(x, dict) and "nf4_codes" in x
