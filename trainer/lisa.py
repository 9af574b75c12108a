"""LISA (arXiv 2403.17919): full-parameter fine-tuning where only `k` randomly chosen layers,
plus everything outside the layers (embeddings, final norm, head), train at a time; the choice
is redrawn every `interval` steps.

Memory: the optimizer works on a view of the parameters (`LisaView`, a trainer/state.py `View`),
{"outside": embeddings, norm and head, "active": the k chosen layers gathered into arrays with a
leading axis of k}, so Adam's moments exist for k layers, not for all of them. When the layers
are redrawn, the active layers' moments restart from zero (they belonged to the previous
layers); the outside moments carry on. Gradients are taken with respect to the view only, so
frozen layers cost no weight gradients either. The train step is the one of trainer/step.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from trainer.state import View


def draw(key, n_layers: int, k: int) -> jax.Array:
  return jnp.sort(jax.random.choice(key, n_layers, (k,), replace=False)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class LisaView(View):
  """`k` of `n_layers` layers train at a time, redrawn every `interval` steps; the state's
  "lisa_layers" (k,) int32 holds the active ones."""
  k: int
  interval: int
  n_layers: int
  key = "lisa_layers"

  def init_extra(self):
    return jnp.arange(self.k, dtype=jnp.int32)

  def select(self, params, layers):
    return {"outside": {k: v for k, v in params.items() if k != "layers"},
            "active": jax.tree.map(lambda x: x[layers], params["layers"])}

  def select_shardings(self, shardings):
    """The active layers are placed like the stacked layers."""
    return {"outside": {k: v for k, v in shardings.items() if k != "layers"},
            "active": shardings["layers"]}

  def merge(self, params, selected, layers):
    stacked = jax.tree.map(lambda full, act: full.at[layers].set(act.astype(full.dtype)),
                           params["layers"], selected["active"])
    return {**selected["outside"], "layers": stacked}

  def opt_init(self, tx, params):
    return tx.init(self.select(params, self.init_extra()))

  def begin(self, state, tx, layers, opt_state, params):
    """Every `interval` steps: new layers, and fresh moments for them."""
    redraw = state["step"] % self.interval == 0
    layers = jnp.where(redraw, draw(jax.random.fold_in(state["rng"], 2), self.n_layers, self.k),
                       layers)
    fresh = tx.init(self.select(params, layers))
    opt_state = jax.tree_util.tree_map_with_path(
        lambda path, old, new: jnp.where(redraw, new, old)
        if any(getattr(p, "key", None) == "active" for p in path) else old,
        opt_state, fresh)
    return layers, opt_state

  def trained_fraction(self, n_layers: int) -> float:
    return (self.k + 1) / (n_layers + 1)
