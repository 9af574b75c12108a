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
from parallel import rules as rules_lib

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelHandle:
  cfg: ModelConfig
  graphdef: Any
  template: Any  # nnx.State of ShapeDtypeStruct
  axes: Params  # logical axis names of each parameter, same tree as the params

  def abstract_params(self) -> Params:
    return nnx.to_pure_dict(self.template)

  def bind(self, params: Params) -> Decoder:
    """The module with these parameters. The template is copied, never modified."""
    state = jax.tree.map(lambda x: x, self.template)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)


def model_handle(cfg: ModelConfig) -> ModelHandle:
  abstract = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0)))
  graphdef, template = nnx.split(abstract)
  axes: Params = {}
  for path, variable in nnx.to_flat_state(template):
    node = axes
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = tuple(variable.get_metadata()["out_sharding"])
  return ModelHandle(cfg, graphdef, template, axes)


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
                dtype=jnp.float32) -> Params:
  """Initialise directly into the target shardings: no host holds the whole model."""

  def init(key):
    params = nnx.to_pure_dict(nnx.split(Decoder(handle.cfg, nnx.Rngs(params=key)))[1])
    return cast_floating(params, dtype)

  return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Params,
                        moment_shardings: Params, mesh: Mesh) -> Any:
  """Optimizer state shardings: each moment like `moment_shardings` of its parameter, scalars
  (step counts) replicated."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), moment_shardings,
      transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, NamedSharding))


def state_shardings(p_shardings: Params, opt_shardings: Any, mesh: Mesh) -> dict[str, Any]:
  replicated = NamedSharding(mesh, P())
  return {"step": replicated, "params": p_shardings, "opt_state": opt_shardings,
          "rng": replicated}


def with_memory_kind(shardings, kind: str):
  return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def new_state(tx, params: Params, seed: int) -> dict[str, Any]:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": jax.random.PRNGKey(seed + 1)}


def init_state(tx, params: Params, seed: int, shardings: dict[str, Any]) -> dict[str, Any]:
  return jax.jit(lambda p: new_state(tx, p, seed), out_shardings=shardings,
                 donate_argnums=0)(params)


def abstract_state(tx, abstract_params: Params, seed: int, shardings: dict[str, Any]):
  """ShapeDtypeStructs of the train state, carrying their shardings (a restore target)."""
  shapes = jax.eval_shape(lambda p: new_state(tx, p, seed), abstract_params)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)
