"""The optax chain: global-norm clipping, AdamW with decoupled weight decay masked off norms and
biases, and a learning-rate schedule of linear warmup then cosine, linear or constant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")


def schedule(tc) -> optax.Schedule:
  """`tc` is the `train` section of the run config."""
  warmup = min(tc.warmup_steps, tc.steps)
  decay_steps = max(tc.steps - warmup, 1)
  peak, floor = tc.lr, tc.lr * tc.min_lr_ratio
  if tc.lr_schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=tc.min_lr_ratio)
  elif tc.lr_schedule == "linear":
    decay = optax.linear_schedule(peak, floor, decay_steps)
  elif tc.lr_schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"train.lr_schedule={tc.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
  """True where weight decay applies: every parameter except norm scales and biases."""
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name == "scale" or name.endswith("bias"))
  return jax.tree_util.tree_map_with_path(decays, params)


def jagged(sched: optax.Schedule, every: int, warmup: int) -> optax.Schedule:
  """ReLoRA's jagged schedule: `sched`, restarted from 0 with a linear warmup of `warmup`
  steps after every `every` steps (the first stretch keeps `sched`'s own warmup)."""
  if warmup == 0:
    return sched

  def lr(step):
    since = step % every
    ramp = jnp.where(step < every, 1.0, jnp.minimum(1.0, since / warmup))
    return sched(step) * ramp
  return lr


def make_optimizer(tc, labels=None, lora_plus_scale: float = 1.0, restart: tuple | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`labels` (a params-shaped tree of "trainable" / "lora_b" / "frozen", or a function of the
  params giving one; PEFT): frozen parameters get zero updates and no optimizer state, and their
  gradients are dropped before clipping, so the compiler never computes them. "lora_b" learns
  `lora_plus_scale` times faster (LoRA+). `restart` (ReLoRA): (every, warmup) of `jagged`."""
  sched = schedule(tc)
  if restart is not None:
    sched = jagged(sched, *restart)

  def adamw(lr):
    return optax.adamw(lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                       mask=decay_mask)

  clip = [optax.clip_by_global_norm(tc.clip_norm)] if tc.clip_norm > 0 else []
  if labels is None:
    return optax.chain(*clip, adamw(sched)), sched
  zero, keep = optax.set_to_zero(), optax.identity()
  scaled = lambda step: sched(step) * lora_plus_scale
  trains = jax.tree.map(lambda label: label != "frozen", labels)
  tx = optax.chain(
      optax.multi_transform({"frozen": zero, "trainable": keep, "lora_b": keep}, labels),
      *[optax.masked(c, trains) for c in clip],  # the norm of what trains only
      optax.multi_transform({"frozen": zero, "trainable": adamw(sched), "lora_b": adamw(scaled)},
                            labels))
  return tx, sched
