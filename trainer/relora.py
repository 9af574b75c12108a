"""ReLoRA (Lialin et al., 2023): high-rank training out of low-rank steps.

`peft.method=relora` trains LoRA adapters, and every `peft.relora_every` steps:
  - merges them into the base weights: W <- W + s * A @ B (the model's function is unchanged);
  - starts them again as LoRA does (A random, B = 0), so the next stretch learns a new low-rank
    update on top of the merged one: after n merges W - W_0 can have rank up to n * r;
  - prunes the adapters' Adam moments by magnitude (`peft.relora_prune` of each tensor's
    entries, those of smallest |mu|, set to zero in both moments), so the new adapters do not
    follow the old ones' path;
  - restarts the learning rate from zero with a linear warmup of `peft.relora_warmup` steps
    (the jagged schedule, trainer/optim.py `jagged`).

The merge runs inside the train step, after the optimizer update (a `state.Extra` with access
to the optimizer state), so it is checkpointed and resumed like any other step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from models.peft import Peft
from trainer import state as state_lib


def prune_moments(opt_state, fraction: float):
  """The Adam moments of the adapters (leaves under "peft") pruned by magnitude: in each tensor
  the `fraction` of entries with the smallest first moment |mu| set to zero in mu and in nu
  alike; everything else as it was. (Pruning nu apart from mu, as ReLoRA's code does, leaves
  first moments over zero second moments, and Adam's step mu / (sqrt(nu) + eps) for them is
  mu / eps: right after a merge A's gradient is zero (B = 0), and our adapters blew up.)"""
  if fraction == 0.0:
    return opt_state

  def pruned(path, mu, moment):
    """`moment` (mu or nu) zeroed where |mu| is among the smallest `fraction` of its tensor."""
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    if "peft" not in names or mu.size < 2:
      return moment
    keep = jnp.abs(mu) > jnp.quantile(jnp.abs(mu.astype(jnp.float32)), fraction)
    return jnp.where(keep, moment, 0)

  def adam(state):
    if not isinstance(state, optax.ScaleByAdamState):
      return state
    return state._replace(
        mu=jax.tree_util.tree_map_with_path(lambda p, mu: pruned(p, mu, mu), state.mu),
        nu=jax.tree_util.tree_map_with_path(pruned, state.mu, state.nu))

  return jax.tree.map(adam, opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))


def restart(peft: Peft, params: dict, key) -> dict:
  """The adapters merged into the base weights and initialised again (B = 0: the same
  function), every leaf in its own dtype."""
  merged = peft.merge(params)
  merged = jax.tree.map(lambda new, old: new.astype(old.dtype), merged,
                        {k: v for k, v in params.items() if k != "peft"})
  _, adapters = peft.init(merged, key)
  adapters = jax.tree.map(lambda new, old: new.astype(old.dtype), adapters, params["peft"])
  return {**merged, "peft": adapters}


def extra(peft: Peft, prune: float, seed: int) -> state_lib.Extra:
  """The train state's "relora" entry: how many merges so far; the merge itself runs after the
  optimizer update of every `peft.restart_every`-th step."""
  every = peft.restart_every

  def after_update(step, params, grads, merges, opt_state):
    del grads

    def merge(args):
      params, opt_state, merges = args
      key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
      return restart(peft, params, key), prune_moments(opt_state, prune), merges + 1

    params, opt_state, merges = jax.lax.cond(step % every == 0, merge, lambda args: args,
                                             (params, opt_state, merges))
    return params, merges, opt_state

  return state_lib.Extra("relora", init=lambda params: jnp.zeros((), jnp.int32),
                         shardings=lambda shardings, replicated: replicated,
                         after_update=after_update)
