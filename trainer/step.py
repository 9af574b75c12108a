"""The pure train and eval steps, for any state spec and objective.

`train_step(state, batch) -> (state, metrics)` does gradient accumulation inside (a scan over
microbatches), mixed precision (float32 master weights cast to the compute dtype for the forward
and backward pass), float16 loss scaling, the non-finite guard and each trainable model's
optimizer update. The loss of a batch is the sum of token losses over all its microbatches
divided by the number of counted tokens, so 2 microbatches of 2 give the same update as one
batch of 4.

The objective (trainer/objectives/) gives the loss over the step's named models; this file names
none. With pipeline stages (mesh.stage > 1) the gradients come from parallel/pipeline.py, which
runs the same loss per microbatch with each stage's chunk of layers, instead of one
`value_and_grad` (and instead of the accumulation scan). Gradients are taken with respect to each trainable slot's view (trainer/state.py: all of
its parameters, or LISA's few layers) without the leaves PEFT freezes, so frozen weights cost no
weight-gradient matmuls, no accumulation buffers and no part in the norm. A mixture of experts'
routing bias (models/moe.py, `router_bias_update_rate`) is no parameter: its leaf is frozen for
the optimizer, and the step moves it from the expert loads of its forward passes
(`with_bias_update`), after the optimizer update; a skipped step (non-finite) leaves it too.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from models import ffn as ffn_lib, moe
from models.handle import ModelHandle
from models.peft import adalora
from parallel import pipeline as pipeline_lib, ring_attention
from trainer import guard, objectives
from trainer.objectives import Bound, Objective
from trainer.state import StateSpec

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


def make_models_loss(handles: dict[str, ModelHandle], compute_dtype, objective: Objective,
                     neftune_alpha: float = 0.0, trainable: tuple[str, ...] = ("policy",)
                     ) -> Callable:
  """loss(params by slot, batch, rng=None, stack=None) -> (loss sum, count, aux sums): the
  objective over the named models bound to their parameters; the mean is sum / count, and so
  is each aux metric. `stack`: how the trained models run their layers (a pipeline's chunk).

  An rng means a training step: then the `trainable` models' forward passes add NEFTune noise
  on the input embeddings (with `neftune_alpha`) and keep lora's low-rank path apart from the
  weights (with its dropout, if any), and AdaLoRA's orthogonality penalty joins the loss (as
  count x weight x penalty, so that it is weight x penalty after the division by the count)."""
  def loss_fn(params: dict[str, Any], batch: Batch, rng=None, stack=None):
    batch = objective.annotate(batch)
    if any(h.run.attention_impl == "ring" for h in handles.values()) and \
        ring_attention.sequence_parallel_size() > 1:
      order = ring_attention.layout(batch["inputs"].shape[1])  # load balance
      batch = {k: v[:, order] for k, v in batch.items()}
    collected = {name: [] for name in trainable}
    models = {name: Bound(handle, params[name], compute_dtype,
                          rng if name in trainable else None, neftune_alpha, collected.get(name),
                          stack if name in trainable else None)
              for name, handle in handles.items()}
    loss_sum, count, aux = objective.loss(models, batch)
    # the models' own aux (e.g. a mixture of experts' router losses, summed over layers): as
    # count x value, so that they read as themselves after the division by the count; "_loss"
    # keys join the loss in training
    # "_by_layer" keys (a routing bias's expert loads): training only, summed as they are
    for name, passes in collected.items():
      for model_aux in passes:
        for key, value in model_aux.items():
          if rng is not None and key.endswith("_loss"):
            loss_sum += count * value
          label = key if name == trainable[0] else f"{key}_{name}"
          if key.endswith(ffn_lib.PER_LAYER):
            if rng is not None:
              aux = {**aux, label: aux.get(label, 0.0) + value}
            continue
          aux = {**aux, label: aux.get(label, 0.0) + count * value}
    if rng is not None:
      for name in trainable:
        peft = handles[name].peft
        if peft is not None and peft.orth_weight:
          loss_sum += count * peft.orth_weight * adalora.orthogonality(params[name]["peft"])
    return loss_sum, count, aux

  return loss_fn


def make_loss_fn(handle: ModelHandle, compute_dtype, neftune_alpha: float = 0.0,
                 objective: Objective | None = None) -> Callable:
  """One model's loss: loss_fn(params, batch, rng=None, reference=None) -> (loss sum, count,
  aux sums) for `objective` (default: `objectives.DEFAULT`'s); `reference`: a frozen reference
  model's parameters (DPO with full fine-tuning)."""
  objective = objective or objectives.default()

  def loss_fn(params, batch: Batch, rng=None, reference=None):
    models = {"policy": params}
    if reference is not None:
      models["reference"] = reference
    return make_models_loss({k: handle for k in models}, compute_dtype, objective,
                            neftune_alpha)(models, batch, rng)

  return loss_fn


def make_train_step(spec: StateSpec, objective: Objective, compute_dtype, grad_accum: int,
                    neftune_alpha: float = 0.0, scale_period: int = 2000,
                    pipeline: pipeline_lib.Pipeline | None = None) -> Callable:
  """The train step of states described by `spec` (trainer/state.py). Each trainable slot's
  gradients are constrained to its `grad_shardings` (ZeRO-2 shards them, so the data-parallel
  sum is a reduce-scatter rather than an all-reduce); an optimizer state resting in host memory
  (`offload`) is brought to the devices for the update and the step's out_shardings send it
  back. The state's "guard" (trainer/guard.py) skips non-finite steps and, with a "scale"
  (float16), scales the loss; `scale_period`: finite steps before the scale doubles.
  `pipeline`: the layers split over the mesh's `stage` axis, the batch through them in
  microbatches (parallel/pipeline.py) instead of `grad_accum`'s scan."""
  slots = spec.trainable
  handles = {s.name: s.handle for s in spec.slots}
  loss_fn = make_models_loss(handles, compute_dtype, objective, neftune_alpha,
                             tuple(s.name for s in slots))

  def constrain(slot, trainable_grads, mask):
    if slot.grad_shardings is None:
      return trainable_grads
    selected = slot.view.select_shardings(slot.grad_shardings)
    shardings = [s for s, m in zip(jax.tree.leaves(selected), mask) if m]
    return jax.lax.with_sharding_constraint(trainable_grads, shardings)

  def train_step(state: dict[str, Any], batch: Batch):
    params = spec.all_params(state)
    rng = jax.random.fold_in(state["rng"], 1)  # noise of this step (NEFTune)
    scale = state["guard"].get("scale")
    extras, opt_states, selected, masks = {}, {}, {}, {}
    for slot in slots:  # what each trainable model's optimizer updates in this step
      opt_state = spec.opt_state(state, slot.name)
      if slot.offload:
        opt_state = jax.device_put(opt_state, spec.opt_shardings(slot, device=True))
      extras[slot.name], opt_states[slot.name] = slot.view.begin(
          state, slot.tx, state.get(slot.view.key) if slot.view.key else None, opt_state,
          params[slot.name])
      selected[slot.name] = slot.view.select(params[slot.name], extras[slot.name])
      masks[slot.name] = slot.train_mask(selected[slot.name])

    def grad_fn(batch, rng):
      """((loss sum, count, aux sums), gradients by slot: lists over the trainable leaves of its
      view, in tree order); with `scale`, the gradients of scale x loss."""
      flat = {s.name: jax.tree.flatten(selected[s.name]) for s in slots}

      def scaled_loss(full, batch, rng, stack=None):
        loss_sum, count, aux = loss_fn(full, batch, rng, stack)
        scaled = loss_sum if scale is None else loss_sum * scale
        return scaled, (loss_sum, count, aux)

      def of_trainable(trainable, batch):
        full = dict(params)
        for s in slots:
          leaves, treedef = flat[s.name]
          it = iter(trainable[s.name])
          view = treedef.unflatten([next(it) if m else x for x, m in zip(leaves, masks[s.name])])
          full[s.name] = s.view.merge(params[s.name], view, extras[s.name])
        return scaled_loss(full, batch, rng)

      if pipeline is not None:  # the default view only (validate.check_pipeline refuses LISA)
        names = [s.name for s in spec.slots]
        out, grads = pipeline_lib.run(
            pipeline, spec.mesh, scaled_loss, {k: params[k] for k in names},
            {k: masks.get(k, [False] * len(jax.tree.leaves(params[k]))) for k in names},
            {k: layered(handles[k]) for k in names},
            split_microbatches(batch, pipeline.microbatches), rng)
        return out, {s.name: constrain(s, grads[s.name], masks[s.name]) for s in slots}
      trainable = {s.name: [x for x, m in zip(flat[s.name][0], masks[s.name]) if m]
                   for s in slots}
      (_, out), grads = jax.value_and_grad(of_trainable, has_aux=True)(trainable, batch)
      return out, {s.name: constrain(s, grads[s.name], masks[s.name]) for s in slots}

    def zeros():
      micro = jax.tree.map(lambda x: x[:x.shape[0] // grad_accum], batch)
      shapes = jax.eval_shape(lambda b, r: grad_fn(b, r)[1], micro, rng)
      return {s.name: constrain(s, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                shapes[s.name]), masks[s.name]) for s in slots}

    loss_sum, count, aux, grads = mean_gradients(grad_fn, batch, rng, grad_accum, zeros)
    per_layer = {k: aux.pop(k) for k in list(aux) if k.endswith(ffn_lib.PER_LAYER)}
    if scale is not None:
      grads = jax.tree.map(lambda g: (g / scale).astype(g.dtype), grads)
    denom = jnp.maximum(count, 1.0)
    grad_norms = {s.name: optax.tree.norm(grads[s.name]) for s in slots}
    # A non-finite entry makes its gradients' norm non-finite, so the norms (which clipping and
    # the metrics compute anyway) stand for a finiteness check of their own; one would cost a
    # write and a read of every gradient on XLA:CPU (benchmarks/optimizer_tail.py). A sum of
    # squares past float32's range skips the step too.
    ok = guard.all_finite(loss_sum, *grad_norms.values())
    new_state = {"step": state["step"] + 1, "rng": jax.random.fold_in(state["rng"], state["step"])}
    for slot in spec.slots:
      if not slot.trains:  # frozen: carried over unchanged
        new_state = spec.with_slot(new_state, slot.name, params[slot.name])
    before, after = {}, {}  # per trainable slot: (params, optimizer state, extras)
    full_grads = {}
    for slot in slots:
      leaves, treedef = jax.tree.flatten(selected[slot.name])
      it = iter(grads[slot.name])
      # the gradient tree the optimizer expects: zeros where frozen (which it never reads)
      full_grads[slot.name] = treedef.unflatten(
          [next(it) if m else jnp.zeros_like(x) for x, m in zip(leaves, masks[slot.name])])
      updates, opt_state = slot.tx.update(full_grads[slot.name], opt_states[slot.name],
                                          selected[slot.name])
      updated = optax.apply_updates(selected[slot.name], updates)
      # Finite gradients and moments give a finite AdamW update unless the learning rate is not
      # finite (1e39 in the config is infinite in float32), so `ok` is known before the update
      # and keep_if fuses into it. Checking the new parameters themselves before keep_if would
      # cost a write, a read and a select pass over parameters and moments (2.5x torch's
      # optimizer time at 99M parameters, benchmarks/optimizer_tail.py). An update that
      # overflows with a finite rate (one near 1e38) makes the next steps' losses non-finite,
      # so they are skipped, and trainer/train.py writes no checkpoint of such parameters.
      if slot.schedule is not None:
        ok = ok & jnp.isfinite(slot.schedule(state["step"]))
      new_params = slot.view.merge(params[slot.name], updated, extras[slot.name])
      before[slot.name] = (params[slot.name], opt_states[slot.name])
      after[slot.name] = (new_params, opt_state)
    for slot in slots:  # a mixture of experts' routing bias, from this step's expert loads
      if slot.handle.cfg.router_bias_update_rate:
        label = moe.LOAD_KEY if slot is slots[0] else f"{moe.LOAD_KEY}_{slot.name}"
        new_params, opt_state = after[slot.name]
        after[slot.name] = (with_bias_update(new_params, per_layer[label]), opt_state)
    for e in spec.extras:  # e.g. AdaLoRA reallocates ranks after the update
      if e.after_update is None:
        new_state[e.key] = state[e.key]
        continue
      new_params, opt_state = after[e.slot]
      new_params, value, opt_state = e.after_update(state["step"] + 1, new_params,
                                                    full_grads[e.slot], state[e.key], opt_state)
      after[e.slot] = (new_params, opt_state)
      new_state[e.key] = guard.keep_if(ok, value, state[e.key])
    for slot in slots:  # a non-finite step changes no weight and no moment
      new_params, opt_state = guard.keep_if(ok, after[slot.name], before[slot.name])
      new_state = spec.with_slot(new_state, slot.name, new_params, opt_state)
      if slot.view.key is not None:
        new_state[slot.view.key] = extras[slot.name]
    new_state["guard"] = guard.update(state["guard"], ok, scale_period)
    first = slots[0]
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norms[first.name],
               "lr": first.schedule(state["step"]), "tokens": count,
               "skipped": (~ok).astype(jnp.int32),
               "skipped_total": new_state["guard"]["skipped"],
               "nonfinite_streak": new_state["guard"]["streak"],
               **{k: v / denom for k, v in aux.items()}}
    for slot in slots[1:]:
      metrics[f"grad_norm_{slot.name}"] = grad_norms[slot.name]
    if scale is not None:
      metrics["loss_scale"] = scale
    return new_state, metrics

  return train_step


def layered(handle: ModelHandle) -> list[bool]:
  """For each parameter leaf of the handle's models (in flatten order): whether it is stacked
  along a leading `layers` axis (split over pipeline stages)."""
  axes = jax.tree.leaves(handle.axes, is_leaf=lambda x: isinstance(x, tuple))
  return [bool(names) and names[0] == "layers" for names in axes]


def with_bias_update(params, load_le):
  """`params` with every MoE layer's routing bias moved by `moe.bias_update` from its load
  (the MoE layers in the order of their stack, `layers`)."""
  mlp = params["layers"]["mlp"]
  steps = moe.bias_update(mlp[moe.BIAS_STEPS], load_le)
  return {**params, "layers": {**params["layers"], "mlp": {**mlp, moe.BIAS_STEPS: steps}}}


def make_eval_step(handle: ModelHandle, compute_dtype,
                   objective: Objective | None = None) -> Callable:
  """One model's eval step: eval_step(params, batch, reference=None) -> (loss sum, count, aux
  sums), with no rng: no noise, dropout or penalty. (A run's eval step is `make_models_loss`
  over all its models.)"""
  loss_fn = make_loss_fn(handle, compute_dtype, objective=objective)

  def eval_step(params, batch: Batch, reference=None):
    return loss_fn(params, batch, None, reference)

  return eval_step
