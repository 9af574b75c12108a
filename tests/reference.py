"""A plain-jnp Llama forward pass, written independently of `models/` for parity tests.

Loops over layers, repeats K/V heads explicitly, builds the mask densely and applies RoPE by
the textbook formula with rotate-half. Reads the same parameter dict layout as the model.
"""

import functools
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
            on_mlp_input=None, rope_scale=1.0, hooks=None):
  """Logits (batch, length, vocab). `on_mlp_input(h)`, if given, sees each layer's normalised
  MLP input, in layer order. `hooks` (adapters, dense layers), an object with any of:
    delta(l, name, x): added to projection `name` (q k v o gate up down) of its input x
        (batch, length, features in), the output flattened to (batch, length, features out);
        None: nothing added;
    prefix(l): (keys, values) each (n, kv_heads, head_dim) placed before the row's own (not
        rotated, seen by every query); the real positions then count from n;
    prefix_gate(l, h): (batch, length) multiplying each query's prefix keys and values;
    attn_out(l, h), mlp_out(l, h): replace that sublayer's output;
    moe_bias(l, logits): (E,) added to a MoE layer's router logits to choose its experts;
    mlp_parallel(l, u): added to the MLP's output, u its input."""
  b, t = tokens.shape
  positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
  segment_ids = np.ones((b, t), np.int32) if segment_ids is None else segment_ids
  hd = cfg.head_dim
  inv_freq = plain_inv_freq(hd, cfg.rope_theta) if inv_freq is None else inv_freq
  hook = lambda name: getattr(hooks, name, None)
  n_prefix = 0 if hook("prefix") is None else hook("prefix")(0)[0].shape[0]
  positions = positions + n_prefix
  i = np.arange(t)
  allowed = (i[None, :] <= i[:, None])
  if cfg.sliding_window:
    allowed = allowed & (i[:, None] - i[None, :] < cfg.sliding_window)
  allowed = allowed[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])  # (b, t, t)
  allowed = np.concatenate([np.ones((b, t, n_prefix), bool), allowed], axis=2)

  def proj(l, name, x, w, n_in=1):
    y = jnp.tensordot(x, w, axes=n_in)
    if hook("delta") is not None:
      d = hook("delta")(l, name, x.reshape(b, t, -1))
      y = y if d is None else y + d.reshape(y.shape)
    return y

  x = params["embed"][tokens]
  kinds = cfg.layer_kinds()
  mixed = len(set(kinds)) > 1
  for l in range(cfg.n_layers):
    stack = "dense_layers" if mixed and kinds[l] == "mlp" else "layers"
    index = sum(1 for j in range(l) if kinds[j] == kinds[l])  # its place in its stack
    p = jax.tree.map(lambda a: a[index], params[stack])
    h = rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)
    q = proj(l, "q", h, p["attn"]["q"])
    k = proj(l, "k", h, p["attn"]["k"])
    v = proj(l, "v", h, p["attn"]["v"])
    if cfg.qkv_bias:
      q, k, v = q + p["attn"]["q_bias"], k + p["attn"]["k_bias"], v + p["attn"]["v_bias"]
    if not cfg.alibi:
      q, k = rope(q, positions, inv_freq, rope_scale), rope(k, positions, inv_freq, rope_scale)
    if n_prefix:
      pk, pv = hook("prefix")(l)
      k = jnp.concatenate([jnp.broadcast_to(pk, (b, *pk.shape)), k], axis=1)
      v = jnp.concatenate([jnp.broadcast_to(pv, (b, *pv.shape)), v], axis=1)
    rep = cfg.n_heads // cfg.n_kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    gated = np.ones((b, 1, t, n_prefix + t), np.float32)
    if n_prefix and hook("prefix_gate") is not None:  # g * (q . k_prefix), g * v_prefix
      g = hook("prefix_gate")(l, h)[:, None, :, None]
      gated = jnp.concatenate([jnp.broadcast_to(g, (b, 1, t, n_prefix)),
                               jnp.ones((b, 1, t, t))], axis=-1)
    s = s * gated
    if cfg.alibi:  # minus slope_h times the distance within the document
      distance = positions[:, :, None] - positions[:, None, :]
      s = s - alibi_slopes(cfg.n_heads)[None, :, None, None] * distance[:, None]
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1) * gated, v)
    out = proj(l, "o", a, p["attn"]["o"], n_in=2)
    if hook("attn_out") is not None:
      out = hook("attn_out")(l, out)
    x = x + out
    h = rms_norm(x, p["mlp_norm"]["scale"], cfg.norm_eps)
    if on_mlp_input is not None:
      on_mlp_input(h)
    if kinds[l] == "moe":
      bias = None if hook("moe_bias") is None else functools.partial(hook("moe_bias"), l)
      x = x + moe(h.reshape(b * t, -1), p["mlp"], cfg, bias=bias).reshape(x.shape)
      continue
    g = proj(l, "gate", h, p["mlp"]["gate"])
    out = proj(l, "down", (g * jax.nn.sigmoid(g)) * proj(l, "up", h, p["mlp"]["up"]),
               p["mlp"]["down"])
    if hook("mlp_parallel") is not None:
      out = out + hook("mlp_parallel")(l, h)
    if hook("mlp_out") is not None:
      out = hook("mlp_out")(l, out)
    x = x + out
  x = rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)
  head = params["embed"].T if cfg.tie_embeddings else params["head"]
  return x @ head


def route(logits, cfg, bias=None):
  """(weights (T, k), expert ids (T, k)) by numpy sorting, from float32 router logits; `bias`
  (E,), if given, is added to the logits to choose the experts, not to weight them."""
  logits = np.asarray(logits, np.float64)
  k = cfg.experts_per_token
  chosen = logits if bias is None else logits + np.asarray(bias, np.float64)
  ids = np.argsort(-chosen, axis=-1, kind="stable")[:, :k]
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


def moe(h_td, p, cfg, dropped=None, bias=None):
  """A mixture of experts, token by token: each token's k experts' SwiGLU outputs (their
  weights gathered per pair) summed by the router weights, plus the (gated) shared expert.
  `dropped` (T, k) bool: pairs that contribute nothing (capacity); `bias(logits)` -> (E,):
  added to the logits to choose the experts (`route`)."""
  logits = h_td @ p["router"]
  w, ids = route(logits, cfg, None if bias is None else bias(logits))
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
