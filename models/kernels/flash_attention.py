"""Flash attention in Pallas, masked by FlashMask column bands, with a custom VJP.

    out, lse = flash_attention(q, k, v, mask)

q (batch, q_len, heads, head_dim); k, v (batch, k_len, kv_heads, head_dim) with heads a
multiple of kv_heads (GQA/MQA: query head h reads KV head h // group through the BlockSpec index
map, so K and V are never repeated). `mask` is a `FlashMask` over these rows and keys, or None for
full (non-causal) attention. out is normalised, lse (batch, q_len, heads) float32 is the log of the
softmax denominator (-inf for a row that sees no key; its output is 0).

The work is cut into (block_q x block_k) tiles. Before the kernels run, the tiles are classified
from per-key-block minima and maxima of the mask vectors (`flashmask.tile_kinds`): a fully
masked tile is never loaded, a fully visible one is computed without building its mask, only
partial tiles evaluate the bands. Each grid program also gets the first and last tile it needs,
so a causal row block loops over the keys up to its diagonal only.

Three kernels, all with an inner loop over tiles (FlashAttention-2):
  forward  grid (batch, heads, query blocks): online softmax over key blocks.
  dq       grid (batch, heads, query blocks): recompute the probabilities, accumulate dq.
  dk, dv   grid (batch, kv_heads, key blocks): loop over the query heads of the group and the
           query blocks, accumulate dk and dv, so GQA gradients need no atomic adds.
Lengths that are not a multiple of the blocks are padded; padded keys are masked out by the
vectors, padded query rows are dropped. A head_dim that is not a power of two is zero-padded
(Triton needs power-of-two tiles); the scale uses the real head_dim.

On a GPU the kernels lower through Triton, on a TPU through Mosaic, elsewhere (CPU) they run in
Pallas' interpreter, which is how the tests check them against a dense reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from models.kernels import flashmask as fm

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # "masked" score: finite, so no inf - inf


def _pow2_at_least(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def default_block(length: int) -> int:
  """128, or the smallest power of two >= 16 that covers a shorter sequence."""
  return min(128, max(16, _pow2_at_least(length)))


def _visible(rows, lts, lte, uts, ute):
  """(block_q, block_k) booleans of one tile: rows (block_q, 1), band vectors (1, block_k)."""
  return ~(((rows >= lts) & (rows < lte)) | ((rows >= uts) & (rows < ute)))


def _scores(q, k, scale, softcap, bias=None):
  """float32 scores of a tile and, with a soft-cap, tanh(raw / cap) for the backward pass;
  `bias` (ALiBi's, a constant of the tile) is added after the cap."""
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  s = s * scale
  t = None
  if softcap:
    t = jnp.tanh(s / softcap)
    s = softcap * t
  if bias is not None:
    s = s + bias
  return s, t


def _alibi_bias(slope_ref, q_pos, k_pos):
  """ALiBi over one tile, computed here from positions: -slope * (query pos - key pos), for
  q_pos (block_q, 1) and k_pos (1, block_k) float32; None without ALiBi."""
  if slope_ref is None:
    return None
  return slope_ref[...] * (k_pos - q_pos)


def _split_refs(refs, alibi: bool, n_rest: int):
  """A kernel's refs after the mask vectors: (slope, q positions, key positions) or Nones, then
  the `n_rest` others."""
  if alibi:
    return refs[:3], refs[3:]
  assert len(refs) == n_rest
  return (None, None, None), refs


def _rows(block, size):
  return block * size + jax.lax.broadcasted_iota(jnp.int32, (size, 1), 0)


def _tile_loop(kinds_ref, bounds_ref, where, body, carry):
  """Run body(tile, carry, masked) over the tiles of this program's row (or column) of tiles.

  kinds_ref and bounds_ref are whole arrays (scalar memory on TPU); `where` = (batch, block)
  picks this program's row of them. SKIP tiles cost a scalar read; FULL ones build no mask.
  """
  b, i = where

  def step(j, carry):
    kind = kinds_ref[b, i, j]
    return jax.lax.cond(
        kind == fm.SKIP, lambda c: c,
        lambda c: jax.lax.cond(kind == fm.FULL, functools.partial(body, j, masked=False),
                               functools.partial(body, j, masked=True), c), carry)

  return jax.lax.fori_loop(bounds_ref[b, i, 0], bounds_ref[b, i, 1], step, carry)


# ----------------------------------------------------------------------------------------------
# Kernels. Refs carry one program's blocks; names follow the math (q, k, v, do, lse, delta).
# Everything in a kernel is 2-D (row vectors (n, 1), column vectors (1, n)) as Mosaic wants.
# ----------------------------------------------------------------------------------------------


def _forward_kernel(kinds_ref, bounds_ref, lts_ref, lte_ref, uts_ref, ute_ref, *refs, scale,
                    softcap, block_q, block_k, alibi):
  (slope_ref, qpos_ref, kpos_ref), (q_ref, k_ref, v_ref, o_ref, lse_ref) = _split_refs(
      refs, alibi, 5)
  q = q_ref[...]
  q_pos = qpos_ref[...] if alibi else None
  i = pl.program_id(2)
  rows = _rows(i, block_q)

  def tile(j, carry, masked):
    o, m, l = carry
    cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    bias = _alibi_bias(slope_ref, q_pos, kpos_ref[:, cols]) if alibi else None
    s, _ = _scores(q, k_ref[cols, :], scale, softcap, bias)
    if masked:
      vis = _visible(rows, lts_ref[:, cols], lte_ref[:, cols], uts_ref[:, cols], ute_ref[:, cols])
      s = jnp.where(vis, s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if masked:
      p = jnp.where(vis, p, 0.0)
    alpha = jnp.exp(m - m_new)
    v = v_ref[cols, :]
    o = o * alpha + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o, m_new, l * alpha + p.sum(axis=1, keepdims=True)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q, 1), _NEG, jnp.float32),
          jnp.zeros((block_q, 1), jnp.float32))
  o, m, l = _tile_loop(kinds_ref, bounds_ref, (pl.program_id(0), i), tile, init)
  seen = l > 0
  l = jnp.where(seen, l, 1.0)
  o_ref[...] = (o / l).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l), -jnp.inf)


def _probs_and_dscores(q, k, v, do, lse, delta, rows, vectors, scale, softcap, masked,
                       bias=None):
  """Recomputed probabilities p and d(loss)/d(raw scaled scores) of one tile (ALiBi's `bias`
  is a constant: it changes p, not the rule)."""
  s, t = _scores(q, k, scale, softcap, bias)
  p = jnp.exp(s - lse)  # lse = +inf for rows that see nothing: p = 0
  if masked:
    p = jnp.where(_visible(rows, *vectors), p, 0.0)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds = p * (dp - delta)
  if softcap:
    ds = ds * (1.0 - t * t)
  return p, ds


def _dq_kernel(kinds_ref, bounds_ref, lts_ref, lte_ref, uts_ref, ute_ref, *refs, scale, softcap,
               block_q, block_k, alibi):
  (slope_ref, qpos_ref, kpos_ref), (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                                    dq_ref) = _split_refs(refs, alibi, 7)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_pos = qpos_ref[...] if alibi else None
  i = pl.program_id(2)
  rows = _rows(i, block_q)

  def tile(j, dq, masked):
    cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k = k_ref[cols, :]
    vectors = (lts_ref[:, cols], lte_ref[:, cols], uts_ref[:, cols], ute_ref[:, cols])
    bias = _alibi_bias(slope_ref, q_pos, kpos_ref[:, cols]) if alibi else None
    _, ds = _probs_and_dscores(q, k, v_ref[cols, :], do, lse, delta, rows, vectors, scale,
                               softcap, masked, bias)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = _tile_loop(kinds_ref, bounds_ref, (pl.program_id(0), i), tile,
                  jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(kinds_ref, bounds_ref, lts_ref, lte_ref, uts_ref, ute_ref, *refs, scale, softcap,
                block_q, block_k, group, alibi):
  (slopes_ref, qpos_ref, kpos_ref), (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                                     dv_ref) = _split_refs(refs, alibi, 8)
  k, v = k_ref[...], v_ref[...]
  vectors = (lts_ref[...], lte_ref[...], uts_ref[...], ute_ref[...])
  k_pos = kpos_ref[...] if alibi else None
  where = (pl.program_id(0), pl.program_id(2))

  def head(h, carry):
    def tile(i, carry, masked):
      dk, dv = carry
      at = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
      q, do = q_ref[h, at, :], do_ref[h, at, :]
      bias = (slopes_ref[pl.ds(h, 1), :] * (k_pos - qpos_ref[at, :])) if alibi else None
      p, ds = _probs_and_dscores(q, k, v, do, lse_ref[h, at, :], delta_ref[h, at, :],
                                 _rows(i, block_q), vectors, scale, softcap, masked, bias)
      contract_rows = (((0,), (0,)), ((), ()))
      dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, contract_rows,
                                    preferred_element_type=jnp.float32)
      dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, contract_rows,
                                    preferred_element_type=jnp.float32)
      return dk, dv

    return _tile_loop(kinds_ref, bounds_ref, where, tile, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# Wrappers: layout (batch, heads, length, head_dim) inside, padding, tile plans.
# ----------------------------------------------------------------------------------------------


def _tile_bounds(kinds):
  """For each row of tiles (..., n): [first, last + 1) of its non-SKIP tiles, (0, 0) if none."""
  n = kinds.shape[-1]
  live = kinds != fm.SKIP
  idx = jnp.arange(n, dtype=jnp.int32)
  first = jnp.min(jnp.where(live, idx, n), axis=-1)
  last = jnp.max(jnp.where(live, idx + 1, 0), axis=-1)
  return jnp.stack([jnp.minimum(first, last), last], axis=-1).astype(jnp.int32)


def _pad(x, axis, size):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _flash(q, k, v, vectors, alibi, scale, softcap, block_q, block_k, backend, out_dtype):
  return _forward(q, k, v, vectors, alibi, scale, softcap, block_q, block_k, backend,
                  out_dtype)[0]


def _plan(vectors, q_len, block_q, block_k):
  mask = fm.FlashMask(*(x[:, 0] for x in vectors))
  kinds = fm.tile_kinds(mask, q_len, block_q, block_k).astype(jnp.int32)
  return kinds, _tile_bounds(kinds)


def _lowering(backend: str, head_dim: int) -> dict:
  """pallas_call arguments per backend: Pallas' interpreter on CPU, Triton on NVIDIA/AMD GPUs
  (jax's default there is Mosaic GPU, which wants another kernel style), Mosaic on TPU."""
  if backend == "cpu":
    return dict(interpret=True)
  if backend == "gpu":
    return dict(compiler_params=pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8,
                                                        num_stages=2))
  if backend == "tpu":
    return dict(compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary")))
  raise ValueError(f"flash_attention: no Pallas lowering for backend {backend!r}")


def _whole(backend):
  """A whole small int32 array read by scalar: tile kinds and bounds (SMEM on TPU)."""
  return pl.BlockSpec(memory_space=pltpu.SMEM) if backend == "tpu" else pl.BlockSpec()


def _alibi_specs(alibi, block_q, s):
  """BlockSpecs of ALiBi's (slopes (heads, 1, 1), query positions (b, t, 1), key positions
  (b, 1, s)) for a (batch, head, query block) grid; [] without ALiBi."""
  if alibi is None:
    return []
  return [pl.BlockSpec((None, 1, 1), lambda b_, h_, i: (h_, 0, 0)),
          pl.BlockSpec((None, block_q, 1), lambda b_, h_, i: (b_, i, 0)),
          pl.BlockSpec((None, 1, s), lambda b_, h_, i: (b_, 0, 0))]


def _forward(q, k, v, vectors, alibi, scale, softcap, block_q, block_k, backend, out_dtype):
  b, h, t, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  group = h // kv
  kinds, bounds = _plan(vectors, t, block_q, block_k)
  kernel = functools.partial(_forward_kernel, scale=scale, softcap=softcap, block_q=block_q,
                             block_k=block_k, alibi=alibi is not None)
  q_spec = pl.BlockSpec((None, None, block_q, d), lambda b_, h_, i: (b_, h_, i, 0))
  row_spec = pl.BlockSpec((None, None, block_q, 1), lambda b_, h_, i: (b_, h_, i, 0))
  kv_spec = pl.BlockSpec((None, None, s, d), lambda b_, h_, i: (b_, h_ // group, 0, 0))
  mask_spec = pl.BlockSpec((None, 1, s), lambda b_, h_, i: (b_, 0, 0))
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, h, t // block_q),
      in_specs=[_whole(backend), _whole(backend), *[mask_spec] * 4,
                *_alibi_specs(alibi, block_q, s), q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, out_dtype),
                 jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32)],
      name="flashmask_attention_forward",
      **_lowering(backend, d),
  )(kinds, bounds, *vectors, *(alibi or ()), q, k, v)
  return (out, lse), (q, k, v, vectors, alibi, out, lse)


def _flash_fwd(q, k, v, vectors, alibi, scale, softcap, block_q, block_k, backend, out_dtype):
  return _forward(q, k, v, vectors, alibi, scale, softcap, block_q, block_k, backend, out_dtype)


def _flash_bwd(scale, softcap, block_q, block_k, backend, out_dtype, residuals, cotangents):
  q, k, v, vectors, alibi, out, lse = residuals
  do, dlse = cotangents
  b, h, t, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  group = h // kv
  # d(lse)/d(scores) is the probabilities, so an lse cotangent only shifts delta.
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True) - dlse
  lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)  # rows that see nothing: p = exp(-inf) = 0
  kinds, bounds = _plan(vectors, t, block_q, block_k)
  do = do.astype(q.dtype)
  common = dict(scale=scale, softcap=softcap, block_q=block_q, block_k=block_k,
                alibi=alibi is not None)

  q_spec = pl.BlockSpec((None, None, block_q, d), lambda b_, h_, i: (b_, h_, i, 0))
  row_spec = pl.BlockSpec((None, None, block_q, 1), lambda b_, h_, i: (b_, h_, i, 0))
  kv_full = pl.BlockSpec((None, None, s, d), lambda b_, h_, i: (b_, h_ // group, 0, 0))
  mask_full = pl.BlockSpec((None, 1, s), lambda b_, h_, i: (b_, 0, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common),
      grid=(b, h, t // block_q),
      in_specs=[_whole(backend), _whole(backend), *[mask_full] * 4,
                *_alibi_specs(alibi, block_q, s), q_spec, kv_full, kv_full, q_spec, row_spec,
                row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      name="flashmask_attention_dq",
      **_lowering(backend, d),
  )(kinds, bounds, *vectors, *(alibi or ()), q, k, v, do, lse, delta)

  kinds_t = kinds.transpose(0, 2, 1)  # (b, key blocks, query blocks)
  kv_spec = pl.BlockSpec((None, None, block_k, d), lambda b_, g_, j: (b_, g_, j, 0))
  q_group = pl.BlockSpec((None, group, t, d), lambda b_, g_, j: (b_, g_, 0, 0))
  rows_group = pl.BlockSpec((None, group, t, 1), lambda b_, g_, j: (b_, g_, 0, 0))
  mask_cols = pl.BlockSpec((None, 1, block_k), lambda b_, g_, j: (b_, 0, j))
  alibi_specs, alibi_args = [], ()
  if alibi is not None:  # a group's slopes, every query row's position, this block's keys'
    slopes, q_pos, k_pos = alibi
    alibi_specs = [pl.BlockSpec((None, group, 1), lambda b_, g_, j: (g_, 0, 0)),
                   pl.BlockSpec((None, t, 1), lambda b_, g_, j: (b_, 0, 0)), mask_cols]
    alibi_args = (slopes.reshape(kv, group, 1), q_pos, k_pos)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, group=group, **common),
      grid=(b, kv, s // block_k),
      in_specs=[_whole(backend), _whole(backend), *[mask_cols] * 4, *alibi_specs,
                q_group, kv_spec, kv_spec, q_group, rows_group, rows_group],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      name="flashmask_attention_dkv",
      **_lowering(backend, d),
  )(kinds_t, _tile_bounds(kinds_t), *vectors, *alibi_args, q, k, v, do, lse, delta)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, mask: fm.FlashMask | None = None, *, scale: float | None = None,
                    softcap: float = 0.0, alibi=None,
                    block_q: int | None = None, block_k: int | None = None,
                    backend: str | None = None, out_dtype=None) -> tuple[jax.Array, jax.Array]:
  """(out (batch, q_len, heads, head_dim) in `out_dtype` (default q's), lse (batch, q_len, heads)
  float32).

  `mask` vectors are (batch, k_len) over query rows 0..q_len-1; None: every row sees every key.
  `scale`: scores are q.k * scale, default head_dim ** -0.5.
  `softcap`: scores become softcap * tanh(scores / softcap) (Gemma 2); 0 is off.
  `alibi`: (slopes (heads,), query positions (batch, q_len), key positions (batch, k_len)):
  each score plus -slope * (query position - key position), computed per tile inside the
  kernels (BLOOM); None is off.
  `backend`: "gpu" (Triton), "tpu" (Mosaic) or "cpu" (Pallas' interpreter); default: jax's.
  """
  b, t, h, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  if h % kv or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"flash_attention: q {q.shape} with k {k.shape} and v {v.shape}: need "
                     "(batch, length, heads, head_dim) with heads a multiple of kv_heads")
  if mask is None:
    mask = fm.full(b, s, t)
  if mask.lts.shape != (b, s):
    raise ValueError(f"flash_attention: mask vectors {mask.lts.shape} do not match the keys {(b, s)}")
  block_q = block_q or default_block(t)
  block_k = block_k or default_block(s)
  backend = backend or jax.default_backend()
  t_pad, s_pad = -(-t // block_q) * block_q, -(-s // block_k) * block_k
  d_pad = max(16, _pow2_at_least(d))  # Triton's dot wants power-of-two tiles of at least 16
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block < 16 or block & (block - 1):
      raise ValueError(f"flash_attention: {name}={block} must be a power of two >= 16")
  if backend == "tpu" and block_k % 128 and block_k != s_pad:
    raise ValueError(f"flash_attention: on TPU block_k={block_k} must be a multiple of 128 or "
                     "cover all keys")

  # Padded key columns are hidden from every row by both bands, and band ends at the last row
  # move to the padded end, so that padded rows and columns never spoil a tile's min/max.
  def vector(x, pad_value):
    x = jnp.asarray(x, jnp.int32)
    x = jnp.where(x >= t, t_pad, x)
    return jnp.pad(x, ((0, 0), (0, s_pad - s)), constant_values=pad_value)[:, None, :]

  vectors = (vector(mask.lts, 0), vector(mask.lte, t_pad), vector(mask.uts, 0),
             vector(mask.ute, t_pad))  # (b, 1, keys)
  q_, k_, v_ = (_pad(_pad(x, 1, n), 3, d_pad).transpose(0, 2, 1, 3)
                for x, n in ((q, t_pad), (k, s_pad), (v, s_pad)))
  scale = d ** -0.5 if scale is None else scale
  if alibi is not None:  # float32 positions (exact below 2^24), padded rows and keys at 0
    slopes, q_pos, k_pos = alibi
    alibi = (jnp.asarray(slopes, jnp.float32).reshape(h, 1, 1),
             _pad(jnp.asarray(q_pos, jnp.float32), 1, t_pad)[:, :, None],
             _pad(jnp.asarray(k_pos, jnp.float32), 1, s_pad)[:, None, :])
  out, lse = _flash(q_, k_, v_, vectors, alibi, float(scale), float(softcap), block_q, block_k,
                    backend, jnp.dtype(out_dtype or q.dtype))
  return out.transpose(0, 2, 1, 3)[:, :t, :, :d], lse[..., 0].transpose(0, 2, 1)[:, :t]
