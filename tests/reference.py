"""A plain-jnp Llama forward pass, written independently of `models/` for parity tests.

Loops over layers, repeats K/V heads explicitly, builds the mask densely and applies RoPE by
the textbook formula with rotate-half. Reads the same parameter dict layout as the model.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x, w, eps):
  return x / jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
  h = x.shape[-1] // 2
  return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope(x_bthd, positions_bt, inv_freq, scale=1.0):
  """`scale`: YaRN's and LongRoPE's attention factor, which multiplies cos and sin."""
  ang = positions_bt[:, :, None].astype(np.float32) * inv_freq[None, None, :]
  emb = jnp.concatenate([ang, ang], -1)[:, :, None, :]
  return (x_bthd * jnp.cos(emb) + rotate_half(x_bthd) * jnp.sin(emb)) * scale


def alibi_slopes(n_heads):
  """Press et al.'s slopes: 2^(-8 i / n) for i = 1..n when n is a power of two; otherwise the
  power of two p below n's, then the odd-numbered ones of 2p's."""
  p = 2 ** int(math.log2(n_heads))
  slopes = [2.0 ** (-8.0 * i / p) for i in range(1, p + 1)]
  slopes += [2.0 ** (-8.0 * i / (2 * p)) for i in range(1, 2 * p + 1, 2)][:n_heads - p]
  return np.asarray(slopes, np.float32)


def plain_inv_freq(head_dim, theta):
  return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)


def forward(params, cfg, tokens, positions=None, segment_ids=None, inv_freq=None,
            on_mlp_input=None, rope_scale=1.0):
  """Logits (batch, length, vocab). `on_mlp_input(h)`, if given, sees each layer's normalised
  MLP input, in layer order."""
  b, t = tokens.shape
  positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
  segment_ids = np.ones((b, t), np.int32) if segment_ids is None else segment_ids
  hd = cfg.head_dim
  inv_freq = plain_inv_freq(hd, cfg.rope_theta) if inv_freq is None else inv_freq
  i = np.arange(t)
  allowed = (i[None, :] <= i[:, None])
  if cfg.sliding_window:
    allowed = allowed & (i[:, None] - i[None, :] < cfg.sliding_window)
  allowed = allowed[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])  # (b, t, t)
  x = params["embed"][tokens]
  kinds = cfg.layer_kinds()
  mixed = len(set(kinds)) > 1
  for l in range(cfg.n_layers):
    stack = "dense_layers" if mixed and kinds[l] == "mlp" else "layers"
    index = sum(1 for j in range(l) if kinds[j] == kinds[l])  # its place in its stack
    p = jax.tree.map(lambda a: a[index], params[stack])
    h = rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)
    q = jnp.einsum("btd,dhk->bthk", h, p["attn"]["q"])
    k = jnp.einsum("btd,dhk->bthk", h, p["attn"]["k"])
    v = jnp.einsum("btd,dhk->bthk", h, p["attn"]["v"])
    if cfg.qkv_bias:
      q, k, v = q + p["attn"]["q_bias"], k + p["attn"]["k_bias"], v + p["attn"]["v_bias"]
    if not cfg.alibi:
      q, k = rope(q, positions, inv_freq, rope_scale), rope(k, positions, inv_freq, rope_scale)
    rep = cfg.n_heads // cfg.n_kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    if cfg.alibi:  # minus slope_h times the distance within the document
      distance = positions[:, :, None] - positions[:, None, :]
      s = s - alibi_slopes(cfg.n_heads)[None, :, None, None] * distance[:, None]
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
    x = x + jnp.einsum("bthk,hkd->btd", a, p["attn"]["o"])
    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps)
    if on_mlp_input is not None:
      on_mlp_input(h)
    if kinds[l] == "moe":
      x = x + moe(h.reshape(b * t, -1), p["mlp"], cfg).reshape(x.shape)
      continue
    g = h @ p["mlp"]["gate"]
    x = x + ((g * jax.nn.sigmoid(g)) * (h @ p["mlp"]["up"])) @ p["mlp"]["down"]
  x = rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)
  head = params["embed"].T if cfg.tie_embeddings else params["head"]
  return x @ head


def route(logits, cfg):
  """(weights (T, k), expert ids (T, k)) by numpy sorting, from float32 router logits."""
  logits = np.asarray(logits, np.float64)
  k = cfg.experts_per_token
  ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if cfg.router_order == "topk_softmax":
    top = np.take_along_axis(logits, ids, -1)
    w = np.exp(top - top.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True), ids
  w = np.take_along_axis(probs, ids, -1)
  if cfg.router_norm_topk:
    w = w / w.sum(-1, keepdims=True)
  return w, ids


def moe(h_td, p, cfg, dropped=None):
  """A mixture of experts, token by token: each token's k experts' SwiGLU outputs (their
  weights gathered per pair) summed by the router weights, plus the (gated) shared expert.
  `dropped` (T, k) bool: pairs that contribute nothing (capacity)."""
  logits = h_td @ p["router"]
  w, ids = route(logits, cfg)
  if dropped is not None:
    w = np.where(dropped, 0.0, w)
  gate, up, down = p["gate"][ids], p["up"][ids], p["down"][ids]  # (T, k, ...)
  g = jnp.einsum("td,tkdf->tkf", h_td, gate)
  y = jnp.einsum("tkf,tkfd->tkd", (g * jax.nn.sigmoid(g)) * jnp.einsum("td,tkdf->tkf", h_td, up),
                 down)
  out = jnp.einsum("tkd,tk->td", y, jnp.asarray(w, h_td.dtype))
  if cfg.shared_expert_d_ff:
    s = p["shared"]
    g = h_td @ s["gate"]
    shared = ((g * jax.nn.sigmoid(g)) * (h_td @ s["up"])) @ s["down"]
    if cfg.shared_expert_gate:
      shared = shared * jax.nn.sigmoid(h_td @ p["shared_gate"])
    out = out + shared
  return out
