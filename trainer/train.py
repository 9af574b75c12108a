"""The training loop, top to bottom: config -> mesh -> data -> model and state -> steps -> loop.

`run(cfg, workdir)` is the whole job. Rerunning it with the same workdir resumes from the newest
checkpoint (parameters, optimizer, step, rng and the data iterator's position).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

import parallel
from models import hf, moe
from models import peft as peft_lib
from models.handle import (ModelHandle, cast_floating, init_params, model_handle,
                           param_shardings, stored_abstract)
from models.peft import adalora
from models.quant import model as quant_model
from trainer import checkpoint as ckpt_lib, export as export_lib
from trainer import evaluate as evaluate_lib, generate, metrics as metrics_lib, optim
from trainer import guard, lisa, memory, objectives, relora, run_status, state as state_lib
from trainer import step as step_lib
from trainer.objectives.base import Bound, Prepare
from trainer.data import pipeline, tokenizer as tokenizer_lib
from trainer.seeds import fold_seed
from trainer.validate import (UserError, check_backend, check_config, check_mesh, execution,
                              init_folder, model_config, pipeline_of, quantization)

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")
PAIR_KEYS = ("example", "reference")  # preference batches: the pair of each position, ref log-probs


def abstract_batch(cfg, sharding, objective=None) -> dict[str, jax.ShapeDtypeStruct]:
  """The train step's batch argument as ShapeDtypeStructs: for lowering without data. An
  online `objective` (RL) makes its own batches: their columns."""
  if objective is not None and objective.online:
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in objective.batch_shapes(cfg.train.batch_size).items()}
  keys = BATCH_KEYS + (PAIR_KEYS if cfg.data.format == "preference" else ())
  shape = (cfg.train.batch_size, cfg.train.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k in ("weights", "reference")
                                  else jnp.int32, sharding=sharding) for k in keys}


def data_sources(d) -> str:
  """What the run trains and evaluates on, for its data line."""
  if d.source == "stdlib":
    return f"train the Python standard library's source, eval {d.eval_percent:g}% of it held out"
  if d.source == "prepared":
    return f"train prepared {d.train_files}, eval prepared {d.eval_files or 'held-out split'}"
  held = d.eval_files or f"{d.eval_percent:g}% of the training files held out"
  return f"train {d.train_files}, eval {held}"


def _log(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


# ----------------------------------------------------------------------------------------------
# Workdir
# ----------------------------------------------------------------------------------------------


def prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir={workdir} is not writable: {e.strerror}") from None


def write_run_config(cfg, mcfg, mesh_sizes: dict[str, int], workdir: str) -> None:
  """config.json: the run config with everything resolved (vocab size, head_dim, mesh sizes);
  "model" holds what the weights are (the ModelConfig), "execution" how the model runs
  (model.remat, model.attention_impl, model.init_std of the run config), "quantized" how a
  quantized model.init_from stores its weights.

  A workdir whose checkpoints belong to a different model is refused rather than overwritten;
  one of the same model resumes under any execution choices. (A config.json written before the
  two were apart has the execution keys in "model" too: only the ModelConfig's are compared.)"""
  resolved = json.loads(cfg.to_json())
  resolved["model"] = json.loads(json.dumps(mcfg.to_dict()))  # tuples as lists, as read back
  resolved["execution"] = execution(cfg).to_dict()
  resolved["mesh"].update(mesh_sizes)
  stored = quant_model.integers(quantization(cfg))
  if stored is not None:  # model.init_from's integers: the weights' format
    resolved["quantized"] = stored.to_json()
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path) and os.path.isdir(os.path.join(workdir, "checkpoints")):
    with open(path) as f:
      saved = json.load(f).get("model", {})
    diff = sorted(k for k, v in resolved["model"].items() if saved.get(k) != v)
    if diff:
      raise UserError(f"--workdir={workdir} holds checkpoints of a different model (model.{diff[0]}"
                      f" was {saved.get(diff[0])!r}, now {resolved['model'][diff[0]]!r}); use a "
                      "new workdir or the same model config")
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(resolved, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
# Placement: where the optimizer state rests, how host batches become global arrays
# ----------------------------------------------------------------------------------------------


def offload_kind(cfg) -> str | None:
  """The memory kind optimizer state rests in between steps, or None. A backend without host
  memory says so in one line and the state stays in device memory."""
  if not cfg.mesh.offload_optimizer:
    return None
  kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  if "pinned_host" not in kinds:
    print(f"note: mesh.offload_optimizer: {jax.default_backend()} devices have no pinned_host "
          f"memory ({', '.join(sorted(kinds))}); optimizer state stays in device memory",
          file=sys.stderr)
    return None
  return "pinned_host"


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Host-local numpy batch (this process's rows, `process_rows`) -> global jax arrays laid
  out by `sharding`."""
  _, parts = process_rows(sharding)
  return {k: jax.make_array_from_process_local_data(
      sharding, np.asarray(v), (len(v) * parts, *np.shape(v)[1:])) for k, v in batch.items()}


@functools.lru_cache(maxsize=8)  # asked for every batch the loop places
def process_rows(sharding) -> tuple[int, int]:
  """(which part, of how many) of a batch's rows this process's devices hold under the batch
  `sharding`: the rows it reads. Processes holding the same rows (pipeline stages of one
  data-parallel slice) read the same ones."""
  n = sharding.mesh.size  # rows enough to split any way the mesh can
  held = sorted({(s[0].start or 0, n if s[0].stop is None else s[0].stop)
                 for s in sharding.addressable_devices_indices_map((n, n)).values()})
  lo, hi = held[0][0], held[-1][1]
  if any(stop != start for (_, stop), (start, _) in zip(held, held[1:])) or lo % (hi - lo):
    raise UserError("config key mesh: this process's devices hold rows of the batch that are "
                    "not next to each other; order the mesh axes so that they are")
  return lo // (hi - lo), n // (hi - lo)


# ----------------------------------------------------------------------------------------------
# Model, optimizer, shardings and the compiled steps
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
  """Everything about a run that follows from the config and the mesh, before any data."""
  spec: state_lib.StateSpec  # the train state: named models, extras, shardings
  objective: objectives.Objective
  rules: parallel.rules.Rules  # for activations
  batch_sharding: Any
  train_step: Any  # jitted
  eval_step: Any  # jitted: (params by slot, batch) -> (loss sum, count, aux sums)
  compute_dtype: Any
  # the objective's own models (objectives.base.Model): slot name -> its starting parameters,
  # f(seed, the policy's base weights or None)
  sources: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def mesh(self):
    return self.spec.mesh

  @property
  def handle(self) -> ModelHandle:
    """The model being trained."""
    return self.spec.primary.handle

  @functools.cached_property
  def abstract_state(self) -> dict[str, Any]:
    return self.spec.abstract()

  def init_state(self, seed: int, base=None) -> dict[str, Any]:
    """A new train state: the policy's parameters drawn from `seed` (or `base`, e.g. a Hugging
    Face import, with adapters added when it has PEFT) straight into their shardings."""
    policy = self.spec.primary
    # the objective's models first: one may start from the policy's base, which the policy's
    # initialisation consumes
    params = {name: source(seed, base) for name, source in self.sources.items()}
    params["policy"] = init_params(policy.handle, seed, policy.shardings, policy.dtype,
                                   base=base, model_shardings=policy.model_shardings)
    return self.spec.init(params, seed)


def compiler_options(mesh) -> dict[str, int] | None:
  """XLA options for the train and eval steps. On CPU, LLVM at -O1 rather than -O2: the matmuls
  are library calls either way and the generated loops ran no slower, while the medium config's
  train step compiled in 7-9 s instead of 15 s (BENCHMARKS.md). An XLA_FLAGS setting wins."""
  if (mesh.devices.flat[0].platform != "cpu"
      or "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")):
    return None
  return {"xla_backend_optimization_level": 1}


def plan(cfg, mcfg, mesh) -> Plan:
  tc = cfg.train
  compute_dtype = jnp.dtype(cfg.precision.compute_dtype)
  strategy = parallel.strategy(cfg.mesh.strategy, cfg.mesh.rules)
  batch_sharding = parallel.sharding(("batch", "length"), mesh, strategy.activations)
  objective = objectives.from_config(cfg)
  peft = peft_lib.Peft.from_config(cfg.peft, mcfg, tc.steps)
  policy = policy_slot(cfg, mcfg, mesh, strategy, peft)
  frozen = tuple(dataclasses.replace(policy, name=name, tx=None, schedule=None, labels=None,
                                     view=state_lib.View(), copy_of=source)
                 for name, source in objective.frozen_models(peft).items())
  added, sources = [], {}
  for want in objective.models():
    slot, sources[want.name] = objective_slot(cfg, mcfg, mesh, strategy, want)
    added.append(slot)
  extras = ()
  if peft is not None and peft.allocator is not None:
    extras = (adalora_extra(peft.allocator),)
  if peft is not None and peft.restart_every:
    extras = (relora.extra(peft, cfg.peft.relora_prune, fold_seed(tc.seed)),)
  if objective.online:
    extras += (rollout_extra(objective.batch_shapes(tc.batch_size)),)
  loss_scale = cfg.precision.loss_scale if cfg.precision.compute_dtype == "float16" else None
  spec = state_lib.StateSpec((policy, *frozen, *added), mesh, extras, loss_scale)
  shardings = spec.shardings()
  pipe = pipeline_of(cfg, mesh.shape["stage"])  # the microbatches go through the stages
  step_fn = step_lib.make_train_step(spec, objective, compute_dtype,
                                     1 if pipe else tc.grad_accum, tc.neftune_alpha,
                                     cfg.precision.loss_scale_period, pipe)
  options = compiler_options(mesh)
  train_step = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=0,
                       compiler_options=options)
  # the eval step: the loss over the run's models with no rng (no noise, dropout or penalty)
  eval_step = jax.jit(step_lib.make_models_loss({s.name: s.handle for s in spec.slots},
                                                compute_dtype, objective),
                      compiler_options=options)  # (its inputs are placed)
  return Plan(spec, objective, strategy.activations, batch_sharding, train_step, eval_step,
              compute_dtype, sources)


def objective_slot(cfg, mcfg, mesh, strategy, want: objectives.Model):
  """(the slot of an objective's model, f(seed, policy base) -> its starting parameters). From a
  run's folder or a Hugging Face folder it has that model's shape and weights; else the
  policy's shape and starting weights, with a zero score head in place of the LM head when
  `want.value_head`. It trains with AdamW of its own (train's settings, peak rate `want.lr`)
  or is frozen. Its vocabulary must be the policy's."""
  tc = cfg.train
  param_dtype = jnp.dtype(cfg.precision.param_dtype)
  folder = want.folder if want.hf else ""
  if folder:
    try:
      theirs = hf.config_from_hf(hf.read_config(folder))
    except (OSError, ValueError, KeyError) as e:
      raise UserError(f"config key {want.key}: {folder} is not a Hugging Face model folder "
                      f"({e})") from None
    handle = model_handle(theirs, None, execution(cfg))
  elif want.source:
    try:
      _, loaded, directory, step = export_lib.read_run(want.source)
    except UserError as e:  # its message names trainer.export's flag
      raise UserError(f"config key {want.key}: {str(e).replace('--workdir=', '')}") from None
    handle = model_handle(loaded.cfg, loaded.peft, execution(cfg))
  else:
    handle = model_handle(dataclasses.replace(mcfg, value_head=want.value_head), None,
                          execution(cfg))
  if handle.cfg.vocab_size != mcfg.vocab_size:
    raise UserError(f"config key {want.key}: the model in {folder or want.source} has a "
                    f"vocabulary of {handle.cfg.vocab_size}, the policy {mcfg.vocab_size}: "
                    "they must share a tokenizer")
  shardings = param_shardings(handle, mesh, strategy.params)
  abstract = stored_abstract(handle, param_dtype)
  labels = None if handle.peft is None or not want.lr else handle.peft.labels(abstract)
  tx = schedule = None
  if want.lr:
    tx, schedule = optim.make_optimizer(
        ml_collections.ConfigDict({**tc.to_dict(), "lr": want.lr}), labels)
  slot = state_lib.Slot(
      want.name, handle, abstract, shardings, param_dtype, model_shardings=shardings, tx=tx,
      schedule=schedule, moment_shardings=param_shardings(handle, mesh, strategy.opt_state),
      grad_shardings=param_shardings(handle, mesh, strategy.grads), labels=labels)

  def source(seed, base):
    if folder:
      return hf.load(folder, shardings, param_dtype, handle.run)[1]
    if want.source:
      return ckpt_lib.read_params(directory, step, stored_abstract(handle, param_dtype,
                                                                   shardings))
    zero = lambda: jax.device_put(jnp.zeros((mcfg.d_model, 1), param_dtype), shardings["score"])
    if base is not None and want.value_head:  # the policy's weights, a new (zero) score head
      base = {**jax.tree.map(jnp.copy, {k: v for k, v in base.items() if k != "head"}),
              "score": zero()}
    params = init_params(handle, seed, shardings, param_dtype, base=base)
    return {**params, "score": zero()} if want.value_head else params

  return slot, source


def rollout_extra(shapes: dict) -> state_lib.Extra:
  """An online objective's current rollout batch in the state (replicated; zeros before the
  first), so that a checkpoint taken between two steps of one rollout resumes with it."""
  return state_lib.Extra(
      "rollout", init=lambda params: {k: jnp.zeros(shape, dtype)
                                      for k, (shape, dtype) in shapes.items()},
      shardings=lambda shardings, replicated: {k: replicated for k in shapes})


def policy_slot(cfg, mcfg, mesh, strategy, peft) -> state_lib.Slot:
  """The model being trained: its handle, placement, optimizer and what of it trains."""
  tc = cfg.train
  param_dtype = jnp.dtype(cfg.precision.param_dtype)
  handle = model_handle(mcfg, peft, execution(cfg), quantization(cfg))
  labels = None if peft is None else peft.labels(handle.abstract_params())
  if labels is None and mcfg.router_bias_update_rate:
    labels = routing_bias_frozen(handle.abstract_params())
  if handle.integers is not None:  # a quantized model.init_from: its integers stay
    labels = quant_model.stored_frozen(handle.integers, handle.abstract_params())
  restart = (peft.restart_every, cfg.peft.relora_warmup) if peft and peft.restart_every else None
  tx, schedule = optim.make_optimizer(tc, labels, cfg.peft.lora_plus_scale, restart)
  p_shardings = param_shardings(handle, mesh, strategy.params)
  abstract_params = stored_abstract(handle, param_dtype)
  view = state_lib.View()
  if cfg.peft.method == "lisa":  # the optimizer sees a few layers at a time
    view = lisa.LisaView(cfg.peft.lisa_activated_layers, cfg.peft.lisa_step_interval,
                         mcfg.n_layers)
  return state_lib.Slot(
      "policy", handle, abstract_params, p_shardings, param_dtype,
      model_shardings=p_shardings if peft is None else param_shardings(
          model_handle(mcfg), mesh, strategy.params),
      tx=tx, schedule=schedule,
      moment_shardings=param_shardings(handle, mesh, strategy.opt_state),
      grad_shardings=param_shardings(handle, mesh, strategy.grads), labels=labels, view=view,
      offload=offload_kind(cfg))


def routing_bias_frozen(params):
  """Optimizer labels of a full training run whose mixture of experts has a routing bias: it is
  "frozen" (no gradient, no update, no optimizer state; trainer/step.py moves it), the rest
  "trainable"."""
  def label(path, _):
    return "frozen" if str(getattr(path[-1], "key", path[-1])) == moe.BIAS_STEPS else "trainable"
  return jax.tree_util.tree_map_with_path(label, params)


def adalora_extra(allocator) -> state_lib.Extra:
  """AdaLoRA's allocator state: importance EMAs placed like their adapters, rank patterns
  replicated; ranks are reallocated after each update, as PEFT does."""
  def after_update(step, params, grads, value, opt_state):
    adapters, value = allocator.update(step, params["peft"], grads["peft"], value)
    return {**params, "peft": adapters}, value, opt_state

  return state_lib.Extra(
      "adalora", init=lambda params: allocator.init_state(params["policy"]["peft"]),
      shardings=lambda shardings, replicated: {
          "ipt": shardings["policy"]["peft"], "unc": shardings["policy"]["peft"],
          "keep": jax.tree.map(lambda _: replicated,
                               adalora.lambdas(shardings["policy"]["peft"]))},
      after_update=after_update)


class Preemption:
  """SIGTERM or SIGINT asks the loop to checkpoint the current step and stop (exit code 0); a
  second signal exits at once. With several processes they agree on the step: the loop stops
  when any of them was signalled (`requested` is an all-gather then, once per step)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.flag, self.previous = False, {}
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self.previous[s] = signal.signal(s, self._handle)

  def _handle(self, signum, _frame):
    if self.flag:
      print(f"second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.flag = True
    print(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
          "(send it again to exit at once)", file=sys.stderr, flush=True)

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.flag))))

  def close(self):
    for s, handler in self.previous.items():
      signal.signal(s, handler)


class Diverged(UserError):
  """Too many non-finite steps in a row, or parameters not finite when a checkpoint is due: the
  run stops, naming its newest intact checkpoint."""


def intact(step: int | None) -> str:
  if step is None:
    return "no checkpoint with finite parameters was written"
  return f"the last checkpoint (step {step}) holds finite parameters and is intact"


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run(cfg, workdir: str, devices=None) -> dict[str, Any]:
  """Train as the config says, on `devices` (default: all). Returns the final metrics (also
  written to metrics.jsonl), the final state and the plan (`plan`: its models and steps). The
  workdir's status.json says how the run is going and how it ended (trainer/run_status.py)."""
  leader = jax.process_index() == 0
  # from the start: a stop that comes while data and compilation get ready takes effect after
  # the first step, with its checkpoint, as one in the loop does
  preemption = Preemption()
  try:
    out = _run(cfg, workdir, devices, preemption)
  except BaseException as e:
    if leader and os.path.isdir(workdir):
      run_status.ended(workdir, "failed", error=str(e) or type(e).__name__)
    raise
  finally:
    preemption.close()
  if leader:
    run_status.ended(workdir, "finished" if out["step"] >= cfg.train.steps else "stopped",
                     out["step"])
  return out


def _run(cfg, workdir: str, devices, preemption: Preemption) -> dict[str, Any]:
  t_start = time.time()
  check_config(cfg)
  tc = cfg.train
  seed = fold_seed(tc.seed)

  # --- Mesh and sharding rules ----------------------------------------------------------------
  devices = jax.devices() if devices is None else devices
  check_backend(cfg, devices[0].platform)
  mesh_sizes = check_mesh(cfg, len(devices))
  mesh = parallel.make_mesh(mesh_sizes, devices)

  # --- Data -----------------------------------------------------------------------------------
  prepare_workdir(workdir)
  leader = jax.process_index() == 0
  if leader:
    run_status.started(workdir, tc.steps)
  sync = lambda: multihost_utils.sync_global_devices("tokenizer") if jax.process_count() > 1 else None
  data = pipeline.build(cfg, workdir, leader, sync)
  tokenizer, data_stats = data.tokenizer, data.stats
  mcfg = model_config(cfg, tokenizer.vocab_size)
  if mcfg.vocab_size < tokenizer.vocab_size:
    raise UserError(f"config key model.vocab_size: {mcfg.vocab_size} is smaller than the "
                    f"tokenizer's {tokenizer.vocab_size} pieces")
  write_run_config(cfg, mcfg, mesh_sizes, workdir)
  _log(f"data: {data_sources(cfg.data)}; " + ", ".join(
      f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(data_stats.items())))
  for warning in data.warnings:
    _log(f"warning: {warning}")

  # --- Model, optimizer, state ----------------------------------------------------------------
  pl = plan(cfg, mcfg, mesh)
  if tc.memory_check:  # refuse what cannot fit before allocating any of it
    memory.check_fits(memory.components(cfg, pl, mcfg, mesh_sizes,
                                        abstract_batch(cfg, pl.batch_sharding, pl.objective))[0],
                       devices)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints)
  restored = checkpointer.restore_latest(pl.abstract_state, _log)
  latest = None if restored is None else restored[0]
  init = init_folder(cfg)
  policy = pl.spec.primary
  if latest is None:
    base = None
    if init is not None:
      _log(f"loading {init}")
      if policy.handle.integers is not None:
        base = jax.device_put(cast_floating(hf.load_quantized(init)[2], policy.dtype),
                              policy.model_shardings)
      else:
        base = hf.load(init, policy.model_shardings, policy.dtype, policy.handle.run,
                       value_head=mcfg.value_head)[1]
    state = pl.init_state(seed, base)
    start_step = 0
  else:
    _, state, data_state = restored
    start_step = latest
    _log(f"resumed from {checkpointer.directory} at step {latest}")
    if start_step >= tc.steps:  # nothing left: say so, and touch nothing
      checkpointer.close()
      _log(f"done: the run in {workdir} is complete at step {start_step} of {tc.steps} "
           "(train.steps); nothing to train (raise train.steps to go on)")
      return {"step": start_step, "state": state, "preempted": False}
  shard = process_rows(pl.batch_sharding)  # each process reads only its rows
  def bound_models(state):
    return {s.name: Bound(s.handle, pl.spec.params(state, s.name), pl.compute_dtype)
            for s in pl.spec.slots}

  with parallel.activate(mesh, pl.rules):  # e.g. DPO's precomputed reference log-probs
    pl.objective.prepare(Prepare(
        data, bound_models(state), start_step, workdir, shard, tc.batch_size,
        lambda b: to_global(b, pl.batch_sharding), _log))
  # the rows are complete (reference log-probs included): now the batches can be read
  train_ds = pipeline.batches(data.train, tc.batch_size, shard=shard)
  eval_ds = pipeline.batches(data.eval, tc.batch_size, shard=shard, repeat=False)
  eval_batches = [eval_ds[i] for i in range(min(tc.eval_batches, len(eval_ds)))]
  train_iter = iter(train_ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.data.num_threads)))
  if latest is not None:
    train_iter.set_state(data_state)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  active = (f" ({mcfg.num_params(active=True) / 1e6:.2f}M active per token: "
            f"{mcfg.experts_per_token} of {mcfg.n_experts} experts)" if mcfg.n_experts else "")
  stored = pl.handle.integers
  if stored is not None:  # the integers and scales are not the model's parameter count
    n_params = mcfg.num_params()
    labels = jax.tree.leaves(policy.labels)
    floats = sum(x.size for x, label in zip(jax.tree.leaves(state["params"]), labels)
                 if label != "frozen")
    active += (f" ({stored.scheme.bits}-bit {stored.method} projections, frozen; "
               f"{floats / 1e6:.2f}M float parameters train)")
  _log(f"model: {n_params / 1e6:.2f}M parameters{active}, vocab {mcfg.vocab_size}; mesh "
       f"{dict(mesh.shape)}")
  if pl.handle.peft is not None:
    trainable, total = peft_lib.count(state["params"], pl.handle.peft.labels(state["params"]))
  elif isinstance(policy.view, lisa.LisaView):
    trainable = sum(x.size for x in jax.tree.leaves(
        policy.view.select(state["params"], state[policy.view.key])))
    total = n_params
  if cfg.peft.method != "none":
    _log(f"peft {cfg.peft.method}: {trainable:,} trainable parameters of {total:,} "
         f"({trainable / total:.3%}) at a time")

  def evaluate(state) -> dict[str, float]:
    params = pl.spec.all_params(state)
    with parallel.activate(mesh, pl.rules):
      sums = jax.device_get([pl.eval_step(params, to_global(b, pl.batch_sharding))
                             for b in eval_batches])
      total, count = (float(sum(s[i] for s in sums)) for i in (0, 1))
      out = {"eval_loss": total / max(count, 1.0)}
      for key in (sums[0][2] if sums else {}):  # dpo, reward: rewards, accuracy, margin
        out[f"eval_{key}"] = float(sum(s[2][key] for s in sums)) / max(count, 1.0)
      if tc.eval_exact_match and data.template is not None:
        out["eval_exact_match"] = evaluate_lib.chat_exact_match(
            pl.handle, params["policy"], tokenizer, data.template, data.eval_records[:tc.eval_exact_match],
            buffer_len=tc.seq_len, compute_dtype=pl.compute_dtype)
    return out

  # --- Loop -----------------------------------------------------------------------------------
  # train.stop_after_steps: at most that many steps in this invocation (the same command, run
  # again, goes on for as many more)
  end_step = min(tc.steps, start_step + tc.stop_after_steps) if tc.stop_after_steps else tc.steps
  peak, peak_source = metrics_lib.peak_flops_per_device(tc.peak_tflops)
  flops_per_token = mcfg.flops_per_token(tc.seq_len)
  units = metrics_lib.peak_units(devices)
  writer = metrics_lib.MetricsWriter(workdir, tc.steps, start_step, resumed=latest is not None,
                                     enabled=jax.process_index() == 0)
  writer.note(f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")
  last: dict[str, float] = {}
  t_log, tokens_since = time.perf_counter(), 0.0
  step = start_step
  preempted, previous = False, None
  all_finite = jax.jit(guard.all_finite)
  # the newest checkpoint known to hold finite parameters
  finite_checkpoint = latest if latest is not None and bool(all_finite(state["params"])) else None

  def save(step):
    nonlocal finite_checkpoint
    if not bool(all_finite(state["params"])):  # an update that overflowed (trainer/step.py)
      raise Diverged(f"the parameters are not finite at step {step}: an update overflowed "
                     f"(lower train.lr); nothing of them was written; {intact(finite_checkpoint)}")
    checkpointer.save(step, state, train_iter.get_state())
    finite_checkpoint = step
  try:
    if start_step == 0 and tc.eval_exact_match and data.template is not None:
      before = evaluate(state)  # the baseline the run improves on
      writer.write(0, before)
      writer.note(f"before training: {before}")
    current, rollout = None, {}  # online: the rollout batch on the host, and its metrics
    rollout_sharding = pl.spec.shardings().get("rollout")
    if pl.objective.online and start_step:  # resumed: the state holds the last rollout
      current = jax.device_get(state["rollout"])
    for step in range(start_step + 1, end_step + 1):
      if not pl.objective.online:
        host = next(train_iter)
      elif (step - 1) % pl.objective.iterations == 0:  # RL: sampled with the current policy
        with parallel.activate(mesh, pl.rules):
          host, rollout = pl.objective.rollout(bound_models(state), step, pl.compute_dtype,
                                               current)
        current = host
        state = {**state, "rollout": jax.device_put(
            {k: host[k] for k in state["rollout"]}, rollout_sharding)}
      else:  # the next update on the same rollout
        host = current
      batch = to_global(host, pl.batch_sharding)
      with parallel.activate(mesh, pl.rules):
        state, m = pl.train_step(state, batch)
      m = {**m, **rollout}
      # the step before this one (this one is still running): too many non-finite in a row?
      if previous is not None and tc.max_nonfinite_steps and \
          int(previous["nonfinite_streak"]) >= tc.max_nonfinite_steps:
        raise Diverged(f"{tc.max_nonfinite_steps} steps in a row (to step {step - 1}) had a "
                       "non-finite loss, gradients or update and were skipped "
                       f"(train.max_nonfinite_steps); {intact(finite_checkpoint)}; lower "
                       "train.lr, check the data, or use float32")
      previous = m
      if step == start_step + 1:
        jax.block_until_ready(m)
        writer.note(f"first step (compile included): {time.perf_counter() - t_log:.1f}s")
        t_log = time.perf_counter()
      else:
        tokens_since += tc.batch_size * tc.seq_len  # positions, padding included
      writer.advance()
      if step % tc.log_every == 0 or step == end_step:
        m = jax.device_get(m)
        elapsed = time.perf_counter() - t_log
        tps = tokens_since / elapsed if tokens_since and elapsed > 0 else 0.0
        last = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                "tokens_per_sec": tps, "mfu": tps * flops_per_token / (peak * units),
                "padding_ratio": data_stats["padding_ratio"],
                **{k: v for k, v in m.items() if k not in ("loss", "lr", "grad_norm", "tokens")}}
        if not np.isfinite(m["loss"]):
          writer.note(f"step {step}: loss is {m['loss']}")
        writer.write(step, last)
        t_log, tokens_since = time.perf_counter(), 0.0
      if tc.eval_every and step % tc.eval_every == 0 and step != end_step:
        writer.write(step, evaluate(state))
      if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step != end_step:
        save(step)
      if step != end_step and preemption.requested():
        preempted = True
        break
    if step > start_step or latest is None:
      save(step)
    if preempted:
      final_eval = {}
      checkpointer.wait()
      _log(f"preempted: checkpoint of step {step} saved in {checkpointer.directory}; rerun the "
           "same command to continue")
      if jax.process_count() > 1:  # each process says where it stopped: they must agree
        print(f"process {jax.process_index()} stopped at step {step}", file=sys.stderr, flush=True)
    else:
      final_eval = evaluate(state)
      writer.write(step, final_eval)
    last = {**last, **final_eval}
  except Exception as e:  # noqa: BLE001 -- a full disk, whoever hit it, is one line
    if ckpt_lib.no_space(e):
      try:
        checkpointer.wait()  # a write in flight may still complete: then it is the newest
      except Exception:  # noqa: BLE001 -- it ran out of room too
        pass
      raise ckpt_lib.disk_full(checkpointer.directory) from None
    raise
  finally:
    try:
      checkpointer.wait()
      checkpointer.close()
      writer.close()
    except Exception as e:  # noqa: BLE001 -- an asynchronous write that failed for want of room
      if not ckpt_lib.no_space(e):
        raise
      raise ckpt_lib.disk_full(checkpointer.directory) from None

  # --- Report ---------------------------------------------------------------------------------
  if step < tc.steps and not preempted:
    _log(f"stopped at step {step} of {tc.steps} (train.stop_after_steps={tc.stop_after_steps} "
         "steps per run); rerun the same command to continue")
  elif step == tc.steps and tc.sample_tokens and data.template is None:
    prompt = tokenizer_lib.prompt_ids(tokenizer, tc.sample_prompt)
    with parallel.activate(mesh, pl.rules):
      ids = generate.generate(pl.handle, state["params"], [prompt],
                              tc.sample_tokens, max_len=tc.seq_len,
                              temperature=tc.sample_temperature, seed=seed,
                              stop_ids=(tokenizer.eos_id,), compute_dtype=pl.compute_dtype)[0]
    text = tokenizer.decode(ids)
    _log("sample:\n" + tc.sample_prompt + text)
    if leader:  # for the dashboard (trainer/dashboard)
      with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "prompt": tc.sample_prompt, "text": text}) + "\n")
  results = ", ".join(f"{k} {float(last[k]):.4f}" for k in ("loss", *final_eval) if k in last)
  _log(f"done: step {step}, {results + ', ' if results else ''}"
       f"{time.time() - t_start:.0f}s in all; workdir {workdir}")
  return {"step": step, **{k: float(v) for k, v in last.items()}, "state": state,
          "preempted": preempted, "plan": pl}

