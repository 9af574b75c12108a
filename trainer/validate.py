"""Checks of the run config before anything expensive starts.

A problem the user can fix raises `UserError` with one line that names the config key, what is
wrong and what would be right; `trainer.main` prints it and exits with code 2.
"""

from __future__ import annotations

import math
import os

from models import hf
from models import peft as peft_lib
from models.config import Execution, ModelConfig, split_fields
from models.kernels import grouped_matmul as gmm
from models.quant import model as quant_model
from parallel import mesh as mesh_lib
from parallel import pipeline as pipeline_lib
from parallel import rules as rules_lib
from trainer.data.packing import MODES, TRUNCATION
from trainer.data.sources import FORMATS, TEXT_SPLITS
from trainer.data.templates import TEMPLATES
from trainer import objectives
from trainer.errors import UserError
from trainer.optim import SCHEDULES

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
DATA_SOURCES = ("stdlib", "files", "prepared")


def _require(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise UserError(f"config key {key}: {message}")


# The interval each numeric key must lie in, in the usual notation ("[0, 1)": 0 allowed, 1 not).
# Besides these, every float in the config must be finite: inf passes `> 0` and NaN fails every
# comparison, so neither would otherwise be caught before the loss turns NaN. Keys that only
# matter under some other setting (precision.loss_scale, dpo.beta) are checked where that is.
POSITIVE, NON_NEGATIVE = "(0, inf)", "[0, inf)"
RANGES = {
    **dict.fromkeys(("train.batch_size", "train.seq_len", "train.grad_accum",
                     "train.log_every", "train.eval_batches", "train.keep_checkpoints", "train.lr",
                     "data.max_chars", "data.pack_group", "data.num_threads", "model.rope_theta",
                     "model.norm_eps", "model.rope_factor", "model.rope_original_max_len",
                     "model.rope_low_freq_factor", "model.rope_high_freq_factor",
                     "peft.lora_plus_scale"), POSITIVE),
    **dict.fromkeys(("train.steps", "train.eval_every", "train.checkpoint_every",
                     "train.eval_exact_match", "train.stop_after_steps", "train.warmup_steps",
                     "train.sample_tokens",
                     "train.weight_decay", "train.clip_norm", "train.peak_tflops",
                     "train.neftune_alpha", "train.max_nonfinite_steps", "train.eps",
                     "train.sample_temperature", "model.vocab_size", "model.head_dim",
                     "model.sliding_window", "model.query_scale", "model.attn_softcap",
                     "model.logit_softcap", "model.init_std"), NON_NEGATIVE),
    "train.min_lr_ratio": "[0, 1]",
    "train.b1": "[0, 1)",
    "train.b2": "[0, 1)",
    "data.eval_percent": "(0, 100)",
}


def _within(value, interval: str) -> bool:
  low, high = (float(x) for x in interval[1:-1].split(","))
  above = value >= low if interval[0] == "[" else value > low
  below = value <= high if interval[-1] == "]" else value < high
  return above and below


def _leaves(cfg, prefix: str = ""):
  for key, value in cfg.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def check_numbers(cfg) -> None:
  """Every float finite, every key of RANGES inside its interval."""
  for key, value in _leaves(cfg):
    if isinstance(value, float):
      _require(math.isfinite(value), key, f"must be a finite number, got {value}")
  for key, interval in RANGES.items():
    section, name = key.split(".")
    value = cfg[section][name]
    message = {POSITIVE: "must be positive", NON_NEGATIVE: "must be >= 0"}.get(
        interval, f"must be in {interval}")
    _require(_within(value, interval), key, f"{message}, got {value}")


def check_config(cfg) -> None:
  t, p, d = cfg.train, cfg.precision, cfg.data
  check_numbers(cfg)
  if p.compute_dtype == "float16":
    _require(p.loss_scale >= 1, "precision.loss_scale", f"must be >= 1, got {p.loss_scale}")
    _require(p.loss_scale_period > 0, "precision.loss_scale_period",
             f"must be positive, got {p.loss_scale_period}")
  _require(t.lr_schedule in SCHEDULES, "train.lr_schedule",
           f"{t.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
  _require(t.batch_size % t.grad_accum == 0, "train.grad_accum",
           f"{t.grad_accum} does not divide train.batch_size={t.batch_size}")
  _require(p.compute_dtype in COMPUTE_DTYPES, "precision.compute_dtype",
           f"{p.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
  _require(p.param_dtype in PARAM_DTYPES, "precision.param_dtype",
           f"{p.param_dtype!r} is not one of {', '.join(PARAM_DTYPES)}")
  _require(d.source in DATA_SOURCES, "data.source",
           f"{d.source!r} is not one of {', '.join(DATA_SOURCES)}")
  _require(d.source != "files" or bool(d.train_files), "data.train_files",
           "data.source=files needs data.train_files (paths, folders or globs)")
  _require(d.source != "prepared" or bool(d.train_files), "data.train_files",
           "data.source=prepared needs data.train_files (folders trainer.data.prepare wrote)")
  for key in ("train_files", "eval_files"):
    _require(d.source != "stdlib" or not d[key], f"data.{key}",
             f"is read only with data.source=files or prepared (now {d.source}): set that too")
  _require(d.source != "prepared" or t.eval_exact_match == 0, "train.eval_exact_match",
           "needs the held-out records themselves, which prepared shards do not keep; use "
           "data.source=files for it")
  _require(d.format in FORMATS, "data.format", f"{d.format!r} is not one of {', '.join(FORMATS)}")
  _require(d.text_split in TEXT_SPLITS, "data.text_split",
           f"{d.text_split!r} is not one of {', '.join(TEXT_SPLITS)}")
  _require(d.template in TEMPLATES, "data.template",
           f"{d.template!r} is not one of {', '.join(TEMPLATES)}")
  _require(d.packing in MODES, "data.packing", f"{d.packing!r} is not one of {', '.join(MODES)}")
  _require(d.truncation in TRUNCATION, "data.truncation",
           f"{d.truncation!r} is not one of {', '.join(TRUNCATION)}")
  check_objective(cfg)
  if d.tokenizer:
    _require(os.path.exists(d.tokenizer), "data.tokenizer", f"no file at {d.tokenizer}")
  else:
    _require(d.tokenizer_vocab_size >= 260, "data.tokenizer_vocab_size",
             f"must be at least 260 (256 byte pieces + specials), got {d.tokenizer_vocab_size}")
  try:
    rules_lib.strategy(cfg.mesh.strategy, cfg.mesh.rules)
  except ValueError as e:
    raise UserError(f"config key {e}") from None
  mc = model_config(cfg, vocab_size=max(cfg.model.vocab_size, 1))  # shape checks, before data
  run = execution(cfg)
  _require(cfg.peft.method == "none" or len(set(mc.layer_kinds())) == 1, "peft.method",
           f"{cfg.peft.method!r} needs one kind of layer: this model mixes dense and MoE layers "
           "(model.moe_every, model.moe_first_dense); fine-tune it fully (peft.method=none)")
  _require(cfg.peft.method == "none" or not mc.router_bias_update_rate,
           "model.router_bias_update_rate",
           f"{mc.router_bias_update_rate}: the routing bias is updated in full training only; "
           f"set it to 0 with peft.method={cfg.peft.method}")
  _require(not mc.alibi or run.attention_impl != "cudnn", "model.attention_impl",
           "cudnn takes no ALiBi bias (model.alibi): use xla, pallas or ring")
  _require(not mc.alibi or cfg.peft.method not in ("prefix", "mam", "unipelt"), "peft.method",
           f"{cfg.peft.method}: prefix tuning's keys have no positions for ALiBi's distances "
           "(model.alibi)")
  try:
    peft = peft_lib.Peft.from_config(cfg.peft, mc, cfg.train.steps)
    if peft is not None:
      peft.check_run(run)
      peft.load_fixed()  # AdapterFusion's folders: each readable and fitting this model
  except ValueError as e:
    raise UserError(f"config key {e}") from None
  try:
    quant = quantization(cfg)
    if quant is not None:
      quant.check(mc)
  except ValueError as e:
    raise UserError(f"config key quant: {e}" if not str(e).startswith(("quant.", "model."))
                    else f"config key {e}") from None
  if quant_model.integers(quant) is not None:  # a model.init_from folder of integers
    _require(peft is None, "peft.method",
             f"{cfg.peft.method}: model.init_from holds a quantized model, which takes no "
             "adapters yet; start from its float model with peft.base_quant=nf4 (QLoRA)")
  _require(quant is None or peft is None, "quant.mode",
           f"{cfg.quant.mode} trains the full weights; with peft.method={cfg.peft.method} "
           "store the frozen base in 4 bits instead (peft.base_quant=nf4, QLoRA)")


def quantization(cfg) -> quant_model.Quantized | None:
  """How this run's projection weights are quantized: as quant.mode says (qat: fake-quantized
  floats; qt: int8 matmuls), or as the `model.init_from` folder trainer/quantize.py wrote holds
  them (integers and scales; they stay frozen and only the float parameters train). ValueError
  naming the key on a bad value."""
  folder = init_folder(cfg)
  try:
    stored = quant_model.read(folder) if folder else None
  except ValueError as e:
    raise ValueError(f"model.init_from: {e}") from None
  mode = quant_model.from_config(cfg.quant)
  if stored is not None and mode is not None:
    raise ValueError(f"quant.mode={cfg.quant.mode}: model.init_from={cfg.model.init_from} holds "
                     "integer weights already; start from its float model to train with "
                     f"quant.mode={cfg.quant.mode}")
  return stored or mode


def check_objective(cfg) -> None:
  """train.objective against the data format and its own sections."""
  t, d, o = cfg.train, cfg.data, cfg.train.objective
  _require(o in objectives.OBJECTIVES, "train.objective",
           f"{o!r} is not one of {', '.join(objectives.OBJECTIVES)}")
  objective = objectives.REGISTRY[o]
  if objective.pairs:
    _require(d.format == "preference", "data.format",
             f"train.objective={o} learns from preference pairs: set data.format=preference "
             "(records with prompt, chosen and rejected)")
  else:
    _require(d.format != "preference", "train.objective",
             "data.format=preference records are pairs: use train.objective "
             + " or ".join(n for n, c in objectives.REGISTRY.items() if c.pairs))
  for key, message in objective.problems(cfg):
    _require(False, key, message)
  _require(t.eval_exact_match == 0 or d.format == "chat", "train.eval_exact_match",
           "scores generated replies of chat records: set data.format=chat or 0")
  _require(o == "reward" or not cfg.model.get("value_head", False), "model.value_head",
           "a score head replaces the LM head: only for train.objective=reward")


def init_folder(cfg) -> str | None:
  """The Hugging Face folder of `model.init_from=hf:DIR`, checked; None when not set."""
  source = cfg.model.get("init_from", "")
  if not source:
    return None
  _require(source.startswith("hf:"), "model.init_from",
           f"{source!r} is not of the form hf:DIR (a Hugging Face model folder)")
  folder = source[3:]
  _require(os.path.exists(os.path.join(folder, "config.json")), "model.init_from",
           f"no config.json in {folder}")
  return folder


# ModelConfig fields that shape no weight and only act in training: a run starting from a
# Hugging Face folder takes them from its own config.
TRAINING_ONLY = ("router_jitter", "router_aux_loss_weight", "router_z_loss_weight",
                 "router_bias_update_rate", "router_batch_balance")


# ModelConfig fields of the rope's scaling: set in a run starting from a Hugging Face folder
# (model.rope_scaling not "none"), they replace the folder's, and the model's positions grow to
# rope_original_max_len x rope_factor (context extension, configs/long_context.py).
CONTEXT = ("rope_scaling", "rope_factor", "rope_original_max_len", "rope_low_freq_factor",
           "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow", "rope_truncate",
           "rope_attention_factor", "rope_long_factor", "rope_short_factor")


def model_config(cfg, vocab_size: int) -> ModelConfig:
  """The ModelConfig of this run, with `vocab_size` filled in when the config says 0. With
  `model.init_from=hf:DIR` the shape is the Hugging Face model's, and the run config gives only
  the training-only router settings (TRAINING_ONLY: jitter, the aux loss weights and the
  routing bias's update rate, whose bias starts at zero there) and a rope scaling to extend its
  context with (CONTEXT). The
  execution choices (model.remat, model.attention_impl, model.init_std, ...) are
  `execution`'s."""
  fields, _ = split_fields({k: v for k, v in cfg.model.items() if k != "init_from"})
  fields["value_head"] = fields.get("value_head", False) or cfg.train.objective == "reward"
  if fields["vocab_size"] == 0:
    fields["vocab_size"] = vocab_size
  folder = init_folder(cfg)
  if folder is not None:
    try:
      read = hf.read_config(folder)
      extend = {}
      if fields["rope_scaling"] != "none":  # context extension: this rope over the folder's
        extend = {k: fields[k] for k in CONTEXT}
        extend["max_seq_len"] = max(int(read.get("max_position_embeddings") or 0), int(
            fields["rope_original_max_len"] * fields["rope_factor"]))
      mc = hf.config_from_hf(read, value_head=fields["value_head"], **extend,
                             **{k: fields[k] for k in TRAINING_ONLY})
    except (ValueError, KeyError) as e:
      raise UserError(f"config key model.init_from: {folder}: {e}") from None
  else:
    try:
      mc = ModelConfig.from_dict(fields)
    except ValueError as e:
      raise UserError(f"config key model.{e}") from None
  for key in TRAINING_ONLY:
    _require(mc.n_experts > 0 or not getattr(mc, key), f"model.{key}",
             f"{getattr(mc, key)} is set but the model has no experts (model.n_experts=0)")
  _require(cfg.train.seq_len <= mc.max_seq_len, "train.seq_len",
           f"{cfg.train.seq_len} is beyond the model's {mc.max_seq_len} positions "
           "(model.max_seq_len)")
  return mc


def execution(cfg) -> Execution:
  """How this run's model runs: model.remat, model.attention_impl, model.init_std of the run
  config (a checkpoint restores under any of them)."""
  try:
    return Execution.from_dict(split_fields(dict(cfg.model))[1])
  except ValueError as e:
    raise UserError(f"config key model.{e}") from None


def check_backend(cfg, backend: str) -> None:
  """Options this backend (jax.default_backend()) cannot run: one line, never a silent fallback."""
  if cfg.model.attention_impl in ("pallas", "ring"):
    _require(backend in ("cpu", "gpu", "tpu"), "model.attention_impl",
             f"{cfg.model.attention_impl} runs the Pallas kernel, which has no lowering for "
             f"backend {backend}; use xla")
  if cfg.model.attention_impl == "cudnn":
    _require(backend == "gpu", "model.attention_impl",
             f"cudnn runs on NVIDIA GPUs only, this run's backend is {backend}; use xla or pallas")
    _require(cfg.precision.compute_dtype != "float32", "model.attention_impl",
             "cudnn flash attention needs precision.compute_dtype=bfloat16")
    _require(not cfg.model.attn_softcap, "model.attention_impl",
             "cudnn has no attention soft-cap (model.attn_softcap); use pallas or xla")
  if cfg.model.get("grouped_matmul") == "tokamax":
    _require(gmm.tokamax_installed(), "model.grouped_matmul",
             "tokamax is not installed (pip install tokamax); use auto")


def pipeline_of(cfg, stages: int) -> pipeline_lib.Pipeline | None:
  """The run's pipeline (parallel/pipeline.py), or None with one stage."""
  if stages == 1:
    return None
  m = cfg.mesh
  micro = m.microbatches or (cfg.train.grad_accum if cfg.train.grad_accum > 1 else stages)
  return pipeline_lib.Pipeline(stages, m.pipeline_schedule, micro, m.pipeline_repeats)


def check_pipeline(cfg, sizes: dict[str, int]) -> None:
  """What a pipelined run (mesh.stage > 1) cannot do, each refused in one line."""
  p = pipeline_of(cfg, sizes["stage"])
  mc = model_config(cfg, vocab_size=max(cfg.model.vocab_size, 1))
  for key, problem in p.problems(mc.n_layers, cfg.train.batch_size):
    raise UserError(f"config key {key}: {problem}")
  dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  _require((cfg.train.batch_size // p.microbatches) % dp == 0, "mesh.microbatches",
           f"a microbatch of {cfg.train.batch_size // p.microbatches} sequences (batch_size / "
           f"{p.microbatches} microbatches) does not split over the {dp} data-parallel devices")
  _require(not mc.n_experts, "mesh.stage", "pipelining a mixture of experts is not built yet "
           "(its router losses and loads are per batch); use mesh.stage=1")
  _require(cfg.peft.method != "lisa", "mesh.stage",
           "LISA picks layers across the whole stack; use mesh.stage=1 or another peft.method")
  _require(not cfg.peft.get("adapter_drop", 0), "mesh.stage",
           "AdapterDrop (peft.adapter_drop) runs its lowest layers apart, which pipeline stages "
           "cannot yet; use mesh.stage=1 or peft.adapter_drop=0")
  _require(cfg.model.attention_impl != "ring", "mesh.stage",
           "ring attention inside pipeline stages is not built yet; use attention_impl=xla")
  _require(not objectives.from_config(cfg).needs_reference, "mesh.stage",
           f"train.objective={cfg.train.objective} runs a reference model inside each step, "
           "which a pipelined step cannot yet; use mesh.stage=1 (dpo: or dpo.precompute_ref=True, "
           "its log-probs computed once before training)")


def check_mesh(cfg, n_devices: int) -> dict[str, int]:
  try:
    sizes = mesh_lib.resolve_axis_sizes(dict(cfg.mesh), n_devices)
  except ValueError as e:
    raise UserError(f"config key mesh: {e}") from None
  if sizes["expert"] > 1:  # expert parallelism (parallel/experts.py): each device some experts
    n_experts = model_config(cfg, vocab_size=max(cfg.model.vocab_size, 1)).n_experts
    _require(n_experts > 0, "mesh.expert",
             f"{sizes['expert']} devices on the expert axis would hold copies of the same work: "
             "the model has no experts (model.n_experts=0); set mesh.expert=1")
    _require(n_experts % sizes["expert"] == 0, "mesh.expert",
             f"the model's {n_experts} experts (model.n_experts) do not split over "
             f"{sizes['expert']} devices; use a divisor of {n_experts}")
    try:
      experts_rule = rules_lib.strategy(cfg.mesh.strategy, cfg.mesh.rules).activations["expert"]
    except ValueError as e:
      raise UserError(f"config key {e}") from None
    _require(experts_rule == "expert", "mesh.rules",
             f"expert={experts_rule}: with mesh.expert={sizes['expert']} the experts go over the "
             "expert axis (parallel/experts.py); drop the override or set expert=expert")
  if sizes["stage"] > 1:
    check_pipeline(cfg, sizes)
  dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  micro = cfg.train.batch_size // cfg.train.grad_accum
  _require(micro % dp == 0, "train.batch_size",
           f"the microbatch of {micro} sequences (batch_size / grad_accum) does not split over "
           f"the {dp} data-parallel devices (mesh.data x mesh.fsdp x mesh.expert)")
  if cfg.model.attention_impl in ("pallas", "cudnn") and sizes["sequence"] > 1:
    raise UserError(f"config key model.attention_impl: {cfg.model.attention_impl} keeps each "
                    f"sequence on one device, but mesh.sequence={sizes['sequence']} splits it; "
                    "use attention_impl=ring")
  if cfg.model.attention_impl == "ring" and cfg.train.seq_len % (2 * sizes["sequence"]):
    raise UserError(f"config key train.seq_len: ring attention over mesh.sequence="
                    f"{sizes['sequence']} needs it divisible by {2 * sizes['sequence']}, got "
                    f"{cfg.train.seq_len}")
  return sizes
