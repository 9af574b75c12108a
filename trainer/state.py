"""The train state, described by a spec: named model slots and the extras features register.

A run holds one or more named models ("slots"): the model being trained ("policy"), and for
some objectives others, trained with optimizers of their own (later a critic) or frozen (DPO's
reference, later a teacher or a reward model). Features add extras to the state: the guard
(skipped non-finite steps and float16's loss scale, trainer/guard.py) always, AdaLoRA's rank
allocator, LISA's active layers (trainer/lisa.py). One `StateSpec` gives the initial state, the
abstract state (a restore target) and the shardings, so the three always agree, and checkpoints
hold exactly that tree.

Layout: {"step": int32, "rng": uint32[2], "guard": ..., "params": the first slot's parameters,
"opt_state": its optimizer state, <another slot>: {"params": ..., "opt_state": ...} when it
trains, else its parameters, <extra>: ...}. The first slot keeps the top level, so a
single-model run's checkpoint has the layout it always had.

The model side (`ModelHandle`, building and placing parameters) is models/handle.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.handle import ModelHandle, Params
from trainer import guard


class View:
  """What a trainable slot's optimizer updates: by default all its parameters (PEFT's frozen
  leaves are then masked inside the optimizer by the slot's `labels`). LISA (trainer/lisa.py)
  updates a few layers at a time through a view of its own, with an extra (`key`) in the state."""
  key: str | None = None  # the view's extra in the state, if any

  def init_extra(self):
    return None

  def select(self, params, extra):
    """The parameters (or a same-shaped tree, e.g. their shardings) the optimizer updates."""
    del extra
    return params

  def select_shardings(self, shardings):
    """`select` of a tree of shardings (where the optimizer's moments of the view live)."""
    return shardings

  def merge(self, params, selected, extra):
    """The slot's parameters with `selected` (updated) written back."""
    del params, extra
    return selected

  def opt_init(self, tx, params):
    return tx.init(params)

  def begin(self, state, tx, extra, opt_state, params):
    """At the start of a step: (extra, optimizer state) for this step."""
    del state, tx, params
    return extra, opt_state

  def trained_fraction(self, n_layers: int) -> float:
    """The share of the parameters (counting the outside ones as one layer) that train at once."""
    del n_layers
    return 1.0


@dataclasses.dataclass(frozen=True)
class Slot:
  """One named model of the state. `tx` None: frozen (no optimizer state, no gradients).

  `abstract_params`: ShapeDtypeStructs of its parameters as stored; `shardings` where they live;
  `model_shardings` where the plain model's weights go before PEFT storage (a Hugging Face base
  is loaded there); `moment_shardings` and `grad_shardings`, where optimizer moments and
  gradients live (ZeRO); `labels` (PEFT): "frozen" leaves get no gradients; `copy_of`: a frozen
  slot that starts as a copy of another slot's parameters (DPO's reference); `offload`: the
  memory kind its optimizer state rests in between steps."""
  name: str
  handle: ModelHandle
  abstract_params: Params
  shardings: Params
  dtype: Any = jnp.float32  # of its floating parameters as stored
  model_shardings: Params | None = None
  tx: optax.GradientTransformation | None = None
  schedule: Callable | None = None
  moment_shardings: Params | None = None
  grad_shardings: Params | None = None
  labels: Params | None = None
  view: View = View()
  copy_of: str | None = None
  offload: str | None = None

  @property
  def trains(self) -> bool:
    return self.tx is not None

  def train_mask(self, selected) -> list[bool]:
    """Per leaf of the view's tree: does it get gradients?"""
    if self.labels is None:
      return [True] * len(jax.tree.leaves(selected))
    return [label != "frozen" for label in jax.tree.leaves(self.labels)]


@dataclasses.dataclass(frozen=True)
class Extra:
  """A feature's part of the state. `init(params by slot)` its initial value; `shardings(param
  shardings by slot, replicated)` where it lives; `after_update(step, slot params, slot
  gradients, value, slot optimizer state) -> (params, value, optimizer state)` runs after the
  optimizer update of slot `slot` (AdaLoRA reallocates ranks there, ReLoRA merges its adapters
  and prunes their moments)."""
  key: str
  init: Callable
  shardings: Callable
  slot: str = "policy"
  after_update: Callable | None = None


@dataclasses.dataclass(frozen=True)
class StateSpec:
  slots: tuple[Slot, ...]
  mesh: Mesh
  extras: tuple[Extra, ...] = ()
  loss_scale: float | None = None  # float16: the guard's initial loss scale

  # --- slots and where they sit in the state --------------------------------------------------

  def slot(self, name: str) -> Slot:
    for s in self.slots:
      if s.name == name:
        return s
    raise KeyError(name)

  @property
  def primary(self) -> Slot:
    return self.slots[0]

  @property
  def trainable(self) -> tuple[Slot, ...]:
    return tuple(s for s in self.slots if s.trains)

  def params(self, state, name: str):
    s = self.slot(name)
    if s is self.primary:
      return state["params"]
    return state[name]["params"] if s.trains else state[name]

  def opt_state(self, state, name: str):
    return state["opt_state"] if self.slot(name) is self.primary else state[name]["opt_state"]

  def all_params(self, state) -> dict[str, Params]:
    """{slot name: its parameters}: what the models of a step are bound to."""
    return {s.name: self.params(state, s.name) for s in self.slots}

  def _place(self, out: dict, slot: Slot, params, opt_state) -> None:
    if slot is self.primary:
      out["params"] = params
      if slot.trains:
        out["opt_state"] = opt_state
    elif slot.trains:
      out[slot.name] = {"params": params, "opt_state": opt_state}
    else:
      out[slot.name] = params

  def with_slot(self, state, name: str, params, opt_state=None) -> dict:
    out = dict(state)
    self._place(out, self.slot(name), params, opt_state)
    return out

  # --- the state, its shardings, its abstract form --------------------------------------------

  def new(self, params: dict[str, Params], seed: int) -> dict[str, Any]:
    """The initial state from the stored slots' parameters ({name: params}; `copy_of` slots
    are copied from theirs). Traceable: `init` runs it under jit."""
    params = dict(params)
    for s in self.slots:
      if s.copy_of is not None:
        params[s.name] = jax.tree.map(jnp.copy, params[s.copy_of])
    state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(seed + 1),
             "guard": guard.init(self.loss_scale)}
    for s in self.slots:
      opt_state = None
      if s.trains:
        opt_state = s.view.opt_init(s.tx, params[s.name])
        if s.view.key is not None:
          state[s.view.key] = s.view.init_extra()
      self._place(state, s, params[s.name], opt_state)
    for e in self.extras:
      state[e.key] = e.init(params)
    return state

  def opt_shardings(self, slot: Slot, device: bool = False):
    """Where a trainable slot's optimizer state lives between steps (`device`: where it is
    brought for the update when it rests in host memory)."""
    selected = jax.eval_shape(lambda p: slot.view.select(p, slot.view.init_extra()),
                              slot.abstract_params)
    out = opt_state_shardings(slot.tx, selected, slot.view.select_shardings(slot.moment_shardings),
                              self.mesh)
    if slot.offload and not device:
      out = with_memory_kind(out, slot.offload)
    return out

  def shardings(self) -> dict[str, Any]:
    replicated = NamedSharding(self.mesh, P())
    out = {"step": replicated, "rng": replicated,
           "guard": jax.tree.map(lambda _: replicated, guard.init(self.loss_scale))}
    for s in self.slots:
      opt = None
      if s.trains:
        opt = self.opt_shardings(s)
        if s.view.key is not None:
          out[s.view.key] = jax.tree.map(lambda _: replicated, s.view.init_extra())
      self._place(out, s, s.shardings, opt)
    for e in self.extras:
      out[e.key] = e.shardings({s.name: s.shardings for s in self.slots}, replicated)
    return out

  def abstract(self) -> dict[str, Any]:
    """ShapeDtypeStructs of the train state, carrying their shardings (a restore target)."""
    stored = {s.name: s.abstract_params for s in self.slots if s.copy_of is None}
    shapes = jax.eval_shape(lambda p: self.new(p, 0), stored)  # (any seed will do)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, self.shardings())

  def init(self, params: dict[str, Params], seed: int) -> dict[str, Any]:
    """The initial state, placed; the parameters given are donated."""
    return jax.jit(lambda p: self.new(p, seed), out_shardings=self.shardings(),
                   donate_argnums=0)(params)


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


def with_memory_kind(shardings, kind: str):
  return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings,
                      is_leaf=lambda x: isinstance(x, NamedSharding))
