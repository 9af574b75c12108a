"""A decoder with PEFT adapters folded in layer by layer (`ModelHandle.bind` with PEFT)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from models.decoder import Context, Decoder, LayerSource, bottleneck
from models.kernels.flashmask import VIRTUAL
from models.peft import PATHS, Peft, _replace, unified

Params = dict[str, Any]


class PeftModel:
  """A decoder whose layer weights are folded from stored weights and adapters layer by layer
  (`Peft.fold_layer`): the full set of merged weights never exists at once. Virtual tokens
  (prompt, P- and prefix tuning) go to the decoder, which places them; with a KV cache they are
  written into its first slots by `init_cache` and the real tokens come after them."""

  def __init__(self, decoder: Decoder, peft: Peft, params: Params):
    self.decoder, self.cfg, self.peft = decoder, decoder.cfg, peft
    adapters = params.get("peft", {})
    self._shared = adapters.get("vera_shared")
    weight_adapters = {m: v for m, v in adapters.items() if m in PATHS}
    # activation-space pieces, each with a leading layer axis (AdapterDrop: the top layers')
    activations = {m: v for m, v in adapters.items()
                   if m in ("adapter", "fusion", "parallel", "prefix_gate")}
    prefix_kv = None
    self._virtual = {}  # Context fields of the virtual tokens (no cache)
    if "prompt" in adapters and peft.prompt.method == "prefix":
      prefix_kv = peft.prompt.prefix_kv(adapters["prompt"])  # (layers, 2, n, kv_heads, hd)
      self._virtual = {"prefix_keys": peft.prompt.n}
    elif "prompt" in adapters:
      self._virtual = {"prefix_embeds": peft.prompt.embeddings(adapters["prompt"])}
    self._prefix_kv = prefix_kv
    drop, layers = peft.adapter_drop, params["layers"]
    self._below = self._pick = None
    if drop:  # AdapterDrop: the lowest layers hold no adapters and run as the base model's.
      # Each scan gets layer indices and reads its layer from the whole stack: slicing the
      # stack in two would copy every weight on each call (0.1 s of a medium forward pass).
      self._pick = lambda i: jax.tree.map(
          lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), params["layers"])
      self._below = jnp.arange(drop)
      layers = jnp.arange(drop, self.cfg.n_layers)
    self._layers = (layers, weight_adapters, activations, prefix_kv)

  @property
  def n_virtual(self) -> int:
    return self.peft.prompt.n if self._virtual else 0

  def _sources(self, layers):
    """The decoder's layer sources: this model's, after the base model's lowest layers when
    AdapterDrop leaves them without adapters."""
    source = LayerSource(layers, self._layer)
    if self._below is None:
      return source
    return LayerSource(self._below, lambda i: (self._pick(i), {})), source

  def _layer(self, xs):
    """One layer's (parameters with adapters folded in, Block keyword arguments)."""
    layer, adapters, activations, prefix_kv, *key = xs
    if self._pick is not None:  # AdapterDrop: a layer index into the whole stack
      layer = self._pick(layer)
    peft, extras = self.peft, {}
    if prefix_kv is not None:
      extras["prefix_kv"] = (prefix_kv[0], prefix_kv[1])
    houlsby = activations.get("adapter")
    if not activations:  # no adapters in the parameters (DPO's reference: the base model)
      pass
    elif peft.method == "adapter":
      extras["adapters"] = {w: functools.partial(bottleneck, p=p) for w, p in houlsby.items()}
    elif peft.method == "fusion":
      extras["adapters"] = {w: functools.partial(unified.fusion, adapters=p,
                                                 p=activations["fusion"][w])
                            for w, p in houlsby.items()}
    elif peft.method == "mam":
      extras["parallel"] = functools.partial(unified.parallel_adapter, p=activations["parallel"],
                                             scale=peft.mam_scale)
    elif peft.method == "unipelt":
      extras["adapters"] = {"mlp": functools.partial(unified.gated_adapter, p=houlsby["mlp"])}
      extras["prefix_gate"] = unified.prefix_gate(activations["prefix_gate"])
      deltas: dict = {}
      for module, name in peft.targets:
        deltas = _replace(deltas, (*PATHS[module], name),
                          unified.gated_low_rank(adapters[module][name], peft.scale))
      extras["deltas"] = deltas
    if key:  # a lora / adalora training step: the low-rank path kept apart (split_layer)
      layer, extras["deltas"] = peft.split_layer(layer, adapters, key[0])
      return layer, extras
    return peft.fold_layer(layer, adapters, self._shared), extras

  def _context(self, tokens_bt, positions_bt, ctx: Context | None):
    """(positions, the decoder's Context): this model's layer source and virtual tokens added
    to `ctx`. `ctx.dropout_rng` (training steps): lora and adalora keep the low-rank path apart
    from the weights, with LoRA dropout when the PEFT config has some
    (`Peft.splits_in_training`)."""
    ctx = ctx or Context()
    layers = self._layers
    if ctx.dropout_rng is not None and self.peft.splits_in_training:
      layers = (*layers, jax.random.split(ctx.dropout_rng, self.peft.adapted_layers))
    virtual, start = self._virtual, ctx.start
    if ctx.cache is not None and self.n_virtual:  # the virtual tokens sit in the first slots
      b, t = tokens_bt.shape
      if positions_bt is None:
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      positions_bt, start, virtual = positions_bt + self.n_virtual, start + self.n_virtual, {}
    return positions_bt, dataclasses.replace(
        ctx, start=start, layers=self._sources(layers), **virtual)

  def hidden(self, tokens_bt, positions_bt=None, segment_ids_bt=None,
             ctx: Context | None = None):
    """As `Decoder.hidden`."""
    positions_bt, ctx = self._context(tokens_bt, positions_bt, ctx)
    return self.decoder.hidden(tokens_bt, positions_bt, segment_ids_bt, ctx)

  def forward(self, tokens_bt, positions_bt=None, segment_ids_bt=None,
              ctx: Context | None = None):
    """As `Decoder.forward`: (hidden, aux sums)."""
    positions_bt, ctx = self._context(tokens_bt, positions_bt, ctx)
    return self.decoder.forward(tokens_bt, positions_bt, segment_ids_bt, ctx)

  def logits(self, h):
    return self.decoder.logits(h)

  def values(self, h):
    return self.decoder.values(h)

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> dict:
    """A cache of n_virtual + `length` slots, the virtual tokens' keys and values in the first
    n (segment VIRTUAL, seen by every row)."""
    n = self.n_virtual
    cache = self.decoder.init_cache(batch, n + length, dtype)
    if not n:
      return cache
    if self._prefix_kv is None:  # prompt, ptuning: run the virtual tokens through the layers
      empty = jnp.zeros((batch, 0), jnp.int32)
      _, cache = self.decoder.hidden(empty, empty, empty, Context(
          cache=cache, layers=self._sources(self._layers), **self._virtual))
      return cache
    kv = jnp.broadcast_to(self._prefix_kv[:, :, None].astype(dtype),
                          (self.cfg.n_layers, 2, batch, *self._prefix_kv.shape[2:]))
    cache["k"] = cache["k"].at[:, :, :n].set(kv[:, 0])
    cache["v"] = cache["v"].at[:, :, :n].set(kv[:, 1])
    cache["positions"] = cache["positions"].at[:, :n].set(jnp.arange(n, dtype=jnp.int32))
    cache["segment_ids"] = cache["segment_ids"].at[:, :n].set(VIRTUAL)
    return cache

  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
    return self.logits(self.hidden(tokens_bt, positions_bt, segment_ids_bt))
