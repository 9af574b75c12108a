"""The train state and how a model is built, placed and bound to parameters.

Parameters travel as plain nested dicts of arrays (`nnx.to_pure_dict`): optax, orbax,
safetensors export and PEFT masks all work on them directly. `ModelHandle` keeps the static
half (the NNX graph and an abstract state) so a module can be rebuilt from any such dict, also
inside `jax.jit`.

The train state is a dict: {"step": int32, "params": ..., "opt_state": ..., "rng": uint32[2]}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models import Decoder, ModelConfig
from models.kernels.flashmask import VIRTUAL
from models.peft import Peft, adalora
from parallel import rules as rules_lib
from trainer import guard

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelHandle:
  cfg: ModelConfig
  graphdef: Any
  template: Any  # nnx.State of ShapeDtypeStruct
  axes: Params  # logical axis names of each parameter, same tree as the params
  peft: Peft | None = None  # adapters, stored under params["peft"]

  def abstract_params(self) -> Params:
    params = nnx.to_pure_dict(self.template)
    if self.peft is not None:
      params, _ = self.peft.base_abstract(params, None)
      if self.peft.method != "bitfit":
        params["peft"] = self.peft.abstract()
    return params

  def bind(self, params: Params):
    """The module with these parameters. With PEFT, a `PeftModel`: the same methods, with
    adapters folded into each layer's weights inside the decoder's scan. The template is never
    modified."""
    state = jax.tree.map(lambda x: x, self.template)
    if self.peft is None:
      nnx.replace_by_pure_dict(state, params)
      return nnx.merge(self.graphdef, state)
    outside = {k: v for k, v in params.items() if k not in ("layers", "peft")}
    nnx.replace_by_pure_dict(state, outside)  # the layers keep their abstract template
    return PeftModel(nnx.merge(self.graphdef, state), self.peft, params)


class PeftModel:
  """A decoder whose layer weights are folded from stored weights and adapters layer by layer
  (`Peft.fold_layer`): the full set of merged weights never exists at once. Virtual tokens
  (prompt, P- and prefix tuning) go to the decoder, which places them; with a KV cache they are
  written into its first slots by `init_cache` and the real tokens come after them."""

  def __init__(self, decoder: Decoder, peft: Peft, params: Params):
    self.decoder, self.cfg, self.peft = decoder, decoder.cfg, peft
    adapters = params.get("peft", {})
    self._shared = adapters.get("vera_shared")
    layer_adapters = {m: v for m, v in adapters.items()
                      if m not in ("vera_shared", "adapter", "prompt")}
    prefix_kv = None
    self._virtual = {}  # keyword arguments of Decoder.hidden (no cache)
    if "prompt" in adapters and peft.method == "prefix":
      prefix_kv = peft.prompt.prefix_kv(adapters["prompt"])  # (layers, 2, n, kv_heads, hd)
      self._virtual = {"prefix_keys": peft.prompt.n}
    elif "prompt" in adapters:
      self._virtual = {"prefix_embeds": peft.prompt.embeddings(adapters["prompt"])}
    self._prefix_kv = prefix_kv
    self._layers = (params["layers"], layer_adapters, adapters.get("adapter"), prefix_kv)

  @property
  def n_virtual(self) -> int:
    return self.peft.prompt.n if self._virtual else 0

  def _layer(self, xs):
    """One layer's (parameters with adapters folded in, Block keyword arguments)."""
    layer, adapters, houlsby, prefix_kv, *key = xs
    extras = {} if houlsby is None else {"adapters": houlsby}
    if prefix_kv is not None:
      extras["prefix_kv"] = (prefix_kv[0], prefix_kv[1])
    if key:  # a lora / adalora training step: the low-rank path kept apart (split_layer)
      layer, extras["deltas"] = self.peft.split_layer(layer, adapters, key[0])
      return layer, extras
    return self.peft.fold_layer(layer, adapters, self._shared), extras

  def hidden(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache=None, start=0,
             dropout_rng=None, **kwargs):
    """`dropout_rng` (training steps): lora and adalora keep the low-rank path apart from the
    weights, with LoRA dropout when the PEFT config has some (`Peft.splits_in_training`)."""
    layers = self._layers
    if dropout_rng is not None and self.peft.splits_in_training:
      layers = (*layers, jax.random.split(dropout_rng, self.cfg.n_layers))
    virtual = self._virtual
    if cache is not None and self.n_virtual:  # the virtual tokens sit in the first slots
      b, t = tokens_bt.shape
      if positions_bt is None:
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      positions_bt, start, virtual = positions_bt + self.n_virtual, start + self.n_virtual, {}
    return self.decoder.hidden(tokens_bt, positions_bt, segment_ids_bt, cache, start,
                               layer_params=layers, layer_fn=self._layer, **virtual, **kwargs)

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
      _, cache = self.decoder.hidden(empty, empty, empty, cache, 0, layer_params=self._layers,
                                     layer_fn=self._layer, **self._virtual)
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


def model_handle(cfg: ModelConfig, peft: Peft | None = None) -> ModelHandle:
  abstract = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0)))
  graphdef, template = nnx.split(abstract)
  axes: Params = {}
  for path, variable in nnx.to_flat_state(template):
    node = axes
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(variable.get_metadata()["out_sharding"])
  if peft is not None:
    _, axes = peft.base_abstract(nnx.to_pure_dict(template), axes)
    if peft.method != "bitfit":
      axes["peft"] = peft.axes()
  return ModelHandle(cfg, graphdef, template, axes, peft)


def is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x)


def param_shardings(handle: ModelHandle, mesh: Mesh, rules: rules_lib.Rules) -> Params:
  """A NamedSharding per parameter (or per same-shaped gradient or optimizer moment)."""
  return jax.tree.map(lambda names, x: rules_lib.sharding(names, mesh, rules, x.shape),
                      handle.axes, handle.abstract_params(), is_leaf=is_axes)


def cast_floating(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def init_params(handle: ModelHandle, seed: int, shardings: Params | None = None,
                dtype=jnp.float32, base: Params | None = None,
                model_shardings: Params | None = None) -> Params:
  """Initialise directly into the target shardings: no host holds the whole model. `base`:
  model weights to start from (e.g. a Hugging Face import) instead of random ones; adapters are
  added to either when the handle has PEFT (whose stored layout `shardings` describes, while
  `model_shardings` places the plain model's weights before that)."""
  if handle.peft is None:
    model_shardings = shardings
  if base is None:
    def init(key):
      params = nnx.to_pure_dict(nnx.split(Decoder(handle.cfg, nnx.Rngs(params=key)))[1])
      return cast_floating(params, dtype)
    base = jax.jit(init, out_shardings=model_shardings)(jax.random.PRNGKey(seed))
  if handle.peft is None:
    return base

  def add_adapters(base, key):
    new_base, adapters = handle.peft.init(base, key)
    return cast_floating({**new_base, **({"peft": adapters} if adapters else {})}, dtype)

  return jax.jit(add_adapters, out_shardings=shardings, donate_argnums=0)(
      base, jax.random.PRNGKey(seed + 7))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Params,
                        moment_shardings: Params, mesh: Mesh) -> Any:
  """Optimizer state shardings: each moment like `moment_shardings` of its parameter, the rest
  (step counts) replicated. A moment is recognised by its key path ending with its parameter's
  path and having its shape, which also holds inside masked (PEFT) states, where frozen
  parameters have no moments at all."""
  replicated = NamedSharding(mesh, P())
  by_path = {}
  for path, (x, s) in jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda x, s: (x, s), abstract_params, moment_shardings,
                   is_leaf=lambda x: isinstance(x, NamedSharding)),
      is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2)[0]:
    by_path[_keys(path)] = (x.shape, s)

  def pick(path, leaf):
    keys = _keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, abstract_params))


def _keys(path) -> tuple:
  return tuple(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def state_shardings(p_shardings: Params, opt_shardings: Any, mesh: Mesh,
                    lisa_k: int = 0, allocator=None, reference: bool = False,
                    loss_scale: float | None = None) -> dict[str, Any]:
  replicated = NamedSharding(mesh, P())
  out = {"step": replicated, "params": p_shardings, "opt_state": opt_shardings, "rng": replicated,
         "guard": jax.tree.map(lambda _: replicated, guard.init(loss_scale))}
  if reference:
    out["reference"] = p_shardings
  if lisa_k:
    out["lisa_layers"] = replicated
  if allocator is not None:  # AdaLoRA: EMAs like their adapters, rank patterns replicated
    out["adalora"] = {"ipt": p_shardings["peft"], "unc": p_shardings["peft"],
                      "keep": jax.tree.map(lambda _: replicated,
                                           adalora.lambdas(p_shardings["peft"]))}
  return out


def with_memory_kind(shardings, kind: str):
  return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def new_state(tx, params: Params, seed: int, lisa_k: int = 0, allocator=None,
              reference: bool = False, loss_scale: float | None = None) -> dict[str, Any]:
  """`lisa_k`: LISA's optimizer works on k layers at a time (trainer/lisa.py). `allocator`:
  AdaLoRA's, whose importance EMAs and rank pattern are part of the state. `reference`: DPO with
  full fine-tuning keeps the starting parameters, frozen, as its reference model. `loss_scale`:
  float16's initial loss scale (trainer/guard.py)."""
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "rng": jax.random.PRNGKey(seed + 1),
           "guard": guard.init(loss_scale)}
  if lisa_k:
    from trainer import lisa  # noqa: PLC0415 -- lisa imports step, which imports this module
    state["opt_state"] = lisa.init_opt_state(tx, params, lisa_k)
    state["lisa_layers"] = jnp.arange(lisa_k, dtype=jnp.int32)
  else:
    state["opt_state"] = tx.init(params)
  if allocator is not None:
    state["adalora"] = allocator.init_state(params["peft"])
  if reference:
    state["reference"] = jax.tree.map(jnp.copy, params)
  return state


def init_state(tx, params: Params, seed: int, shardings: dict[str, Any],
               lisa_k: int = 0, allocator=None, reference: bool = False,
               loss_scale: float | None = None) -> dict[str, Any]:
  return jax.jit(lambda p: new_state(tx, p, seed, lisa_k, allocator, reference, loss_scale),
                 out_shardings=shardings, donate_argnums=0)(params)


def abstract_state(tx, abstract_params: Params, seed: int, shardings: dict[str, Any],
                   lisa_k: int = 0, allocator=None, reference: bool = False,
                   loss_scale: float | None = None):
  """ShapeDtypeStructs of the train state, carrying their shardings (a restore target)."""
  shapes = jax.eval_shape(
      lambda p: new_state(tx, p, seed, lisa_k, allocator, reference, loss_scale), abstract_params)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)
