"""The decoder: embeddings, a scan over identical blocks, final norm, logits.

Layers are created with `nnx.vmap`, so each parameter of a block is stored once with a leading
`layers` axis, and applied with `jax.lax.scan`: compile time does not grow with depth. The scan
drives `layer_body`, a plain function of (carry, one layer's parameters, that layer's inputs)
that a pipeline schedule could drive as well; besides the carry it returns the layer's aux
(auxiliary losses and metrics of its FFN, models/ffn.py), which leave the scan reduced over the
layers (`Decoder.forward`).

A model whose layers all have one FFN kind (dense, or every layer a mixture of experts) keeps
them in one stack, `layers`. One that mixes them (`moe_every`, `moe_first_dense`) keeps its MoE
blocks in `layers` and its dense ones in `dense_layers`, and scans each run of consecutive
layers of one kind in turn.

    h = model.hidden(tokens, positions, segment_ids)             # training, evaluation
    h, aux = model.forward(tokens, positions, segment_ids, ctx)  # the same, with the aux sums
    h, cache = model.hidden(tokens, positions, segment_ids, Context(cache=cache, start=s))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models import ffn as ffn_lib
from models.config import Execution, ModelConfig
from models.kernels import flashmask as fm
from models.kernels.grouped_matmul import EXPERT_FFN
from models.layers import (ATTENTION_BLOCK, LOW_RANK_OUTPUT, PROJECTION, Attention, make_norm,
                           attention_inputs, attention_mask, dense, param, rope_tables)
from parallel import ring_attention
from parallel.rules import constrain

BTD = ("batch", "length", "embed")

_policies = jax.checkpoint_policies
# Outputs of custom VJPs (LoRA's projections, bfloat16 / float16 projections, the xla path's
# attention blocks: layers.py; a mixture of experts' grouped FFN: kernels/grouped_matmul.py),
# which the dots policies would otherwise take for no matmul and recompute.
_named = _policies.save_only_these_names(LOW_RANK_OUTPUT, PROJECTION, ATTENTION_BLOCK,
                                         EXPERT_FFN)
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


def bottleneck_delta(h_btd, p, act=jax.nn.gelu):
  """A bottleneck adapter's change to h: up(act(down(h)))."""
  z = act(dense(h_btd, p["down"].astype(h_btd.dtype)) + p["down_bias"].astype(h_btd.dtype))
  return dense(z, p["up"].astype(h_btd.dtype)) + p["up_bias"].astype(h_btd.dtype)


def bottleneck(h_btd, p):
  """A Houlsby adapter: h + up(gelu(down(h)))."""
  return h_btd + bottleneck_delta(h_btd, p)


class LayerSource(NamedTuple):
  """Where the scan takes each layer's parameters from (PEFT, models/peft/model.py): `params`,
  any tree with a leading layer axis (stored weights, adapters); `fn` turns one layer's slice
  into (that layer's parameters as a pure dict, extra keyword arguments of its Block:
  activation-space adapters), inside the scan, so only one layer's folded weights exist at a
  time. A tuple of sources covers the layers in consecutive runs (their leading axes add up to
  the layer count), each scanned apart: AdapterDrop's lowest layers, with nothing that trains,
  then run without a backward pass."""
  params: Any
  fn: Callable


@dataclasses.dataclass(frozen=True)
class Context:
  """What a pass through the decoder needs besides tokens, positions and segment ids. The
  defaults are a plain training or evaluation pass.

  `cache` (from `init_cache`), `start`: decoding. The tokens are written at cache slots
  [start, start + length) and attend to every filled slot of their segment; `hidden` then
  returns (hidden, cache). Decoding always runs the xla attention (one query row at a time).

  `embed_noise` = (rng, alpha): NEFTune, uniform(-1, 1) * alpha / sqrt(length * d_model) added
  to the input embeddings (the trainer passes it in training steps only).

  Virtual tokens (PEFT), seen by every segment of a packed row; the real tokens' positions
  move up by their number n, as in Hugging Face PEFT, where they come first:
  `prefix_embeds` (n, d_model), prompt and P-tuning: n input embeddings placed before the
  tokens (segment `VIRTUAL`, positions 0..n-1); their outputs are dropped from the result.
  `prefix_keys` = n, prefix tuning: every layer's attention gets n keys and values first (the
  `prefix_kv` its layer source hands its Block).

  `shared_prompt`: the rows hold groups of this many answers after one prompt each (preference
  pairs, trainer/data/pairs.py: 2; GRPO's completions: their number), each answer seeing its
  group's prompt and not the other answers.

  `layers`: a `LayerSource` (PEFT) instead of the decoder's own layer parameters, or a tuple of
  them over consecutive runs of layers.
  `stack`: what runs the layer stack instead of the scan, stack(body, x, layer parameters,
  LayerInputs) -> (x, LayerOut stacked over the layers it ran), with `scan_layers`'s
  signature; a pipeline schedule (parallel/pipeline.py) runs one chunk of it per call.
  `layer_dtype`: mixed precision with the layer stack's parameters in float32; each layer's are
  cast to this dtype inside the scan, one layer at a time, so no low-precision copy of the whole
  stack exists (2 bytes per layer parameter less temporary memory) and the weight gradients
  leave the scan as float32 slices, with no conversion pass over the stacked gradient after it.
  The values are the same either way; on CPU the time was no different
  (benchmarks/layer_cast.py).
  `dropout_rng` (training steps, read by `PeftModel`): lora and adalora keep the low-rank path
  apart from the weights, with LoRA dropout when the PEFT config has some; the plain decoder
  ignores it. `router_rng` (training steps): a mixture of experts' router jitter noise; with it
  (and `router_batch_balance`) the layers also balance each batch's routing."""
  cache: dict | None = None
  start: Any = 0
  embed_noise: tuple | None = None
  prefix_embeds: Any = None
  prefix_keys: int = 0
  shared_prompt: int = 0
  layers: LayerSource | tuple[LayerSource, ...] | None = None
  dropout_rng: Any = None
  router_rng: Any = None
  stack: Callable | None = None
  layer_dtype: Any = None


def cast_floating(tree, dtype):
  """The tree with its floating-point leaves cast to `dtype` (integers, e.g. quantized weights
  and routing-bias steps, as they are)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def scan_layers(body, x_btd, layers, inputs: "LayerInputs"):
  """The layer stack as one scan of `body` over the layers' parameters and inputs."""
  return jax.lax.scan(lambda x, xs: body(x, *xs), x_btd, (layers, inputs))


class LayerShared(NamedTuple):
  """What every layer of one pass shares, bound to `layer_body` once."""
  graphdef: Any  # the Block's static half
  template: Any  # a layer's nnx.State, filled from a LayerSource's pure dicts
  cos: jax.Array  # rope tables (batch, length, head_dim)
  sin: jax.Array
  masks: dict  # sliding window (0: none) -> the attention mask in its impl's form
  start: Any  # decoding: the cache slot of the first token
  layer_fn: Callable | None  # LayerSource.fn, or None: the layer parameters are the Block's
  local_rope: tuple | None = None  # Gemma 3: (cos, sin) of the sliding-window layers
  positions: tuple | None = None  # ALiBi: (query positions, key positions)
  layer_dtype: Any = None  # Context.layer_dtype


class LayerInputs(NamedTuple):
  """A layer's own inputs, stacked along a leading layer axis for the scan."""
  is_local: jax.Array  # bool: this layer uses the sliding-window mask
  kv: tuple | None  # decoding: this layer's cache (k, v), each (batch, slots, kv_heads, hd)
  rng: jax.Array | None = None  # training a mixture of experts with router jitter: its key


class LayerOut(NamedTuple):
  """A layer's outputs besides the carry, stacked by the scan."""
  aux: dict  # float32 scalars of its FFN (models/ffn.py); {} for the dense MLP
  kv: tuple | None  # decoding: the updated cache (k, v)


def layer_body(shared: LayerShared, x_btd, layer, inputs: LayerInputs):
  """One decoder layer: (carry (batch, length, embed), this layer's parameters (an nnx.State
  of the Block, or a LayerSource slice), its LayerInputs) -> (carry, LayerOut)."""
  masks = shared.masks
  mask = next(iter(masks.values()))
  if len(masks) == 2:  # Gemma 2: a global and a local mask, picked per layer
    pick = lambda a, b: jnp.where(inputs.is_local, a, b)
    mask = jax.tree.map(pick, masks[max(masks)], masks[0])
  cos, sin = shared.cos, shared.sin
  if shared.local_rope is not None:  # Gemma 3: local layers have their own rope base
    cos, sin = (jnp.where(inputs.is_local, a, b) for a, b in zip(shared.local_rope, (cos, sin)))
  extras = {}
  if shared.layer_fn is not None:
    filled = jax.tree.map(lambda v: v, shared.template)
    params, extras = shared.layer_fn(layer)
    nnx.replace_by_pure_dict(filled, params)
    layer = filled
  if shared.layer_dtype is not None:  # Context.layer_dtype
    layer = cast_floating(layer, shared.layer_dtype)
  block = nnx.merge(shared.graphdef, layer)
  kv = None if inputs.kv is None else (*inputs.kv, shared.start)
  x_btd, kv, aux = block(x_btd, cos, sin, mask, kv, rng=inputs.rng, positions=shared.positions,
                         **extras)
  return x_btd, LayerOut(aux, kv)


def layer_runs(kinds: list[str]) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
  """Maximal runs of consecutive layers of one FFN kind: (kind, (lo, hi) in that kind's stack,
  (first, last) among all layers)."""
  runs, seen = [], {}
  for i, kind in enumerate(kinds):
    if runs and runs[-1][0] == kind:
      k, (lo, hi), (first, _) = runs[-1]
      runs[-1] = (k, (lo, hi + 1), (first, i + 1))
    else:
      runs.append((kind, (seen.get(kind, 0), seen.get(kind, 0) + 1), (i, i + 1)))
    seen[kind] = seen.get(kind, 0) + 1
  return runs


class Block(nnx.Module):
  """Pre-norm residual block; with `post_norms` (Gemma 2) the attention and MLP outputs are
  normalised too before they join the residual stream, and without `pre_norms` (OLMo 2) only
  they are."""

  def __init__(self, cfg: ModelConfig, run: Execution, rngs: nnx.Rngs, kind: str = "mlp"):
    norm = lambda: make_norm(cfg, rngs)
    if cfg.pre_norms:
      self.attn_norm = norm()
    self.attn = Attention(cfg, run, rngs)
    if cfg.pre_norms:
      self.mlp_norm = norm()
    # the FFN of `kind` (models/ffn.py); the attribute keeps its name: parameter paths
    self.mlp = ffn_lib.make_ffn(cfg, run, rngs, kind)
    if cfg.post_norms:
      self.post_attn_norm, self.post_mlp_norm = norm(), norm()
    self.post_norms, self.pre_norms = cfg.post_norms, cfg.pre_norms

  def _input(self, norm: str, x):
    """A sublayer's input: normalised by `norm`, or as it is without pre_norms (OLMo 2)."""
    return getattr(self, norm)(x) if self.pre_norms else x

  def __call__(self, x_btd, cos, sin, mask, kv_cache=None, adapters=None, deltas=None,
               prefix_kv=None, rng=None, positions=None, parallel=None, prefix_gate=None):
    """PEFT, in activation space: `adapters`, {"attn": fn, "mlp": fn} (either may be absent),
    fn(h) -> h' replacing that sublayer's output before the residual sum (Houlsby bottlenecks,
    AdapterFusion, UniPELT's gated adapter); `parallel`, fn(u) added to the FFN's output, u its
    input (MAM's parallel adapter); `deltas`, {"attn": {"q": fn, ...}, "mlp": {...}}, fn(x)
    added to that projection of x (LoRA with dropout, UniPELT's gated LoRA); `prefix_kv`, this
    layer's key and value prefix (prefix tuning, see Attention) and `prefix_gate`, fn(x) -> a
    gate per token scaling it (UniPELT); `rng`, the FFN's training key (a mixture of experts'
    router jitter).

    Returns (x, kv_cache: the updated cache when decoding, else None, aux: the FFN's float32
    scalars, models/ffn.py)."""
    deltas, adapters = deltas or {}, adapters or {}
    h = self.attn(self._input("attn_norm", x_btd), cos, sin, mask, kv_cache, deltas.get("attn"),
                  prefix_kv, positions, prefix_gate)
    if kv_cache is not None:
      h, kv_cache = h
    if "attn" in adapters:
      h = adapters["attn"](h)
    x_btd = x_btd + (self.post_attn_norm(h) if self.post_norms else h)
    u = self._input("mlp_norm", x_btd)
    h, aux = ffn_lib.apply(self.mlp, u, deltas.get("mlp"), rng)
    if parallel is not None:
      h = h + parallel(u).astype(h.dtype)
    if "mlp" in adapters:
      h = adapters["mlp"](h)
    x_btd = x_btd + (self.post_mlp_norm(h) if self.post_norms else h)
    x_btd = constrain(x_btd, BTD)
    return x_btd, kv_cache, aux


class Decoder(nnx.Module):
  """`cfg`: what the weights are; `run`: how it runs (remat, attention_impl, init_std)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, run: Execution | None = None):
    run = run or Execution()
    self.cfg, self.run = cfg, run
    std = run.init_std
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std)
    kinds = cfg.layer_kinds()

    def make_blocks(kind):
      @nnx.split_rngs(splits=kinds.count(kind))
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make(rngs):
        return Block(cfg, run, rngs, kind)
      return make(rngs)

    self.layers = make_blocks("moe" if "moe" in kinds else "mlp")
    if len(set(kinds)) > 1:
      self.dense_layers = make_blocks("mlp")
    self.final_norm = make_norm(cfg, rngs)
    if cfg.embed_norm:  # BLOOM: the embeddings normalised before the first layer
      self.embed_norm = make_norm(cfg, rngs)
    if not cfg.tie_embeddings and not cfg.value_head:
      self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std)
    if cfg.value_head:  # reward models: a score head instead of the LM head
      self.score = param(rngs, (cfg.d_model, 1), ("embed", None), std)

  def hidden(self, tokens_bt, positions_bt=None, segment_ids_bt=None,
             ctx: Context | None = None):
    """Final-norm hidden states (batch, length, embed) in the parameters' dtype; with a cache
    in `ctx` (decoding), (hidden, cache). See `Context` for the rest."""
    h, cache, _ = self._run(tokens_bt, positions_bt, segment_ids_bt, ctx or Context())
    return h if cache is None else (h, cache)

  def forward(self, tokens_bt, positions_bt=None, segment_ids_bt=None,
              ctx: Context | None = None):
    """(hidden as `hidden` gives it, aux): aux the FFNs' float32 scalars reduced over the layers
    (keys ending in `_loss` are weighted auxiliary losses, models/ffn.py); {} for the dense MLP.
    Training and evaluation: no cache."""
    ctx = ctx or Context()
    if ctx.cache is not None:
      raise ValueError("Decoder.forward runs without a KV cache; decode with hidden()")
    h, _, aux = self._run(tokens_bt, positions_bt, segment_ids_bt, ctx)
    return h, aux

  def _run(self, tokens_bt, positions_bt, segment_ids_bt, ctx: Context):
    """(hidden, the updated cache or None, aux sums)."""
    cache, start = ctx.cache, ctx.start
    prefix_embeds, prefix_keys = ctx.prefix_embeds, ctx.prefix_keys
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
    local_rope = rope_tables(self.cfg, positions_bt, local=True) if self.cfg.rope_local_theta \
        else None
    windows = self.cfg.layer_windows()
    if cache is not None:
      cache = dict(cache)
      for name, new in (("positions", positions_bt), ("segment_ids", segment_ids_bt)):
        cache[name] = jax.lax.dynamic_update_slice_in_dim(cache[name], new, start, 1)
      masks = {w: attention_mask(positions_bt, segment_ids_bt, cache["positions"],
                                 cache["segment_ids"], w) for w in sorted(set(windows))}
    else:
      impl = self.run.attention_impl
      order = ring_attention.layout(t) if impl == "ring" else None
      # One mask for all layers, or (Gemma 2) a global and a local one, picked per layer.
      masks = {w: attention_inputs(impl, positions_bt, segment_ids_bt, w, order, keys,
                                   ctx.shared_prompt) for w in sorted(set(windows))}
    local = jnp.asarray([w > 0 for w in windows])
    alibi_positions = None
    if self.cfg.alibi:  # the keys: the cache's slots, or the row's (prefix keys first)
      alibi_positions = (positions_bt, cache["positions"] if cache is not None
                         else keys[0] if keys is not None else positions_bt)

    # Gather the table's model dimension first (as FSDP does for any weight it uses), keeping
    # the vocabulary split: a lookup into a table split along both leaves the partitioner only
    # a full rematerialisation to reach the batch-split output.
    table = constrain(self.embed[...], ("vocab", None))
    x = constrain(jnp.take(table, tokens_bt, axis=0), BTD)
    # As in Hugging Face: NEFTune noise on the looked-up embeddings, then virtual tokens before
    # them, then Gemma's scale on all of it.
    if ctx.embed_noise is not None:
      x = neftune(x, *ctx.embed_noise)
    if prefix_embeds is not None:
      virtual = jnp.broadcast_to(prefix_embeds.astype(x.dtype), (b, *prefix_embeds.shape))
      x = constrain(jnp.concatenate([virtual, x], axis=1), BTD)
    if self.cfg.embed_scale:
      x = x * jnp.asarray(self.cfg.d_model ** 0.5, x.dtype)
    if self.cfg.embed_norm:
      x = self.embed_norm(x)
    kv = None if cache is None else (cache["k"], cache["v"])
    router_keys = None
    training_router = self.cfg.router_jitter or self.cfg.router_batch_balance
    if ctx.router_rng is not None and training_router and self.cfg.n_experts:
      router_keys = jax.random.split(ctx.router_rng, self.cfg.n_layers)
    runs = layer_runs(self.cfg.layer_kinds())
    sources = (ctx.layers,) if isinstance(ctx.layers, LayerSource) else ctx.layers
    if sources is not None and len(runs) > 1:
      raise ValueError("a model that mixes dense and MoE layers takes no layer source (PEFT)")
    if ctx.stack is not None and (len(runs) > 1 or len(sources or ()) > 1):
      raise ValueError("a model that mixes dense and MoE layers, or runs its lowest layers "
                       "apart (AdapterDrop), cannot be pipelined")
    # (kind, its stack's parameters or a layer source, (first, last) among all layers)
    parts = []
    for kind, (lo, hi), (first, last) in runs:
      stack = self.dense_layers if kind == "mlp" and hasattr(self, "dense_layers") else self.layers
      if sources is None:
        parts.append((kind, stack, None, (lo, hi), (first, last)))
        continue
      for source in sources:  # one run (every layer of one kind), cut where the sources meet
        size = jax.tree.leaves(source.params)[0].shape[0]
        parts.append((kind, stack, source, None, (first, first + size)))
        first += size
    auxes, kvs = [], []
    for kind, stack, source, own, (first, last) in parts:
      graphdef, layer_state = nnx.split(stack)
      shared = LayerShared(graphdef, layer_state, cos, sin, masks, start,
                           None if source is None else source.fn, local_rope,
                           alibi_positions, None if source is not None else ctx.layer_dtype)
      body = functools.partial(layer_body, shared)
      if self.run.remat != "none" and cache is None:
        body = jax.checkpoint(body, policy=REMAT_POLICIES[self.run.remat], prevent_cse=False)
      layers_in = layer_state if source is None else source.params
      inputs = LayerInputs(local, kv, router_keys if kind == "moe" else None)
      if len(parts) > 1:  # this part's layers and per-layer inputs
        if own is not None:
          layers_in = jax.tree.map(lambda a: a[own[0]:own[1]], layers_in)
        inputs = jax.tree.map(lambda a: a[first:last], inputs)
      x, out = (ctx.stack or scan_layers)(body, x, layers_in, inputs)
      auxes.append(ffn_lib.reduce_layers(out.aux))
      kvs.append(out.kv)
    aux = ffn_lib.join_runs(auxes)
    x = x[:, x.shape[1] - t:]  # without the virtual tokens' outputs
    if cache is not None:
      cache["k"], cache["v"] = (jnp.concatenate(parts) if len(parts) > 1 else parts[0]
                                for parts in zip(*kvs))
    return self.final_norm(x), cache, aux

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
