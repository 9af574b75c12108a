"""What a run will cost, before it runs: parameters, FLOPs, time, and memory per device.

python -m trainer.estimate --config=configs/RECIPE.py [--config.KEY=VALUE ...] [--devices=N]
    [--mfu=0.4] [--peak_tflops=T] [--compile=true] [--strategies=dp,zero1,zero2,fsdp]

- FLOPs per token: 6N for the matmuls (N without the embedding lookup; a tied head counted) plus
  attention, 6 * layers * seq_len * heads * head_dim, i.e. QK^T and PV (2 matmuls of
  2 * seq_len * heads * head_dim FLOPs per token) times 3 for the backward, halved for the causal
  mask. Recomputation under remat is not counted (the convention MaxText's MFU uses too). Total
  training FLOPs: that times steps * batch_size * seq_len tokens.
- Memory per device, by component: parameters, optimizer state and the rest of the train state
  are exact (their shapes and shardings on the mesh); gradients are the trainable parameters in
  the gradients' sharding; activations come from a per-token model of what the backward pass
  keeps (`ACTIVATIONS`), with and without remat. Beside it, with --compile, the compiler's own
  figure: `memory_analysis()` of the real train step on the real mesh (arguments + temporaries).
- --devices=N simulates N CPU devices (a mesh of a GPU or TPU slice can be sized on a laptop).

Errors in the config are one line and exit code 2, as with trainer.main.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from absl import app, flags, logging

import parallel
from models import layers
from trainer import metrics as metrics_lib, state as state_lib, train
from trainer import main as main_lib  # the --config flag and its one-line errors
from trainer.validate import (UserError, check_backend, check_config, check_mesh,
                              model_config)

_DEVICES = flags.DEFINE_integer("devices", 0, "Simulate this many CPU devices (0: the real ones).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the time estimate.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device (0: the data sheet's "
                           "bf16 figure for known chips, else a measured f32 matmul).")
_COMPILE = flags.DEFINE_bool("compile", True, "Compile the real train step and print the "
                             "compiler's memory figure beside the estimate.")
_STRATEGIES = flags.DEFINE_string("strategies", "", "Also estimate these mesh.strategy presets on "
                                  "the same devices (comma-separated; the config's mesh sizes, "
                                  "or all devices on fsdp for fsdp presets).")

MiB = 2**20


# What the train step keeps per token, in elements of the compute dtype, by remat policy: per
# layer, d * d_model + kv * kv_width + ff * d_ff + scores * heads * seq_len (attention scores:
# the xla path keeps no probabilities, models/layers.attend_block, but computes a block's at a
# time); outside the layers, vocab * vocab_size + outside * d_model (embeddings, final norm,
# logits, cross-entropy); and `grads` times the trainable parameters' bytes for the gradients
# with the update's temporaries. Under full remat a layer keeps `kept` * d_model (its input) and
# the per-layer terms count once: one layer's working set is live at a time (the dots policies
# keep their per-layer terms, like none). Flash attention paths (pallas, cudnn, ring) never hold
# the scores: their `scores` term is left out. The counts are fit (non-negative least squares)
# to XLA's own buffer assignment of our train step on CPU for 12 shapes, by
# `python benchmarks/estimate_fit.py --remat none,full,dots,dots_no_batch`, which prints these
# lines; tests/test_estimate.py checks them against the compiler on the tiny and a medium config.
@dataclasses.dataclass(frozen=True)
class Coefficients:
  grads: float
  d: float
  kv: float
  ff: float
  scores: float
  vocab: float
  outside: float
  kept: float = 0.0


ACTIVATIONS = {
    "none": Coefficients(grads=1.81, d=7.27, kv=2.13, ff=6.36, scores=0.71, vocab=1.36,
                         outside=25.16),
    "full": Coefficients(grads=1.66, kv=0.0, ff=5.58, scores=2.14, vocab=1.3, outside=4.96,
                         kept=0.29, d=0.0),
    "dots": Coefficients(grads=2.13, d=0.03, kv=1.13, ff=2.27, scores=0.51, vocab=1.52,
                         outside=18.94),
    "dots_no_batch": Coefficients(grads=1.96, d=0.03, kv=1.13, ff=2.27, scores=0.51, vocab=1.52,
                                  outside=18.94),
}


@dataclasses.dataclass
class Estimate:
  params: int
  trainable: int
  flops_per_token: float
  tokens: int
  mesh: dict[str, int]
  strategy: str
  bytes: dict[str, float]  # per device, by component

  @property
  def total_flops(self) -> float:
    return self.flops_per_token * self.tokens


def element_bytes(platform: str, compute_dtype) -> int:
  """Bytes of an activation: XLA:CPU computes bfloat16 and float16 in float32."""
  return 4 if platform == "cpu" else np.dtype(compute_dtype).itemsize


def score_keys(seq_len: int) -> float:
  """Keys per query the xla path holds scores for: its query blocks (models/layers.py) skip
  the keys after each block, keeping (blocks + 1) / (2 blocks) of them."""
  blocks = layers.query_blocks(seq_len)
  return seq_len * (blocks + 1) / (2 * blocks)


def activation_bytes(mcfg, tc, mesh: dict[str, int], remat: str, element: int) -> float:
  """The per-token model above, for the tokens and heads one device holds."""
  c = ACTIVATIONS[remat]
  dp = mesh["data"] * mesh["fsdp"]
  tokens = tc.batch_size // tc.grad_accum * tc.seq_len / (dp * mesh["sequence"])
  tp = mesh["tensor"]
  scores = c.scores if mcfg.attention_impl == "xla" else 0.0
  layer = (c.d * mcfg.d_model + c.kv * mcfg.n_kv_heads * mcfg.head_dim / tp
           + c.ff * mcfg.d_ff / tp + scores * mcfg.n_heads / tp * score_keys(tc.seq_len))
  if remat != "full":
    per_token = mcfg.n_layers * layer
  else:
    per_token = mcfg.n_layers * c.kept * mcfg.d_model + layer
  per_token += c.vocab * mcfg.vocab_size / tp + c.outside * mcfg.d_model
  return tokens * per_token * element


def vocab_size(cfg) -> int:
  """The vocabulary the run will have: the config's, else its tokenizer file's, else the size
  of the tokenizer it would train."""
  if cfg.model.vocab_size:
    return cfg.model.vocab_size
  if cfg.data.tokenizer:
    from trainer.data import tokenizer as tokenizer_lib
    return tokenizer_lib.load(cfg.data.tokenizer).vocab_size
  return cfg.data.tokenizer_vocab_size


def device_bytes(tree, memory_kind: str | None = None) -> float:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (of `memory_kind`
  only, when given: the host-offloaded optimizer state is not device memory)."""
  total = 0.0
  for x in jax.tree.leaves(tree):
    kind = getattr(x.sharding, "memory_kind", None)
    if memory_kind is not None and kind not in (memory_kind, None):
      continue
    total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
  return total


def estimate(cfg, devices) -> tuple[Estimate, object]:
  """The estimate, and the plan (train.plan) it was read from."""
  check_config(cfg)
  check_backend(cfg, devices[0].platform)
  sizes = check_mesh(cfg, len(devices))
  mcfg = model_config(cfg, vocab_size(cfg))
  mesh = parallel.make_mesh(sizes, devices)
  pl = train.plan(cfg, mcfg, mesh)
  abstract = pl.abstract_state
  params = abstract["params"]
  labels = None if pl.handle.peft is None else pl.handle.peft.labels(params)
  grad_shardings = state_lib.param_shardings(
      pl.handle, mesh, parallel.strategy(cfg.mesh.strategy, cfg.mesh.rules).grads)
  trainable = [(p, s) for p, s, l in zip(
      jax.tree.leaves(params), jax.tree.leaves(grad_shardings),
      jax.tree.leaves(labels) if labels is not None else [None] * len(jax.tree.leaves(params)))
      if l != "frozen"]
  grads = sum(math.prod(s.shard_shape(p.shape)) * p.dtype.itemsize for p, s in trainable)
  if pl.lisa_k:  # LISA: k of the layers (and the outside parameters) train at a time
    grads *= (pl.lisa_k + 1) / (mcfg.n_layers + 1)
  element = element_bytes(devices[0].platform, pl.compute_dtype)
  c = ACTIVATIONS[mcfg.remat]
  rest = {k: v for k, v in abstract.items() if k not in ("params", "opt_state")}
  batch = train.abstract_batch(cfg, pl.batch_sharding)
  comp = {
      "parameters": device_bytes(params),
      "optimizer state": device_bytes(abstract["opt_state"], "device"),
      "other state": device_bytes(rest),
      "gradients (+ update temporaries)": c.grads * grads,
      f"activations (remat {mcfg.remat})": activation_bytes(mcfg, cfg.train, sizes, mcfg.remat,
                                                            element),
      "batch": device_bytes(batch),
  }
  host = device_bytes(abstract["opt_state"]) - comp["optimizer state"]
  if host:
    comp["optimizer state in host memory (not counted)"] = host
  n_trainable = sum(math.prod(p.shape) for p, _ in trainable)
  tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
  return Estimate(mcfg.num_params(), n_trainable, mcfg.flops_per_token(cfg.train.seq_len),
                  tokens, sizes, cfg.mesh.strategy, comp), (pl, mcfg, batch)


def total_bytes(est: Estimate) -> float:
  return sum(v for k, v in est.bytes.items() if "not counted" not in k)


def compiled_bytes(pl, batch) -> dict[str, float]:
  """The compiler's figure: memory_analysis() of the train step compiled for this mesh."""
  with parallel.activate(pl.mesh, pl.rules):
    m = pl.train_step.lower(pl.abstract_state, batch).compile().memory_analysis()
  return {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes,
          "total": m.argument_size_in_bytes + m.temp_size_in_bytes
                   + m.output_size_in_bytes - m.alias_size_in_bytes}


def _human(n: float, unit: str = "") -> str:
  for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{prefix}{unit}"
  return f"{n:.3g}{unit}"


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  if seconds < 3 * 86400:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds / 86400:.1f} days"


def with_strategy(cfg, name: str):
  """The config on the same devices with another mesh.strategy: data-parallel presets over
  `data`, FSDP presets over `fsdp` (the other axes as configured)."""
  other = cfg.copy_and_resolve_references()
  with other.unlocked():
    other.mesh.strategy = name
    if name.startswith("fsdp"):
      other.mesh.update(data=1, fsdp=-1)
    else:
      other.mesh.update(data=-1, fsdp=1)
  return other


def report(cfg, devices, mfu: float, peak_tflops: float, compile_step: bool,
           strategies: list[str]) -> str:
  est, (pl, mcfg, batch) = estimate(cfg, devices)
  n = metrics_lib.peak_units(devices)
  peak, source = metrics_lib.peak_flops_per_device(peak_tflops)
  seconds = est.total_flops / (mfu * peak * n)
  attn = mcfg.attention_flops_per_token(cfg.train.seq_len)
  lines = [
      f"parameters: {est.params:,} ({est.trainable:,} trainable)",
      f"FLOPs per token: {_human(est.flops_per_token)} = 6N {_human(est.flops_per_token - attn)}"
      f" + attention {_human(attn)} (causal, remat not counted)",
      f"training: {cfg.train.steps:,} steps x {cfg.train.batch_size} x {cfg.train.seq_len} = "
      f"{_human(est.tokens)} tokens, {_human(est.total_flops)}FLOPs",
      f"time at {mfu:.0%} MFU of {peak / 1e12:.4g} TFLOP/s per device ({source}) x {n}: "
      f"{_duration(seconds)}",
      "",
      f"memory per device, mesh {est.mesh}, strategy {est.strategy}:",
  ]
  width = max(len(k) for k in est.bytes) + 2
  for k, v in est.bytes.items():
    lines.append(f"  {k:<{width}} {v / MiB:10.1f} MiB")
  lines.append(f"  {'total (estimate)':<{width}} {total_bytes(est) / MiB:10.1f} MiB")
  other = "full" if mcfg.remat == "none" else "none"
  element = element_bytes(devices[0].platform, pl.compute_dtype)
  lines.append(f"  {f'(activations with remat {other})':<{width}} "
               f"{activation_bytes(mcfg, cfg.train, est.mesh, other, element) / MiB:10.1f} MiB")
  if compile_step:
    compiled = compiled_bytes(pl, batch)
    lines.append(f"  {'compiled: arguments + temporaries':<{width}} "
                 f"{compiled['total'] / MiB:10.1f} MiB  (estimate / compiled "
                 f"{total_bytes(est) / compiled['total']:.3f})")
  if strategies:
    lines += ["", "| strategy | mesh | state | gradients | activations | total (MiB per device) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name in strategies:
      try:
        e, _ = estimate(with_strategy(cfg, name), devices)
      except UserError as err:
        lines.append(f"| {name} | - | {err} | | | |")
        continue
      b = e.bytes
      state = b["parameters"] + b["optimizer state"] + b["other state"]
      acts = b[f"activations (remat {mcfg.remat})"]
      mesh = "x".join(f"{k}{v}" for k, v in e.mesh.items() if v > 1) or "1 device"
      lines.append(f"| {name} | {mesh} | {state / MiB:.1f} | "
                   f"{b['gradients (+ update temporaries)'] / MiB:.1f} | {acts / MiB:.1f} | "
                   f"{total_bytes(e) / MiB:.1f} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    main_lib._fail(f"unexpected arguments {' '.join(argv[1:])}")
  if not main_lib._VERBOSE.value:
    logging.set_verbosity(logging.WARNING)
  if _DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    jax.config.update("jax_platforms", "cpu")
  strategies = [s for s in _STRATEGIES.value.split(",") if s]
  try:
    print(report(main_lib._CONFIG.value, jax.devices(), _MFU.value, _PEAK.value,
                 _COMPILE.value, strategies))
  except UserError as e:
    if main_lib._VERBOSE.value:
      raise
    main_lib._fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=main_lib.parse_flags)
