"""Building blocks of a Llama-family decoder: RMSNorm, rotary embeddings, attention, SwiGLU MLP.

Every parameter carries logical axis names (`out_sharding`); `parallel/rules.py` maps them to a
mesh. Parameters are stored in whatever dtype the trainer gives them; a layer computes in the dtype
of its inputs and parameters, except norms and softmax, which run in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.config import Execution, ModelConfig
from models.kernels import flashmask as fm
from models.kernels import matmul as matmul_lib
from models.kernels.matmul import LOW_PRECISION, mm, mm_nt, mm_tn
from models.kernels.flash_attention import flash_attention
from models.quant import uniform as uniform_quant
from parallel import ring_attention as ring_attention_lib
from parallel import rules as rules_lib
from parallel.ring_attention import ring_attention
from parallel.rules import constrain


def param(rngs: nnx.Rngs, shape, axes, std: float | None, dtype=jnp.float32) -> nnx.Param:
  """A parameter: normal(0, std) (ones when std is None, zeros when std == 0) with logical axes.

  `eager_sharding=False`: the trainer places parameters itself, through `jit(out_shardings=...)`.
  """
  if std is None:
    value = jnp.ones(shape, dtype)
  elif std == 0:
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale; with `offset` (Gemma) * (1 + scale), the scale starting at 0. `axis`:
  the logical name of the normalised dimension (Qwen3's query/key norms: head_dim). `dim` and
  `axis` may be tuples: the trailing dimensions normalised together (OLMo 2's query/key norms:
  heads and head_dim)."""

  def __init__(self, dim: int | tuple[int, ...], eps: float, rngs: nnx.Rngs,
               offset: bool = False, axis: str | tuple[str, ...] = "embed"):
    dims, axes = ((dim,), (axis,)) if isinstance(dim, int) else (tuple(dim), tuple(axis))
    self.eps, self.offset, self.n_axes = eps, offset, len(dims)
    self.scale = param(rngs, dims, axes, std=0 if offset else None)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    over = tuple(range(-self.n_axes, 0))
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=over, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (x32 * (1.0 + scale if self.offset else scale)).astype(x.dtype)


class LayerNorm(nnx.Module):
  """(x - mean(x)) / std(x) * scale + bias, in float32 (BLOOM)."""

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, (dim,), ("embed",), std=None)
    self.bias = param(rngs, (dim,), ("embed",), std=0)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  """The model's norm over d_model: RMSNorm (Gemma's with its offset), or BLOOM's LayerNorm."""
  if cfg.layer_norm:
    return LayerNorm(cfg.d_model, cfg.norm_eps, rngs)
  return RMSNorm(cfg.d_model, cfg.norm_eps, rngs, offset=cfg.norm_offset)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings
# ----------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig, seq_len) -> tuple[jax.Array, jax.Array | float]:
  """(inverse frequencies (head_dim // 2,), attention factor) after the configured scaling, for
  rows whose positions reach `seq_len` - 1 (a Python int or a traced scalar). The attention factor
  multiplies cos and sin, so the attention logits by its square (YaRN's temperature).

  linear (position interpolation): every frequency divided by `rope_factor`.
  ntk (NTK-aware): the base grows to theta * factor ** (d / (d - 2)): low frequencies are
    interpolated, high ones barely move.
  dynamic (dynamic NTK): the same, with the factor grown to what `seq_len` needs past the
    original length L (`rope_original_max_len`): theta * (factor * seq_len / L - (factor - 1))
    ** (d / (d - 2)).
  llama3 (Llama 3.1): wavelengths longer than original / low_freq_factor are divided by
    `rope_factor`, shorter than original / high_freq_factor kept, smoothly blended between.
  yarn: frequencies that turn fewer than beta_slow times over `rope_original_max_len`
    interpolated, more than beta_fast kept, a linear ramp between; attention factor
    0.1 ln(factor) + 1 unless `rope_attention_factor` gives one.
  longrope (Phi-3): each frequency divided by its own factor, `rope_long_factor` when `seq_len`
    passes `rope_original_max_len`, else `rope_short_factor`; attention factor
    sqrt(1 + ln(factor) / ln(original)) unless given.
  """
  d, kind, factor = cfg.head_dim, cfg.rope_scaling, cfg.rope_factor
  exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
  theta = cfg.rope_theta
  if kind == "ntk":
    theta = theta * factor ** (d / (d - 2))
  elif kind == "dynamic":  # (no change within the original length: the ratio is 1 there)
    orig = cfg.rope_original_max_len
    theta = theta * (factor * jnp.maximum(seq_len, orig) / orig - (factor - 1)) ** (d / (d - 2))
  inv_freq = 1.0 / (theta ** exponents)
  attention = cfg.rope_attention_factor or 1.0
  if kind == "linear":
    inv_freq = inv_freq / factor
  elif kind == "llama3":
    orig = cfg.rope_original_max_len
    low_wavelen = orig / cfg.rope_low_freq_factor
    high_wavelen = orig / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = jnp.where(wavelen > low_wavelen, inv_freq / factor,
                         jnp.where(wavelen < high_wavelen, inv_freq, blended))
  elif kind == "yarn":
    def dim_of(rotations):  # the dimension whose frequency turns `rotations` times over orig
      return d * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (
          2 * math.log(cfg.rope_theta))
    low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
    if cfg.rope_truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
      high += 0.001
    ramp = jnp.clip((jnp.arange(d // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if not cfg.rope_attention_factor:
      attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
  elif kind == "longrope":
    orig = cfg.rope_original_max_len
    ext = jnp.where(seq_len > orig, jnp.asarray(cfg.rope_long_factor, jnp.float32),
                    jnp.asarray(cfg.rope_short_factor, jnp.float32))
    inv_freq = inv_freq / ext
    if not cfg.rope_attention_factor:
      attention = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
  return inv_freq, attention


def rope_tables(cfg: ModelConfig, positions_bt: jax.Array,
                local: bool = False) -> tuple[jax.Array, jax.Array]:
  """cos and sin, each (batch, length, head_dim) in float32, for the half-split convention. The
  length the scaling sees (dynamic, longrope) is the largest position + 1, as transformers'.
  `local`: the sliding-window layers' tables of a model with `rope_local_theta` (Gemma 3: their
  own base, no scaling)."""
  if local:
    cfg = dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling="none",
                              rope_attention_factor=0.0)
  inv_freq, attention = rope_inv_freq(cfg, jnp.max(positions_bt) + 1)
  angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # (b, t, head_dim/2)
  angles = jnp.concatenate([angles, angles], axis=-1)
  if isinstance(attention, float) and attention == 1.0:
    return jnp.cos(angles), jnp.sin(angles)
  return jnp.cos(angles) * attention, jnp.sin(angles) * attention


def apply_rope(x_bthd, cos_btd, sin_btd):
  x = x_bthd.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]
  return out.astype(x_bthd.dtype)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def attention_mask(pos_q, seg_q, pos_k, seg_k, sliding_window: int = 0,
                   shared_prompt: int = 0) -> jax.Array:
  """Boolean (batch, 1, 1, q_len, k_len): same segment, causal by position, inside the window.

  Rows of a packed batch hold several examples; segment ids keep attention inside each. Using
  positions rather than array indices keeps the mask right when the sequence is reordered
  (load-balanced ring attention). Keys of segment `fm.VIRTUAL` (virtual tokens of prompt and
  prefix tuning, at positions before every real token) are seen by every segment, outside any
  window. `shared_prompt` = n answers per prompt (preference rows, trainer/data/pairs.py: 2; a
  group of n completions of one prompt: n): with g = n + 1, segment g k + 1 (group k's prompt)
  is also seen by g k + 2 .. g k + g (its answers).
  """
  virtual = (seg_k == fm.VIRTUAL)[:, None, :]
  causal = pos_k[:, None, :] <= pos_q[:, :, None]
  if sliding_window:
    causal &= (pos_q[:, :, None] - pos_k[:, None, :] < sliding_window) | virtual
  same = seg_q[:, :, None] == seg_k[:, None, :]
  g = fm.group_width(shared_prompt)
  if g:
    prompt_k = ((seg_k > 0) & ((seg_k - 1) % g == 0))[:, None, :]
    same |= prompt_k & (((seg_q - 1) // g)[:, :, None] == ((seg_k - 1) // g)[:, None, :])
  mask = (same | virtual) & causal
  return mask[:, None, None]


def dense(x, w, n_in: int = 1, out_dtype=None):
  """Contract the last `n_in` dims of x with the first `n_in` of w, as one 2-D matmul.

  (batch, length, ...) is flattened first: XLA:CPU runs the backward pass of a 2-D matmul about
  twice as fast as that of the same product written as a 3-D einsum (benchmarks/).
  """
  lead, k = x.shape[:x.ndim - n_in], math.prod(w.shape[:n_in])
  y = matmul(x.reshape(-1, k), w.reshape(k, -1), out_dtype)
  return y.reshape(*lead, *w.shape[n_in:])


PROJECTION = "projection"  # the checkpoint name of low_precision_matmul's outputs


def matmul(x2, w2, out_dtype=None):
  """x2 (m, k) @ w2 (k, n), in `out_dtype` (default: x2's dtype).

  bfloat16 / float16 operands of one dtype, where the library forms are used
  (models/kernels/matmul.py `library_forms`), go through `low_precision_matmul` (its output
  named PROJECTION for the remat policies); anything else is a plain matmul."""
  if x2.dtype == w2.dtype and x2.dtype in LOW_PRECISION and matmul_lib.library_forms():
    # Named: the dots remat policies would take a custom VJP's output for no matmul.
    return checkpoint_name(low_precision_matmul(x2, w2, jnp.dtype(out_dtype or x2.dtype)),
                           PROJECTION)
  return jnp.matmul(x2, w2, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def low_precision_matmul(x2, w2, out_dtype):
  """x2 @ w2 for bfloat16 / float16 x2 (m, k) and w2 (k, n): products summed in float32, the
  result rounded to `out_dtype`; the backward's two products through `mm_nt` and `mm_tn`, after
  rounding the output gradient to the operands' dtype, as mixed-precision training does (torch's
  autocast too). The weight gradient comes out in w2's dtype."""
  return mm(x2, w2, out_dtype)


def _low_precision_fwd(x2, w2, out_dtype):
  return mm(x2, w2, out_dtype), (x2, w2)


def _low_precision_bwd(out_dtype, saved, dy):
  x2, w2 = saved
  dy = dy.astype(x2.dtype)
  return mm_nt(dy, w2), mm_tn(x2, dy, w2.dtype)


low_precision_matmul.defvjp(_low_precision_fwd, _low_precision_bwd)


LOW_RANK_OUTPUT = "low_rank_dense"  # the checkpoint name of low_rank_dense's outputs


class LowRank(NamedTuple):
  """A weight's low-rank change scale * a @ b (LoRA in a training step): `project` applies
  w + scale * a @ b through `low_rank_dense`."""
  a: jax.Array  # (features in, r)
  b: jax.Array  # (r, features out)
  scale: float


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def low_rank_dense(x2, w2, a, b, scale):
  """x2 @ (w2 + scale * a @ b) for x2 (tokens, in), as one matmul with the folded weight, whose
  backward pass takes the gradients of a and b through rank-r products, x^T (dy b^T) and
  (x a)^T dy, instead of through the full (in x out) gradient of the folded weight, and dx
  through the folded weight again. The gradient of w2 is x^T dy, which XLA drops as dead code
  when w2 is frozen (nothing asks for it). Products as `mm`, `mm_nt` and `mm_tn` write them."""
  return mm(x2, _folded(w2, a, b, scale, x2.dtype))


def _folded(w2, a, b, scale, dtype):
  return w2.astype(dtype) + jnp.asarray(scale, dtype) * mm(a.astype(dtype), b.astype(dtype))


def _low_rank_fwd(x2, w2, a, b, scale):
  return mm(x2, _folded(w2, a, b, scale, x2.dtype)), (x2, w2, a, b)


def _low_rank_bwd(scale, saved, dy):
  x2, w2, a, b = saved
  s = jnp.asarray(scale, x2.dtype)
  dy = dy.astype(x2.dtype)
  dx = mm_nt(dy, _folded(w2, a, b, scale, x2.dtype))
  da = mm_tn(s * x2, mm_nt(dy, b.astype(dy.dtype)))
  db = mm_tn(s * mm(x2, a.astype(x2.dtype)), dy)
  return dx, mm_tn(x2, dy, w2.dtype), da.astype(a.dtype), db.astype(b.dtype)


low_rank_dense.defvjp(_low_rank_fwd, _low_rank_bwd)


class ActQuant(NamedTuple):
  """W8A8 (models/quant/model.py): a projection's inputs divided by per-channel smoothing
  scales (SmoothQuant) and quantized to int8 before the matmul, with one static scale or, where
  `scale` is None, each token's own (its absmax / 127)."""
  inv_smooth: jax.Array | None  # (features in,)
  scale: jax.Array | None  # ()


INT8 = uniform_quant.Scheme(8, True)


class QtDot(NamedTuple):
  """Quantized training (quant.mode=qt): a projection's matmul as qwix's quantized dot_general,
  both operands quantized (inputs per token, weights per output channel) in the forward pass
  and the incoming gradients in the backward pass, to `dtype` (jnp.int8)."""
  dtype: Any


@functools.lru_cache(maxsize=None)
def _qt_config(dtype):
  from qwix._src.core import dot_general_qt  # (qwix 0.1.8, pinned: its quantized-training dot)
  return dot_general_qt.DotGeneralQtConfig(lhs_qtype=dtype, rhs_qtype=dtype,
                                           dlhs_grad_qtype=dtype, drhs_grad_qtype=dtype)


def qt_matmul(x2, w2, dtype):
  from qwix._src.core import dot_general_qt
  return dot_general_qt.dot_general_qt(x2, w2, (((1,), (0,)), ((), ())), _qt_config(dtype))


def project(x, w, delta=None, n_in: int = 1):
  """dense(x, w), plus delta(x) when given: a function of the inputs flattened to
  (tokens, features in) giving (tokens, features out), e.g. a LoRA path with dropout; or, for a
  `LowRank` delta, x @ (w + scale * a @ b) through `low_rank_dense`; or, for an `ActQuant`, the
  inputs quantized first."""
  if isinstance(delta, QtDot):
    lead, k = x.shape[:x.ndim - n_in], math.prod(w.shape[:n_in])
    y = qt_matmul(x.reshape(-1, k), w.reshape(k, -1).astype(x.dtype), delta.dtype)
    return y.reshape(*lead, *w.shape[n_in:])
  if isinstance(delta, ActQuant):
    flat = x.reshape(*x.shape[:x.ndim - n_in], -1)
    if delta.inv_smooth is not None:
      flat = flat * delta.inv_smooth.astype(x.dtype)
    if delta.scale is None:  # per token, from its own range (held constant in the gradient)
      top = jnp.max(jnp.abs(jax.lax.stop_gradient(flat)), axis=-1, keepdims=True)
      scale = jnp.maximum(top, jnp.finfo(x.dtype).tiny) / INT8.qmax
    else:
      scale = delta.scale.astype(x.dtype)
    x = uniform_quant.fake_quant(flat, scale, None, INT8).reshape(x.shape)
    return dense(x, w, n_in)
  if isinstance(delta, LowRank):
    lead, k = x.shape[:x.ndim - n_in], math.prod(w.shape[:n_in])
    y = low_rank_dense(x.reshape(-1, k), w.reshape(k, -1), delta.a, delta.b, delta.scale)
    # The remat policies see a custom VJP's output as no matmul: named, the dots policies keep
    # it as they keep every other projection (models/decoder.py REMAT_POLICIES).
    y = checkpoint_name(y, LOW_RANK_OUTPUT)
    return y.reshape(*lead, *w.shape[n_in:])
  y = dense(x, w, n_in)
  if delta is None:
    return y
  lead = x.shape[:x.ndim - n_in]
  return y + delta(x.reshape(math.prod(lead), -1)).reshape(y.shape).astype(y.dtype)


# The xla path's query blocks in training and evaluation (see `dot_product_attention`).
QUERY_BLOCKS = 4


def query_blocks(length: int) -> int:
  """How many query blocks the xla path runs a row of `length` tokens in: QUERY_BLOCKS from
  256 tokens on (blocks of 64 rows or more) when it divides the length, else 1."""
  return QUERY_BLOCKS if length >= 256 and length % QUERY_BLOCKS == 0 else 1


def alibi_slopes(n_heads: int) -> np.ndarray:
  """ALiBi's per-head slopes (Press et al.; BLOOM's): for n a power of two, 2^(-8i/n) for head
  i = 1..n; otherwise those of the power of two below, then every other slope of the one above."""
  def powers(n):
    start = 2.0 ** (-8.0 / n)
    return start ** np.arange(1, n + 1)
  below = 2 ** math.floor(math.log2(n_heads))
  slopes = powers(below)
  if below != n_heads:
    slopes = np.concatenate([slopes, powers(2 * below)[0::2][:n_heads - below]])
  return slopes.astype(np.float32)


class Alibi(NamedTuple):
  """What ALiBi's bias -slope_h * (query position - key position) is computed from, inside the
  score function (no (heads, q_len, k_len) tensor is kept for the backward pass)."""
  slopes: jax.Array  # (kv_heads, group) float32: each query head's slope
  q_pos: jax.Array  # (batch, q_len) int32
  k_pos: jax.Array  # (batch, k_len) int32


def dot_product_attention(q_bthd, k_bskd, v_bskd, mask, scale=None, softcap=0.0, blocks=1,
                          alibi: Alibi | None = None, prefix_gate=None):
  """Grouped-query attention without repeating K/V; the output in q's dtype.

  On CPU bfloat16 / float16 q, k, v are upcast to float32 first: XLA:CPU converted them for
  these batched products anyway, and the upcast forward + backward ran 0.95x the time of
  leaving them in bf16 on a Sapphire Rapids host (benchmarks/attention_cpu.py --dtype bfloat16).
  Accelerators take the products in their dtype (float32 accumulation either way).

  `mask` (batch, 1, 1, q_len, k_len) booleans. Scores are q.k * scale (default head_dim ** -0.5),
  then softcap * tanh(scores / softcap) when `softcap` is set (Gemma 2), then a float32 softmax.
  The query heads of each KV head are folded into the query length, so both products are plain
  batched matmuls over (batch, kv_heads): (group * q_len, d) x (d, k_len).

  `blocks` > 1 (queries and keys the same sequence): the queries run in that many blocks and
  block i reads only the keys up to its own last row, skipping the upper triangle of the score
  matrix. That is exact for every mask `attention_inputs` builds, since none lets a query see a
  key later in its row (causal by position, positions counting up along each segment; prompts
  before their answers). With 4 blocks it does 5/8 of the score work, and XLA:CPU runs the
  forward + backward pass in 0.53-0.70x the time of one block (benchmarks/attention_cpu.py).
  Each block is one `attend_block`, whose backward pass recomputes the probabilities.

  `alibi` (BLOOM): each score plus -slope_h * (query position - key position), after the scale;
  positions count per document, so packed rows keep their own distances.

  `prefix_gate` = (gate (batch, q_len), n), UniPELT's gated prefix: the first n keys and values
  (the prefix) are multiplied by each query's gate, i.e. their scores and their probabilities
  are (`gated_attend`, one block, plain autodiff).
  """
  b, t, h, d = q_bthd.shape
  s, kv = k_bskd.shape[1], k_bskd.shape[2]
  g = h // kv
  if prefix_gate is not None and blocks > 1:
    raise ValueError("a gated prefix runs as one query block")
  if blocks > 1 and (s != t or t % blocks):
    raise ValueError(f"{blocks} query blocks need as many keys as queries and a length they "
                     f"divide; got {t} queries and {s} keys")
  size = t // blocks
  scale = d ** -0.5 if scale is None else scale
  out_dtype = q_bthd.dtype
  if jax.default_backend() == "cpu":  # float32 operands (docstring); accelerators keep bf16
    q_bthd, k_bskd, v_bskd = (a.astype(jnp.float32) for a in (q_bthd, k_bskd, v_bskd))
  q = q_bthd.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # (b, kv, g, t, d)
  k = k_bskd.transpose(0, 2, 1, 3)  # (b, kv, s, d)
  v = v_bskd.transpose(0, 2, 1, 3)
  outs = []
  for i in range(blocks):
    lo, hi = i * size, (i + 1) * size
    end = s if blocks == 1 else hi
    qi = q[:, :, :, lo:hi].reshape(b, kv, g * size, d)
    part = None if alibi is None else alibi._replace(q_pos=alibi.q_pos[:, lo:hi],
                                                     k_pos=alibi.k_pos[:, :end])
    if prefix_gate is not None:
      out = gated_attend(qi, k, v, mask, part, g, scale, softcap, *prefix_gate)
    else:
      out = attend_block(qi, k[:, :, :end], v[:, :, :end], mask[..., lo:hi, :end], part, g,
                         scale, softcap)
    outs.append(out.reshape(b, kv, g, size, d))
  out = jnp.concatenate(outs, axis=3) if blocks > 1 else outs[0]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(out_dtype)


ATTENTION_BLOCK = "attention_block"  # the checkpoint name of attend_block's output and lse


def _block_scores(q, k, mask, alibi, g, scale, softcap, weights=None):
  """Masked float32 scores (b, kv, g * q_len, k_len), and tanh(scores / softcap) if capped.
  `weights` (broadcasting to (b, kv, g, q_len, k_len)) multiply the scaled products first."""
  b, kv, gq, _ = q.shape
  scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, kv, g, gq // g, k.shape[2]) * scale
  if weights is not None:
    scores = scores * weights
  capped = None
  if softcap:
    capped = jnp.tanh(scores / softcap)
    scores = softcap * capped
  if alibi is not None:
    distance = (alibi.q_pos[:, :, None] - alibi.k_pos[:, None, :]).astype(jnp.float32)
    scores = scores - alibi.slopes[None, :, :, None, None] * distance[:, None, None]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  return scores.reshape(b, kv, gq, k.shape[2]), capped


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def attend_block(q, k, v, mask, alibi, g, scale, softcap):
  """softmax(mask(q k^T * scale)) v in float32, for q (b, kv, g * q_len, d) (the query heads of
  each KV head folded into the length), k and v (b, kv, k_len, d), `mask` broadcasting to
  (b, kv, g, q_len, k_len).

  With a custom VJP in the manner of flash attention: the forward keeps the output and the
  log-sum-exp of each row (both under the checkpoint name ATTENTION_BLOCK, which the remat
  policies keep) instead of the probabilities; the backward recomputes the probabilities from
  the scores and the log-sum-exp and never reruns the product with v. On CPU the medium step's
  ratio to torch's went from 0.98 to 1.04 with it (BENCHMARKS.md). `alibi`: an Alibi or None."""
  return _attend_fwd(q, k, v, mask, alibi, g, scale, softcap)[0]


def _attend_fwd(q, k, v, mask, alibi, g, scale, softcap):
  scores, _ = _block_scores(q, k, mask, alibi, g, scale, softcap)
  top = jnp.max(scores, axis=-1, keepdims=True)
  probs = jnp.exp(scores - top)
  total = jnp.sum(probs, axis=-1, keepdims=True)
  out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / total
  lse = checkpoint_name(top + jnp.log(total), ATTENTION_BLOCK)
  out = checkpoint_name(out, ATTENTION_BLOCK)
  return out, (q, k, v, mask, alibi, out, lse)


def _attend_bwd(g, scale, softcap, saved, d_out):
  q, k, v, mask, alibi, out, lse = saved
  scores, capped = _block_scores(q, k, mask, alibi, g, scale, softcap)
  probs = jnp.exp(scores - lse)  # masked entries: exp(min - lse) = 0
  d_out = d_out.astype(jnp.float32)
  dv = jnp.einsum("bkqs,bkqd->bksd", probs, d_out)
  d_probs = jnp.einsum("bkqd,bksd->bkqs", d_out, v.astype(jnp.float32))
  d_scores = probs * (d_probs - jnp.sum(d_out * out, axis=-1, keepdims=True))
  if softcap:
    b, kv, gq, s = d_scores.shape
    d_scores = d_scores.reshape(b, kv, g, gq // g, s) * (1 - capped * capped)
    d_scores = d_scores.reshape(b, kv, gq, s)
  d_scores = d_scores * scale
  dq = jnp.einsum("bkqs,bksd->bkqd", d_scores, k.astype(jnp.float32))
  dk = jnp.einsum("bkqs,bkqd->bksd", d_scores, q.astype(jnp.float32))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


attend_block.defvjp(_attend_fwd, _attend_bwd)


def gated_attend(q, k, v, mask, alibi, g, scale, softcap, gate, n: int):
  """`attend_block`'s attention with the first n keys and values multiplied by a gate per
  query, gate (b, q_len): their products q.k and their probabilities are scaled by it (the
  softmax normalises over the gated scores). Plain autodiff, the probabilities kept."""
  b, kv, gq, _ = q.shape
  s = k.shape[2]
  w = jnp.broadcast_to(gate.astype(jnp.float32)[:, None, None, :, None], (b, 1, 1, gq // g, n))
  w = jnp.concatenate([w, jnp.ones((b, 1, 1, gq // g, s - n), jnp.float32)], axis=-1)
  scores, _ = _block_scores(q, k, mask, alibi, g, scale, softcap, w)
  probs = jax.nn.softmax(scores.reshape(b, kv, g, gq // g, s), axis=-1) * w
  return jnp.einsum("bkqs,bksd->bkqd", probs.reshape(b, kv, gq, s).astype(v.dtype), v,
                    preferred_element_type=jnp.float32)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, run: Execution, rngs: nnx.Rngs):
    self.cfg, self.impl = cfg, run.attention_impl
    d, h, k, hd, std = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, run.init_std
    self.q = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std)
    self.k = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), std)
    self.v = param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), std)
    self.o = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                   std / math.sqrt(2 * cfg.n_layers))
    if cfg.qkv_bias:
      self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), std=0)
      self.k_bias = param(rngs, (k, hd), ("kv_heads", "head_dim"), std=0)
      self.v_bias = param(rngs, (k, hd), ("kv_heads", "head_dim"), std=0)
    if cfg.qk_norm_full:  # OLMo 2: queries and keys normalised over all their heads at once
      self.q_norm = RMSNorm((h, hd), cfg.norm_eps, rngs, offset=cfg.norm_offset,
                            axis=("heads", "head_dim"))
      self.k_norm = RMSNorm((k, hd), cfg.norm_eps, rngs, offset=cfg.norm_offset,
                            axis=("kv_heads", "head_dim"))
    elif cfg.qk_norm:  # Qwen3: each query and key head normalised over head_dim, before rope
      self.q_norm = RMSNorm(hd, cfg.norm_eps, rngs, offset=cfg.norm_offset, axis="head_dim")
      self.k_norm = RMSNorm(hd, cfg.norm_eps, rngs, offset=cfg.norm_offset, axis="head_dim")
    if cfg.out_bias:
      self.o_bias = param(rngs, (d,), ("embed",), std=0)

  def __call__(self, x_btd, cos, sin, mask, kv_cache=None, deltas=None, prefix_kv=None,
               positions=None, prefix_gate=None):
    """`mask` is what `attention_inputs` built for this attention_impl. `positions` (ALiBi):
    (query positions (b, t), key positions (b, keys), the cache's slots when decoding); the
    rope tables are unused then.
    `deltas` (PEFT): {"q": fn, ...}, fn(x) added to that projection (see `project`).
    `prefix_kv` (prefix tuning): (k, v), each (n, kv_heads, head_dim), keys and values placed
    before the sequence's own (not rotated, as in PEFT, where they enter as a KV cache); the
    mask then covers n + t keys. `prefix_gate` (UniPELT), fn(x) -> (b, t): each query's gate on
    the prefix (`dot_product_attention`); the xla path only.

    With `kv_cache` = (k (b, S, kv_heads, hd), v, start): decoding. The new keys and values are
    written at cache slots [start, start + t) and the queries attend over the whole cache, with
    `mask` a dense (b, 1, 1, t, S) mask over those slots; returns (out, (k, v))."""
    deltas = deltas or {}
    q = project(x_btd, self.q[...], deltas.get("q"))  # (b, t, heads, head_dim)
    k = project(x_btd, self.k[...], deltas.get("k"))  # (b, t, kv_heads, head_dim)
    v = project(x_btd, self.v[...], deltas.get("v"))
    if self.cfg.qkv_bias:
      q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    alibi = None
    if self.cfg.alibi:  # positions enter as score biases, not rotations
      heads, kv_heads = self.cfg.n_heads, self.cfg.n_kv_heads
      slopes = jnp.asarray(alibi_slopes(heads).reshape(kv_heads, heads // kv_heads))
      alibi = Alibi(slopes, *positions)
    else:
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if prefix_kv is not None and kv_cache is None:  # with a cache, the prefix is in it
      k, v = (jnp.concatenate([jnp.broadcast_to(p.astype(x.dtype), (x.shape[0], *p.shape)), x],
                              axis=1) for p, x in zip(prefix_kv, (k, v)))
    cfg = self.cfg
    impl, scale, cap = self.impl, cfg.scale, cfg.attn_softcap
    gate = None
    if prefix_gate is not None:  # the prefix: the first n keys, or the cache's first n slots
      gate = (prefix_gate(x_btd), prefix_kv[0].shape[0])
      if impl != "xla" and kv_cache is None:
        raise ValueError(f"a gated prefix (UniPELT) runs with attention_impl xla, not {impl}")
    if kv_cache is not None:
      k_cache, v_cache, start = kv_cache
      k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, 1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, 1)
      out = dot_product_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask,
                                  scale, cap, alibi=alibi, prefix_gate=gate)
      return self._out(out, deltas), (k_cache, v_cache)
    if impl == "xla":
      blocks = query_blocks(q.shape[1]) if prefix_kv is None else 1
      out = dot_product_attention(q, k, v, mask, scale, cap, blocks, alibi=alibi,
                                  prefix_gate=gate)
    elif impl == "pallas" or (impl == "ring" and ring_attention_lib.sequence_parallel_size() == 1):
      if impl == "ring":  # no ring to run: the keys' vectors in natural order are the mask
        mask = fm.FlashMask(*mask[1][:4])
      out = partitioned_flash_attention(q, k, v, mask, scale, cap, alibi=alibi)
    elif impl == "cudnn":
      out = library_attention(q, k, v, mask, scale, "cudnn")
    else:  # ring
      block = functools.partial(_ring_block, scale=scale, softcap=cap)
      out = ring_attention(block, _ring_visible, q, k, v, *mask,
                           heads=None if alibi is None else alibi.slopes.reshape(-1))
    return self._out(out, deltas)

  def _out(self, out, deltas):
    """The output projection (with BLOOM's bias)."""
    y = project(out, self.o[...], deltas.get("o"), n_in=2)
    return y + self.o_bias[...].astype(y.dtype) if self.cfg.out_bias else y


def library_attention(q, k, v, mask, scale, implementation: str):
  """jax.nn.dot_product_attention (cudnn on GPUs) with our dense (batch, 1, q_len, k_len) mask,
  which is causal, so the causal flag (work skipping for cuDNN) changes nothing."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                      implementation=implementation)


def partitioned_flash_attention(q, k, v, mask: fm.FlashMask, scale, softcap, backend=None,
                                alibi: Alibi | None = None):
  """The Pallas kernel under the active mesh: a `shard_map` over batch and heads, since XLA
  cannot partition a Mosaic call (TPU) and would replicate a Triton one (GPU). Each device runs
  the kernel on its rows and heads; sequences stay whole (splitting them is `ring`'s job).
  `alibi`: ALiBi's slopes and positions, which the kernel turns into the bias tile by tile."""
  bias = None if alibi is None else (alibi.slopes.reshape(-1), alibi.q_pos, alibi.k_pos)
  active = rules_lib.active()
  if active is None:
    return flash_attention(q, k, v, mask, scale=scale, softcap=softcap, backend=backend,
                           alibi=bias)[0]
  mesh, rules = active
  q_spec = rules_lib.spec(("batch", "length", "heads", "head_dim"), rules, mesh, q.shape)
  kv_spec = rules_lib.spec(("batch", "length", "kv_heads", "head_dim"), rules, mesh, k.shape)
  if q_spec[1] is not None or kv_spec[1] is not None:
    raise ValueError("attention_impl=pallas keeps each sequence on one device; with the length "
                     "split over the mesh (mesh.sequence > 1) use attention_impl=ring")
  if q_spec[2] != kv_spec[2]:
    raise ValueError(f"pallas attention: query heads are split over {q_spec[2]} but KV heads over "
                     f"{kv_spec[2]}; make n_kv_heads divisible by mesh.tensor")
  if q_spec[3] is not None:
    raise ValueError("pallas attention needs whole heads on each device (head_dim unsplit)")
  vec_spec = jax.sharding.PartitionSpec(q_spec[0], None)
  # ALiBi: the slopes split as the heads are, the positions as the rows
  bias_specs = () if bias is None else (jax.sharding.PartitionSpec(q_spec[2]), vec_spec,
                                        vec_spec)

  def local(q, k, v, *vectors):
    local_bias = tuple(vectors[4:]) or None
    return flash_attention(q, k, v, fm.FlashMask(*vectors[:4]), scale=scale, softcap=softcap,
                           backend=backend, alibi=local_bias)[0]

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, *[vec_spec] * 4, *bias_specs),
                       out_specs=q_spec, check_vma=False)(
                           q, k, v, mask.lts, mask.lte, mask.uts, mask.ute, *(bias or ()))


def attention_inputs(impl: str, positions_bt, segment_ids_bt, window: int, order=None,
                     keys=None, shared_prompt: int = 0):
  """The mask in the form attention_impl `impl` takes, built once for the layers with this
  sliding `window` (0: none).

  xla and cudnn: dense booleans from positions and segment ids. pallas: FlashMask vectors,
  O(length), from the segment ids (positions count up by one inside each segment, as the data
  pipeline makes them). ring: the global row index of every query and the FlashMask vectors of
  every key, both in the ring's `order`.

  `keys` (prefix tuning, xla and pallas): (positions, segment ids) of keys that are n virtual
  keys followed by the queries' own. `shared_prompt`: answers per prompt (see `attention_mask`).
  """
  if keys is not None:
    if impl == "xla":
      return attention_mask(positions_bt, segment_ids_bt, *keys, window, shared_prompt)
    n = keys[1].shape[1] - segment_ids_bt.shape[1]  # query i is key row n + i
    return fm.shift_rows(fm.from_segments(keys[1], window, shared_prompt), n,
                         segment_ids_bt.shape[1])
  if impl in ("xla", "cudnn"):
    mask = attention_mask(positions_bt, segment_ids_bt, positions_bt, segment_ids_bt, window,
                          shared_prompt)
    return mask if impl == "xla" else mask[:, 0]
  if impl == "pallas":
    return fm.from_segments(segment_ids_bt, window, shared_prompt)
  b, t = segment_ids_bt.shape
  order = np.arange(t) if order is None else np.asarray(order)
  natural = fm.from_segments(segment_ids_bt[:, np.argsort(order)], window, shared_prompt)
  rows = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (b, t))
  vectors = tuple(getattr(natural, f)[:, order] for f in ("lts", "lte", "uts", "ute"))
  return (rows, positions_bt), (*vectors, positions_bt)  # (positions: ALiBi's distances)


def _ring_mask(q_aux, k_aux, q_len):
  """A ring block's FlashMask: the keys' bands over global rows, renumbered for this contiguous
  chunk of queries."""
  return fm.shift_rows(fm.FlashMask(*k_aux[:4]), q_aux[0][0, 0], q_len)


def _ring_block(q, k, v, q_aux, k_aux, slopes=None, *, scale, softcap):
  """One ring step's flash attention; `slopes` (ALiBi), with the positions both aux carry."""
  alibi = None if slopes is None else (slopes, q_aux[1], k_aux[4])
  return flash_attention(q, k, v, _ring_mask(q_aux, k_aux, q.shape[1]), scale=scale,
                         softcap=softcap, alibi=alibi, out_dtype=jnp.float32)


def _ring_visible(q_aux, k_aux):
  q_len, k_len = q_aux[0].shape[1], k_aux[0].shape[1]
  return jnp.any(fm.tile_kinds(_ring_mask(q_aux, k_aux, q_len), q_len, q_len, k_len) != fm.SKIP)


class MLP(nnx.Module):
  """Gated: down(act(gate(x)) * up(x)); act silu (SwiGLU) or tanh-approximated gelu (GeGLU).
  Without `mlp_gated` (BLOOM): down(act(up(x))); `out_bias`: up and down have biases."""

  def __init__(self, cfg: ModelConfig, run: Execution, rngs: nnx.Rngs):
    self.activation, self.gated, self.biased = cfg.mlp_activation, cfg.mlp_gated, cfg.out_bias
    d, f, std = cfg.d_model, cfg.d_ff, run.init_std
    if cfg.mlp_gated:
      self.gate = param(rngs, (d, f), ("embed", "mlp"), std)
    self.up = param(rngs, (d, f), ("embed", "mlp"), std)
    self.down = param(rngs, (f, d), ("mlp", "embed"), std / math.sqrt(2 * cfg.n_layers))
    if cfg.out_bias:
      self.up_bias = param(rngs, (f,), ("mlp",), std=0)
      self.down_bias = param(rngs, (d,), ("embed",), std=0)

  def __call__(self, x_btd, deltas=None):
    """`deltas` (PEFT): {"gate": fn, ...}, fn(x) added to that projection (see `project`)."""
    deltas = deltas or {}
    act = jax.nn.silu if self.activation == "silu" else functools.partial(jax.nn.gelu,
                                                                          approximate=True)
    up = project(x_btd, self.up[...], deltas.get("up"))
    if self.biased:
      up = up + self.up_bias[...].astype(up.dtype)
    h = act(project(x_btd, self.gate[...], deltas.get("gate"))) * up if self.gated else act(up)
    h = constrain(h, ("batch", "length", "mlp"))
    y = project(h, self.down[...], deltas.get("down"))
    return y + self.down_bias[...].astype(y.dtype) if self.biased else y
