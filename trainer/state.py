"""The train state: how it is made, placed and described for a restore.

The model side (`ModelHandle`, building and placing parameters) is models/handle.py. The train
state is a dict: {"step": int32, "params": ..., "opt_state": ..., "rng": uint32[2]}.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.handle import (ModelHandle, Params, cast_floating, init_params, is_axes,  # noqa: F401
                           model_handle, param_shardings)
from models.peft import adalora
from trainer import guard


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
