"""The pure train and eval steps.

`train_step(state, batch) -> (state, metrics)` does gradient accumulation inside (a scan over
microbatches), mixed precision (float32 master weights cast to the compute dtype for the forward
and backward pass) and the optimizer update. The loss of a batch is the sum of token losses over
all its microbatches divided by the number of counted tokens, so 2 microbatches of 2 give the same
update as one batch of 4.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from parallel import ring_attention
from trainer import losses
from trainer.state import ModelHandle, cast_floating

Batch = dict[str, jax.Array]


def split_microbatches(batch: Batch, n: int) -> Batch:
  """(batch, ...) -> (n, batch // n, ...). Microbatch i takes rows i, i+n, i+2n, ... so that
  every device keeps its own rows when the batch dimension is sharded."""
  def split(x):
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_loss_fn(handle: ModelHandle, compute_dtype) -> Callable:
  def loss_fn(params, batch: Batch):
    if handle.cfg.attention_impl == "ring" and ring_attention.sequence_parallel_size() > 1:
      order = ring_attention.layout(batch["inputs"].shape[1])  # load balance
      batch = {k: v[:, order] for k, v in batch.items()}
    model = handle.bind(cast_floating(params, compute_dtype))
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return losses.lm_loss(logits, batch["targets"], batch["weights"])
  return loss_fn


def make_train_step(handle: ModelHandle, tx: optax.GradientTransformation, schedule,
                    compute_dtype, grad_accum: int, grad_shardings=None,
                    opt_device_shardings=None) -> Callable:
  """`grad_shardings`: where gradients live (ZeRO-2 shards them, so the data-parallel sum is a
  reduce-scatter rather than an all-reduce); None leaves it to the compiler.
  `opt_device_shardings`: when the optimizer state rests in host memory (offload), where it is
  brought for the update; the step's out_shardings send it back."""
  value_and_grad = jax.value_and_grad(make_loss_fn(handle, compute_dtype), has_aux=True)

  def grad_fn(params, batch):
    out, grads = value_and_grad(params, batch)
    if grad_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    return out, grads

  def train_step(state: dict[str, Any], batch: Batch):
    params = state["params"]
    if grad_accum == 1:
      (loss_sum, count), grads = grad_fn(params, batch)
    else:
      def accumulate(carry, micro):
        (loss_sum, count), grads = grad_fn(params, micro)
        acc_grads, acc_loss, acc_count = carry
        return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss_sum, acc_count + count), None
      zeros = jax.tree.map(jnp.zeros_like, params)
      if grad_shardings is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
      (grads, loss_sum, count), _ = jax.lax.scan(
          accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
          split_microbatches(batch, grad_accum))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
    grad_norm = optax.tree.norm(grads)
    opt_state = state["opt_state"]
    if opt_device_shardings is not None:
      opt_state = jax.device_put(opt_state, opt_device_shardings)
    updates, opt_state = tx.update(grads, opt_state, params)
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "rng": jax.random.fold_in(state["rng"], state["step"]),
    }
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "tokens": count}
    return new_state, metrics

  return train_step


def make_eval_step(handle: ModelHandle, compute_dtype) -> Callable:
  loss_fn = make_loss_fn(handle, compute_dtype)

  def eval_step(params, batch: Batch):
    return loss_fn(params, batch)

  return eval_step
