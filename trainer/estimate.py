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
  keeps (`trainer.memory.ACTIVATIONS`), with and without remat. Beside it, with --compile, the compiler's own
  figure: `memory_analysis()` of the real train step on the real mesh (arguments + temporaries).
- --devices=N simulates N CPU devices (a mesh of a GPU or TPU slice can be sized on a laptop).

Errors in the config are one line and exit code 2, as with trainer.main.
"""

from __future__ import annotations

import dataclasses

import jax
from absl import app, flags, logging

import parallel
from parallel import pipeline as pipeline_lib
from trainer import memory, metrics as metrics_lib, train
from trainer.data import tokenizer as tokenizer_lib
from trainer.memory import MiB, element_bytes
from trainer import cli
from trainer.validate import (UserError, check_backend, check_config, check_mesh,
                              model_config, pipeline_of)

_DEVICES = flags.DEFINE_integer("devices", 0, "Simulate this many CPU devices (0: the real ones).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the time estimate.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device (0: the data sheet's "
                           "bf16 figure for known chips, else a measured f32 matmul).")
_COMPILE = flags.DEFINE_bool("compile", True, "Compile the real train step and print the "
                             "compiler's memory figure beside the estimate.")
_STRATEGIES = flags.DEFINE_string("strategies", "", "Also estimate these mesh.strategy presets on "
                                  "the same devices (comma-separated; the config's mesh sizes, "
                                  "or all devices on fsdp for fsdp presets).")


@dataclasses.dataclass
class Estimate:
  params: int
  active: int  # the parameters one token uses (a mixture of experts: its k routed experts)
  trainable: int
  flops_per_token: float
  tokens: int
  mesh: dict[str, int]
  strategy: str
  bytes: dict[str, float]  # per device, by component

  @property
  def total_flops(self) -> float:
    return self.flops_per_token * self.tokens


def vocab_size(cfg) -> int:
  """The vocabulary the run will have: the config's, else its tokenizer file's, else the size
  of the tokenizer it would train."""
  if cfg.model.vocab_size:
    return cfg.model.vocab_size
  if cfg.data.tokenizer:
    return tokenizer_lib.load(cfg.data.tokenizer).vocab_size
  return cfg.data.tokenizer_vocab_size


def estimate(cfg, devices) -> tuple[Estimate, object]:
  """The estimate, and the plan (train.plan) it was read from."""
  check_config(cfg)
  check_backend(cfg, devices[0].platform)
  sizes = check_mesh(cfg, len(devices))
  mcfg = model_config(cfg, vocab_size(cfg))
  mesh = parallel.make_mesh(sizes, devices)
  pl = train.plan(cfg, mcfg, mesh)
  batch = train.abstract_batch(cfg, pl.batch_sharding, pl.objective)
  comp, n_trainable = memory.components(cfg, pl, mcfg, sizes, batch)
  tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
  return Estimate(mcfg.num_params(), mcfg.num_params(active=True), n_trainable,
                  mcfg.flops_per_token(cfg.train.seq_len),
                  tokens, sizes, cfg.mesh.strategy, comp), (pl, mcfg, batch)


def total_bytes(est: Estimate) -> float:
  return memory.total_bytes(est.bytes)


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
  stored = pl.handle.integers
  lines = [
      f"parameters: {est.params:,} ({est.trainable:,} trainable)"
      + (f"; active per token: {est.active:,} ({mcfg.experts_per_token} of {mcfg.n_experts} "
         "experts)" if mcfg.n_experts else "")
      + (f"; projections stored as {stored.scheme.bits}-bit {stored.method} integers, frozen "
         "(model.init_from)" if stored is not None else ""),
      f"FLOPs per token: {_human(est.flops_per_token)} = 6N {_human(est.flops_per_token - attn)}"
      f" + attention {_human(attn)} (causal, remat not counted)",
      f"training: {cfg.train.steps:,} steps x {cfg.train.batch_size} x {cfg.train.seq_len} = "
      f"{_human(est.tokens)} tokens, {_human(est.total_flops)}FLOPs",
      f"time at {mfu:.0%} MFU of {peak / 1e12:.4g} TFLOP/s per device ({source}) x {n}: "
      f"{_duration(seconds)}",
      "",
      f"memory per device, mesh {est.mesh}, strategy {est.strategy}:",
  ]
  if len(pl.spec.slots) > 1:  # the models of the run and what each costs
    lines[-1:-1] = ["models: " + ", ".join(
        f"{s.name} ({'trains, its own optimizer' if s.trains else 'frozen'})"
        for s in pl.spec.slots), ""]
  pipe = pipeline_of(cfg, est.mesh["stage"])
  if pipe is not None:
    table = pipeline_lib.build_table(pipe)
    lines[-1:-1] = [
        f"pipeline: {pipe.schedule}, {pipe.stages} stages x {pipe.repeats} chunk(s) of "
        f"{mcfg.n_layers // (pipe.stages * pipe.repeats)} layers, {pipe.microbatches} "
        f"microbatches: {table.slots} slots, bubble {table.bubble():.1%} (predicted), "
        f"{table.inputs} microbatch inputs held per stage; memory below is per stage", ""]
  width = max(len(k) for k in est.bytes) + 2
  for k, v in est.bytes.items():
    lines.append(f"  {k:<{width}} {v / MiB:10.1f} MiB")
  lines.append(f"  {'total (estimate)':<{width}} {total_bytes(est) / MiB:10.1f} MiB")
  run = pl.handle.run
  other = "full" if run.remat == "none" else "none"
  element = element_bytes(devices[0].platform, pl.compute_dtype)
  acts = memory.stage_activation_bytes(mcfg, cfg.train, est.mesh, pipe, other, element,
                                      run.attention_impl, run)
  lines.append(f"  {f'(activations with remat {other})':<{width}} {acts / MiB:10.1f} MiB")
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
      acts = b[f"activations (remat {run.remat})"]
      mesh = "x".join(f"{k}{v}" for k, v in e.mesh.items() if v > 1) or "1 device"
      lines.append(f"| {name} | {mesh} | {state / MiB:.1f} | "
                   f"{b['gradients (+ update temporaries)'] / MiB:.1f} | {acts / MiB:.1f} | "
                   f"{total_bytes(e) / MiB:.1f} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}")
  if not cli.VERBOSE.value:
    logging.set_verbosity(logging.WARNING)
  if _DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    jax.config.update("jax_platforms", "cpu")
  strategies = [s for s in _STRATEGIES.value.split(",") if s]
  with cli.user_errors():
    print(report(cli.CONFIG.value, jax.devices(), _MFU.value, _PEAK.value,
                 _COMPILE.value, strategies))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
