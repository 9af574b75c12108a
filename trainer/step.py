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

from models.decoder import Context
from models.peft import adalora
from parallel import ring_attention
from trainer import guard, losses, objectives
from models.handle import ModelHandle, cast_floating

Batch = dict[str, jax.Array]


def split_microbatches(batch: Batch, n: int) -> Batch:
  """(batch, ...) -> (n, batch // n, ...). Microbatch i takes rows i, i+n, i+2n, ... so that
  every device keeps its own rows when the batch dimension is sharded."""
  def split(x):
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def mean_gradients(grad_fn: Callable, batch: Batch, rng, grad_accum: int, zeros: Callable):
  """(loss sum, count, aux sums, gradients / count) over `grad_accum` microbatches, accumulated
  in a scan. grad_fn(microbatch, rng) -> ((loss sum, count, aux sums), gradients); zeros() the
  gradient accumulator."""
  if grad_accum == 1:
    (loss_sum, count, aux), grads = grad_fn(batch, rng)
  else:
    def accumulate(carry, xs):
      micro, i = xs
      out, grads = grad_fn(micro, jax.random.fold_in(rng, i))
      acc_out, acc_grads = carry
      return (jax.tree.map(jnp.add, acc_out, out), jax.tree.map(jnp.add, acc_grads, grads)), None
    micro = jax.tree.map(lambda x: x[0], split_microbatches(batch, grad_accum))
    shapes = jax.eval_shape(lambda m: grad_fn(m, rng)[0], micro)
    acc = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    ((loss_sum, count, aux), grads), _ = jax.lax.scan(
        accumulate, (acc, zeros()), (split_microbatches(batch, grad_accum), jnp.arange(grad_accum)))
  denom = jnp.maximum(count, 1.0)
  return loss_sum, count, aux, jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)


def make_loss_fn(handle: ModelHandle, compute_dtype, neftune_alpha: float = 0.0,
                 spec: objectives.Spec | None = None) -> Callable:
  """loss_fn(params, batch, rng=None, reference=None) -> (loss sum, count, aux sums) for the
  objective `spec` (default: lm); the mean is sum / count, and so is each aux metric.

  An rng means a training step: then NEFTune noise (with `neftune_alpha`) goes on the input
  embeddings, lora's low-rank path is kept apart from the weights (with its dropout, if any), and
  AdaLoRA's orthogonality penalty joins the loss (as count x weight x penalty, so that it is
  weight x penalty after the division by the count).
  `reference` (dpo, full fine-tuning): the frozen reference model's parameters; with PEFT the
  reference is the same parameters with the adapters switched off, and with
  `dpo.precompute_ref` the batch brings its log-probs."""
  peft = handle.peft
  spec = spec or objectives.Spec()
  pairs = spec.objective in ("dpo", "reward")

  def forward(params, batch, rng=None):
    model = handle.bind(cast_floating(params, compute_dtype))
    noise = (rng, neftune_alpha) if neftune_alpha and rng is not None else None
    extra = {"shared_prompt": True} if pairs else {}
    if rng is not None and peft is not None and peft.splits_in_training:
      extra["dropout_rng"] = jax.random.fold_in(rng, 2)
    hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                          Context(embed_noise=noise, **extra))
    return model, hidden

  def loss_fn(params, batch: Batch, rng=None, reference=None):
    n_pairs = objectives.max_pairs(batch["inputs"].shape[1])
    if pairs:
      batch = {**batch, "last": objectives.last_positions(batch["segment_ids"])}
    if handle.run.attention_impl == "ring" and ring_attention.sequence_parallel_size() > 1:
      order = ring_attention.layout(batch["inputs"].shape[1])  # load balance
      batch = {k: v[:, order] for k, v in batch.items()}
    model, hidden = forward(params, batch, rng)
    seg, w = batch["segment_ids"], batch["weights"]
    if spec.objective == "reward":
      scores = objectives.pair_sums(model.values(hidden) * batch["last"], seg, n_pairs)
      present = objectives.pair_sums(batch["last"], seg, n_pairs)
      valid = (present[0] > 0) & (present[1] > 0)
      out = objectives.pair_metrics(objectives.bradley_terry(*scores), *scores, valid)
    else:
      nll = losses.token_nll(model.logits(hidden), batch["targets"])
      if spec.objective == "dpo":
        out = dpo_metrics(params, batch, nll, reference, n_pairs)
      elif spec.objective == "sft" and spec.sft_normalize == "sequence":
        out = (*objectives.sequence_sums(nll, w, seg), {})
      else:
        out = (jnp.sum(nll * w), jnp.sum(w), {})
    loss_sum, count, aux = out
    if rng is not None and peft is not None and peft.orth_weight:
      loss_sum += count * peft.orth_weight * adalora.orthogonality(params["peft"])
    return loss_sum, count, aux

  def dpo_metrics(params, batch, nll, reference, n_pairs):
    seg, w = batch["segment_ids"], batch["weights"]
    pi_c, pi_r = objectives.pair_sums(-nll * w, seg, n_pairs)
    n_c, n_r = objectives.pair_sums(w, seg, n_pairs)
    if spec.dpo_loss in objectives.REFERENCE_FREE:
      ref_c = ref_r = jnp.zeros_like(pi_c)
    elif spec.precompute_ref:
      ref_c, ref_r = objectives.pair_sums(batch["reference"], seg, n_pairs)
    else:
      ref_params = reference if peft is None else peft.reference_params(params)
      ref_c, ref_r = jax.lax.stop_gradient(answer_logps(ref_params, batch))
    losses_, reward_c, reward_r = objectives.preference_losses(
        spec.dpo_loss, pi_c, pi_r, ref_c, ref_r, n_c, n_r, spec.beta, spec.label_smoothing,
        spec.simpo_gamma)
    if spec.dpo_loss == "orpo":  # plus the chosen answer's token-mean NLL
      losses_ = losses_ - pi_c / jnp.maximum(n_c, 1.0)
    return objectives.pair_metrics(losses_, reward_c, reward_r, (n_c > 0) & (n_r > 0))

  answer_logps = make_answer_logps(handle, compute_dtype)
  return loss_fn


def make_answer_logps(handle: ModelHandle, compute_dtype) -> Callable:
  """answer_logps(params, batch) -> (chosen, rejected), each (batch, pairs): the summed
  log-probs of each preference pair's answer tokens (the reference side of DPO)."""
  def answer_logps(params, batch):
    model = handle.bind(cast_floating(params, compute_dtype))
    hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                          Context(shared_prompt=True))
    logp = -losses.token_nll(model.logits(hidden), batch["targets"]) * batch["weights"]
    return objectives.pair_sums(logp, batch["segment_ids"],
                                objectives.max_pairs(batch["inputs"].shape[1]))
  return answer_logps


def make_train_step(handle: ModelHandle, tx: optax.GradientTransformation, schedule,
                    compute_dtype, grad_accum: int, grad_shardings=None,
                    opt_device_shardings=None, labels=None, neftune_alpha: float = 0.0,
                    spec: objectives.Spec | None = None, scale_period: int = 2000) -> Callable:
  """`grad_shardings`: where gradients live (ZeRO-2 shards them, so the data-parallel sum is a
  reduce-scatter rather than an all-reduce); None leaves it to the compiler.
  `opt_device_shardings`: when the optimizer state rests in host memory (offload), where it is
  brought for the update; the step's out_shardings send it back.
  `labels` (PEFT): gradients are taken with respect to the non-"frozen" leaves only, so frozen
  weights cost no weight-gradient matmuls, no accumulation buffers and no part in the norm.
  `neftune_alpha`: NEFTune noise on the input embeddings (training only). `spec`: the objective
  (trainer/objectives.py; default lm); a DPO reference model's parameters, when the objective
  needs them in every step, are the state's "reference". The state's "guard" (trainer/guard.py)
  skips non-finite steps and, with a "scale" (float16), scales the loss; `scale_period`: finite
  steps before the scale doubles."""
  loss_fn = make_loss_fn(handle, compute_dtype, neftune_alpha, spec)
  allocator = None if handle.peft is None else handle.peft.allocator
  train_mask = None if labels is None else [l != "frozen" for l in jax.tree.leaves(labels)]

  def grad_fn(params, batch, rng, reference=None, scale=None):
    """((loss sum, count, aux sums), gradients): a list over the trainable leaves, in tree
    order; with `scale`, the gradients of scale x loss (float16 loss scaling)."""
    flat, treedef = jax.tree.flatten(params)
    mask = train_mask or [True] * len(flat)

    def of_trainable(trainable, batch):
      it = iter(trainable)
      loss_sum, count, aux = loss_fn(
          treedef.unflatten([next(it) if m else x for x, m in zip(flat, mask)]), batch, rng,
          reference)
      scaled = loss_sum if scale is None else loss_sum * scale
      return scaled, (loss_sum, count, aux)

    (_, out), grads = jax.value_and_grad(of_trainable, has_aux=True)(
        [x for x, m in zip(flat, mask) if m], batch)
    return out, constrain(grads)

  def constrain(trainable_grads):
    if grad_shardings is None:
      return trainable_grads
    mask = train_mask or [True] * len(trainable_grads)
    shardings = [s for s, m in zip(jax.tree.leaves(grad_shardings), mask) if m]
    return jax.lax.with_sharding_constraint(trainable_grads, shardings)

  def full_tree(params, trainable_grads):
    """The gradient tree the optimizer expects: zeros where frozen (which it never reads)."""
    flat, treedef = jax.tree.flatten(params)
    it = iter(trainable_grads)
    mask = train_mask or [True] * len(flat)
    return treedef.unflatten([next(it) if m else jnp.zeros_like(x) for x, m in zip(flat, mask)])

  def train_step(state: dict[str, Any], batch: Batch):
    params = state["params"]
    rng = jax.random.fold_in(state["rng"], 1)  # noise of this step (NEFTune)

    reference = state.get("reference")
    scale = state["guard"].get("scale")

    def zeros():
      shapes = jax.eval_shape(lambda p, b, r: grad_fn(p, b, r, reference, scale)[1], params,
                              jax.tree.map(lambda x: x[:x.shape[0] // grad_accum], batch), rng)
      return constrain(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    loss_sum, count, aux, grads = mean_gradients(
        lambda micro, r: grad_fn(params, micro, r, reference, scale), batch, rng, grad_accum,
        zeros)
    if scale is not None:
      grads = jax.tree.map(lambda g: (g / scale).astype(g.dtype), grads)
    finite_grads = guard.all_finite(loss_sum, grads)
    denom = jnp.maximum(count, 1.0)
    grad_norm = optax.tree.norm(grads)
    grads = full_tree(params, grads)
    opt_state = state["opt_state"]
    if opt_device_shardings is not None:
      opt_state = jax.device_put(opt_state, opt_device_shardings)
    before = {**state, "opt_state": opt_state}  # (in device memory, when offloaded)
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # finite gradients can still make a parameter infinite (a huge learning rate): check what
    # the update made of the trainable parameters too
    trainable = [x for x, m in zip(jax.tree.leaves(new_params), train_mask or
                                   [True] * len(jax.tree.leaves(new_params))) if m]
    ok = finite_grads & guard.all_finite(trainable)
    new_state = {
        "step": state["step"] + 1,
        "params": new_params,
        "opt_state": opt_state,
        "rng": jax.random.fold_in(state["rng"], state["step"]),
    }
    if reference is not None:
      new_state["reference"] = reference
    if allocator is not None:  # AdaLoRA: reallocate ranks after the update, as PEFT does
      new_params = new_state["params"]
      adapters, new_state["adalora"] = allocator.update(
          state["step"] + 1, new_params["peft"], grads["peft"], state["adalora"])
      new_state["params"] = {**new_params, "peft": adapters}
    for key in ("params", "opt_state", "adalora"):  # a non-finite step changes none of them
      if key in new_state:
        new_state[key] = guard.keep_if(ok, new_state[key], before[key])
    new_state["guard"] = guard.update(state["guard"], ok, scale_period)
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "tokens": count, "skipped": (~ok).astype(jnp.int32),
               "skipped_total": new_state["guard"]["skipped"],
               "nonfinite_streak": new_state["guard"]["streak"],
               **{k: v / denom for k, v in aux.items()}}
    if scale is not None:
      metrics["loss_scale"] = scale
    return new_state, metrics

  return train_step


def make_eval_step(handle: ModelHandle, compute_dtype,
                   spec: objectives.Spec | None = None) -> Callable:
  """eval_step(params, batch, reference=None) -> (loss sum, count, aux sums)."""
  loss_fn = make_loss_fn(handle, compute_dtype, spec=spec)

  def eval_step(params, batch: Batch, reference=None):
    return loss_fn(params, batch, None, reference)  # no rng: no noise, dropout or penalty

  return eval_step
