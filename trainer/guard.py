"""Steps that must not hurt: non-finite losses or gradients, and float16's dynamic loss scale.

The train state carries `guard`: {"skipped": steps skipped so far, "streak": skipped in a row}
and, with float16 compute, {"scale": the loss scale, "good": finite steps since it last
changed}. A step whose loss or gradients are not finite, or whose learning rate is not (then
the update would be), changes no parameter and no optimizer moment (`keep_if`); the trainer
stops once `streak` reaches train.max_nonfinite_steps. With float16 the loss is multiplied by
`scale` before the backward pass and the gradients divided by it after; an overflow halves the
scale, `period` finite steps in a row double it (the scheme of mixed-precision training,
Micikevicius et al. 2018).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init(loss_scale: float | None = None) -> dict:
  """The guard's state; `loss_scale`: the initial scale (float16), None without scaling."""
  state = {"skipped": jnp.zeros((), jnp.int32), "streak": jnp.zeros((), jnp.int32)}
  if loss_scale is not None:
    state.update(scale=jnp.asarray(loss_scale, jnp.float32), good=jnp.zeros((), jnp.int32))
  return state


def all_finite(*trees) -> jax.Array:
  leaves = [x for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def keep_if(ok, new, old):
  """`new` where the step was finite, else `old`, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def update(state: dict, ok, period: int) -> dict:
  out = {"skipped": state["skipped"] + (~ok).astype(jnp.int32),
         "streak": jnp.where(ok, 0, state["streak"] + 1)}
  if "scale" in state:
    good = jnp.where(ok, state["good"] + 1, 0)
    grow = good >= period
    out["scale"] = jnp.where(ok, jnp.where(grow, state["scale"] * 2.0, state["scale"]),
                             jnp.maximum(state["scale"] * 0.5, 1.0))
    out["good"] = jnp.where(grow, 0, good)
  return out
