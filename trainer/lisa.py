"""LISA (arXiv 2403.17919): full-parameter fine-tuning where only `k` randomly chosen layers,
plus everything outside the layers (embeddings, final norm, head), train at a time; the choice
is redrawn every `interval` steps.

Memory: the optimizer works on a "trainable view" of the parameters, {"outside": embeddings,
norm and head, "active": the k chosen layers gathered into arrays with a leading axis of k}, so
Adam's moments exist for k layers, not for all of them. When the layers are redrawn, the active
layers' moments restart from zero (they belonged to the previous layers); the outside moments
carry on. Gradients are taken with respect to the view only, so frozen layers cost no weight
gradients either.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from trainer import guard
from trainer.step import Batch, make_loss_fn, mean_gradients


def view(params: dict, layers: jax.Array) -> dict:
  """The trainable view for active layer indices `layers` (k,)."""
  return {"outside": {k: v for k, v in params.items() if k != "layers"},
          "active": jax.tree.map(lambda x: x[layers], params["layers"])}


def view_shardings(shardings: dict) -> dict:
  """Shardings for `view`: the active layers are placed like the stacked layers."""
  return {"outside": {k: v for k, v in shardings.items() if k != "layers"},
          "active": shardings["layers"]}


def merge(params: dict, trainable: dict, layers: jax.Array) -> dict:
  """Full parameters with the view written back."""
  stacked = jax.tree.map(lambda full, act: full.at[layers].set(act.astype(full.dtype)),
                         params["layers"], trainable["active"])
  return {**trainable["outside"], "layers": stacked}


def draw(key, n_layers: int, k: int) -> jax.Array:
  return jnp.sort(jax.random.choice(key, n_layers, (k,), replace=False)).astype(jnp.int32)


def init_opt_state(tx: optax.GradientTransformation, params: dict, k: int):
  return tx.init(view(params, jnp.arange(k, dtype=jnp.int32)))


def make_train_step(handle, tx: optax.GradientTransformation, schedule, compute_dtype,
                    grad_accum: int, k: int, interval: int, neftune_alpha: float = 0.0,
                    spec=None) -> Callable:
  """The train step for a state with "lisa_layers" (k,) int32 and an optimizer state over
  `view`; otherwise as trainer/step.py's."""
  loss_fn = make_loss_fn(handle, compute_dtype, neftune_alpha, spec)
  n_layers = handle.cfg.n_layers

  def train_step(state: dict[str, Any], batch: Batch):
    params, step = state["params"], state["step"]
    redraw = step % interval == 0
    layers = jnp.where(redraw, draw(jax.random.fold_in(state["rng"], 2), n_layers, k),
                       state["lisa_layers"])
    trainable = view(params, layers)
    fresh = tx.init(trainable)
    opt_state = jax.tree_util.tree_map_with_path(
        lambda path, old, new: jnp.where(redraw, new, old)
        if any(getattr(p, "key", None) == "active" for p in path) else old,
        state["opt_state"], fresh)
    rng = jax.random.fold_in(state["rng"], 1)

    def grads_of(trainable, micro, rng):
      def loss(t):
        loss_sum, count, aux = loss_fn(merge(params, t, layers), micro, rng)
        return loss_sum, (count, aux)
      (loss_sum, (count, aux)), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
      return (loss_sum, count, aux), grads

    loss_sum, count, _, grads = mean_gradients(
        lambda micro, r: grads_of(trainable, micro, r), batch, rng, grad_accum,
        lambda: jax.tree.map(jnp.zeros_like, trainable))
    denom = jnp.maximum(count, 1.0)
    updates, new_opt_state = tx.update(grads, opt_state, trainable)
    updated = optax.apply_updates(trainable, updates)
    ok = guard.all_finite(loss_sum, grads, updated)
    new_state = {  # a non-finite step changes no weight and no moment (trainer/guard.py)
        "step": step + 1,
        "params": guard.keep_if(ok, merge(params, updated, layers), params),
        "opt_state": guard.keep_if(ok, new_opt_state, opt_state),
        "rng": jax.random.fold_in(state["rng"], step),
        "lisa_layers": layers,
        "guard": guard.update(state["guard"], ok, 1),
    }
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(step), "tokens": count, "skipped": (~ok).astype(jnp.int32),
               "skipped_total": new_state["guard"]["skipped"],
               "nonfinite_streak": new_state["guard"]["streak"]}
    return new_state, metrics

  return train_step
