"""The decoder: embeddings, a scan over identical blocks, final norm, logits.

Layers are created with `nnx.vmap`, so each parameter of a block is stored once with a leading
`layers` axis, and applied with `jax.lax.scan`: compile time does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.kernels import flashmask as fm
from models.layers import (ATTENTION_BLOCK, LOW_RANK_OUTPUT, MLP, Attention, RMSNorm,
                           attention_inputs, attention_mask, dense, param, rope_tables)
from parallel import ring_attention
from parallel.rules import constrain

BTD = ("batch", "length", "embed")

_policies = jax.checkpoint_policies
# Outputs of custom VJPs (LoRA's projections, the xla path's attention blocks: layers.py), which
# the dots policies would otherwise take for no matmul and recompute.
_named = _policies.save_only_these_names(LOW_RANK_OUTPUT, ATTENTION_BLOCK)
REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots, _named),
    "dots_no_batch": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _named),
}


def neftune(x_btd, key, alpha: float):
  """NEFTune (arXiv 2310.05914): uniform(-1, 1) noise scaled by alpha / sqrt(length * d)."""
  _, t, d = x_btd.shape
  noise = jax.random.uniform(key, x_btd.shape, jnp.float32, -1.0, 1.0) * (alpha / (t * d) ** 0.5)
  return x_btd + noise.astype(x_btd.dtype)


def bottleneck(h_btd, p):
  """A Houlsby adapter: h + up(gelu(down(h)))."""
  z = jax.nn.gelu(dense(h_btd, p["down"].astype(h_btd.dtype)) + p["down_bias"].astype(h_btd.dtype))
  return h_btd + dense(z, p["up"].astype(h_btd.dtype)) + p["up_bias"].astype(h_btd.dtype)


class Block(nnx.Module):
  """Pre-norm residual block; with `post_norms` (Gemma 2) the attention and MLP outputs are
  normalised too before they join the residual stream."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, rngs, offset=cfg.norm_offset)
    self.attn_norm = norm()
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(cfg, rngs)
    if cfg.post_norms:
      self.post_attn_norm, self.post_mlp_norm = norm(), norm()
    self.post_norms = cfg.post_norms

  def __call__(self, x_btd, cos, sin, mask, kv_cache=None, adapters=None, deltas=None,
               prefix_kv=None):
    """PEFT, in activation space: `adapters`, Houlsby bottlenecks {"attn": ..., "mlp": ...} on
    the two outputs; `deltas`, {"attn": {"q": fn, ...}, "mlp": {...}}, fn(x) added to that
    projection of x (LoRA with dropout); `prefix_kv`, this layer's key and value prefix (prefix
    tuning, see Attention)."""
    deltas = deltas or {}
    h = self.attn(self.attn_norm(x_btd), cos, sin, mask, kv_cache, deltas.get("attn"), prefix_kv)
    if kv_cache is not None:
      h, kv_cache = h
    if adapters is not None:
      h = bottleneck(h, adapters["attn"])
    x_btd = x_btd + (self.post_attn_norm(h) if self.post_norms else h)
    h = self.mlp(self.mlp_norm(x_btd), deltas.get("mlp"))
    if adapters is not None:
      h = bottleneck(h, adapters["mlp"])
    x_btd = x_btd + (self.post_mlp_norm(h) if self.post_norms else h)
    x_btd = constrain(x_btd, BTD)
    return x_btd if kv_cache is None else (x_btd, kv_cache)


class Decoder(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.layers = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs, offset=cfg.norm_offset)
    if not cfg.tie_embeddings and not cfg.value_head:
      self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)
    if cfg.value_head:  # reward models: a score head instead of the LM head
      self.score = param(rngs, (cfg.d_model, 1), ("embed", None), cfg.init_std)

  def hidden(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache=None, start=0,
             embed_noise=None, layer_params=None, layer_fn=None, prefix_embeds=None,
             prefix_keys=0, shared_prompt=False):
    """Final-norm hidden states (batch, length, embed) in the parameters' dtype.

    `embed_noise` = (rng, alpha): NEFTune, uniform(-1, 1) * alpha / sqrt(length * d_model) added
    to the input embeddings (the trainer passes it in training steps only).

    Virtual tokens (PEFT), seen by every segment of a packed row; the real tokens' positions
    move up by their number n, as in Hugging Face PEFT, where they come first:
    `prefix_embeds` (n, d_model), prompt and P-tuning: n input embeddings placed before the
    tokens (segment `VIRTUAL`, positions 0..n-1); their outputs are dropped from the result.
    `prefix_keys` = n, prefix tuning: every layer's attention gets n keys and values first (the
    `prefix_kv` its `layer_fn` hands its Block).

    `layer_params`, `layer_fn` (PEFT): the scan runs over `layer_params` (any tree with a leading
    layer axis: stored weights, adapters) and `layer_fn` turns each layer's slice into (that
    layer's parameters, extra keyword arguments of its Block: activation-space adapters),
    inside the scan, so only one layer's folded weights exist at a time.

    `shared_prompt`: the rows hold preference pairs (trainer/data/pairs.py), each answer seeing
    its pair's prompt.

    With `cache` (from `init_cache`): decoding. The tokens are written at cache slots
    [start, start + length) and attend to every filled slot of their segment; returns
    (hidden, cache). Decoding always runs the xla attention (one query row at a time).
    """
    b, t = tokens_bt.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones((b, t), jnp.int32)
    n_virtual = 0 if prefix_embeds is None else prefix_embeds.shape[0]
    n_virtual += prefix_keys
    virtual_pos = jnp.broadcast_to(jnp.arange(n_virtual, dtype=jnp.int32), (b, n_virtual))
    virtual_seg = jnp.full((b, n_virtual), fm.VIRTUAL, jnp.int32)
    positions_bt = positions_bt + n_virtual
    keys = None
    if prefix_embeds is not None:
      positions_bt = jnp.concatenate([virtual_pos, positions_bt], axis=1)
      segment_ids_bt = jnp.concatenate([virtual_seg, segment_ids_bt], axis=1)
    elif prefix_keys:
      keys = (jnp.concatenate([virtual_pos, positions_bt], axis=1),
              jnp.concatenate([virtual_seg, segment_ids_bt], axis=1))
    cos, sin = rope_tables(self.cfg, positions_bt)
    windows = self.cfg.layer_windows()
    if cache is not None:
      cache = dict(cache)
      for name, new in (("positions", positions_bt), ("segment_ids", segment_ids_bt)):
        cache[name] = jax.lax.dynamic_update_slice_in_dim(cache[name], new, start, 1)
      masks = {w: attention_mask(positions_bt, segment_ids_bt, cache["positions"],
                                 cache["segment_ids"], w) for w in sorted(set(windows))}
    else:
      order = ring_attention.layout(t) if self.cfg.attention_impl == "ring" else None
      # One mask for all layers, or (Gemma 2) a global and a local one, picked per layer.
      masks = {w: attention_inputs(self.cfg, positions_bt, segment_ids_bt, w, order, keys,
                                   shared_prompt) for w in sorted(set(windows))}
    local = jnp.asarray([w > 0 for w in windows])

    # Gather the table's model dimension first (as FSDP does for any weight it uses), keeping
    # the vocabulary split: a lookup into a table split along both leaves the partitioner only
    # a full rematerialisation to reach the batch-split output.
    table = constrain(self.embed[...], ("vocab", None))
    x = constrain(jnp.take(table, tokens_bt, axis=0), BTD)
    # As in Hugging Face: NEFTune noise on the looked-up embeddings, then virtual tokens before
    # them, then Gemma's scale on all of it.
    if embed_noise is not None:
      x = neftune(x, *embed_noise)
    if prefix_embeds is not None:
      virtual = jnp.broadcast_to(prefix_embeds.astype(x.dtype), (b, *prefix_embeds.shape))
      x = constrain(jnp.concatenate([virtual, x], axis=1), BTD)
    if self.cfg.embed_scale:
      x = x * jnp.asarray(self.cfg.d_model ** 0.5, x.dtype)
    graphdef, layer_state = nnx.split(self.layers)

    def one_layer(x, xs):
      state, is_local, kv = xs
      mask = next(iter(masks.values()))
      if len(masks) == 2:
        pick = lambda a, b: jnp.where(is_local, a, b)
        mask = jax.tree.map(pick, masks[max(masks)], masks[0])
      extras = {}
      if layer_fn is not None:
        filled = jax.tree.map(lambda v: v, layer_state)
        params, extras = layer_fn(state)
        nnx.replace_by_pure_dict(filled, params)
        state = filled
      block = nnx.merge(graphdef, state)
      if kv is None:
        return block(x, cos, sin, mask, **extras), None
      return block(x, cos, sin, mask, (*kv, start), **extras)

    if self.cfg.remat != "none" and cache is None:
      one_layer = jax.checkpoint(one_layer, policy=REMAT_POLICIES[self.cfg.remat],
                                 prevent_cse=False)
    kv = None if cache is None else (cache["k"], cache["v"])
    layers_in = layer_state if layer_fn is None else layer_params
    x, new_kv = jax.lax.scan(one_layer, x, (layers_in, local, kv))
    x = x[:, x.shape[1] - t:]  # without the virtual tokens' outputs
    if cache is None:
      return self.final_norm(x)
    cache["k"], cache["v"] = new_kv
    return self.final_norm(x), cache

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache of `length` slots: keys and values per layer, and the position and
    segment of each slot (segment -1: empty, seen by no query)."""
    c = self.cfg
    kv = jnp.zeros((c.n_layers, batch, length, c.n_kv_heads, c.head_dim), dtype)
    return {"k": kv, "v": kv, "positions": jnp.zeros((batch, length), jnp.int32),
            "segment_ids": jnp.full((batch, length), -1, jnp.int32)}

  def logits(self, h_btd):
    """float32 logits (batch, length, vocab); the matmul accumulates in float32."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
    out = dense(h_btd, w, out_dtype=jnp.float32)
    if self.cfg.logit_softcap:
      out = self.cfg.logit_softcap * jnp.tanh(out / self.cfg.logit_softcap)
    return constrain(out, ("batch", "length", "vocab"))

  def values(self, h_btd):
    """Reward models: float32 scores (batch, length) from the value head."""
    return dense(h_btd, self.score[...], out_dtype=jnp.float32)[..., 0]

  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
    return self.logits(self.hidden(tokens_bt, positions_bt, segment_ids_bt))
