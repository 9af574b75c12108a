"""Where numbers go: a progress bar on stderr, `metrics.jsonl` and TensorBoard event files in the
workdir. Also the peak FLOP/s used for MFU."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from trainer.tfevents import EventWriter

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets.
_PEAK_BF16 = {
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "a800": 312e12,
    "l4": 121e12, "a10": 125e12, "v100": 125e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


def measured_matmul_flops(n: int = 1024, min_reps: int = 5, min_seconds: float = 0.3) -> float:
  """FLOP/s of an f32 n x n matmul on the default device: the practical peak of a CPU. The
  fastest of repeats that go on for `min_seconds` (and at least `min_reps`): on a shared host a
  few repeats can all land in a busy moment (three of 10 ms once measured half the peak)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best, reps, start = float("inf"), 0, time.perf_counter()
  while reps < min_reps or time.perf_counter() - start < min_seconds:
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
    reps += 1
  return 2 * n**3 / best


def peak_flops_per_device(override_tflops: float = 0.0) -> tuple[float, str]:
  """(FLOP/s, where the figure came from). A config override wins; then the data-sheet table;
  on CPUs (and unknown chips) a measured matmul."""
  if override_tflops > 0:
    return override_tflops * 1e12, "config train.peak_tflops"
  kind = jax.devices()[0].device_kind.lower()
  for name, flops in sorted(_PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return flops, f"data sheet ({kind})"
  return measured_matmul_flops(), f"measured f32 matmul ({kind})"


def peak_units(devices) -> int:
  """How many times the per-device peak the job has: its devices; on CPUs its processes, since
  simulated CPU devices (--xla_force_host_platform_device_count) share one host's cores, which
  the measured peak already uses."""
  if devices[0].platform == "cpu":
    return len({d.process_index for d in devices})
  return len(devices)


def json_value(x: float) -> float | None:
  """Strict JSON has no NaN or Infinity: a non-finite value is written as null."""
  return x if np.isfinite(x) else None


def trim_jsonl(path: str, last_step: int) -> int:
  """Drop the rows of `path` past `last_step` (a run resumed from that step writes them again);
  returns how many. Rewritten atomically; a torn last line (a crash mid-write) goes too."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        keep = json.loads(line)["step"] <= last_step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
  return dropped


class MetricsWriter:
  """Writes one JSON object per logged step and the same scalars to TensorBoard.

  A run started afresh begins a new metrics.jsonl (`resumed=False`); one resumed from the
  checkpoint of `start_step` drops the rows past it first, which it is about to write again, and
  tells TensorBoard to do the same (a SessionLog START at the next step purges later events).
  A metrics.jsonl deleted while the run goes on is started again at the next write."""

  SHOWN = ("loss", "eval_loss", "eval_exact_match", "tokens_per_sec", "mfu")

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True,
               resumed: bool = False):
    self.enabled = enabled
    self.shown: dict[str, str] = {}
    self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                    mininterval=1.0, disable=not enabled, smoothing=0.1)
    if enabled:
      self.path = os.path.join(workdir, "metrics.jsonl")
      trim_jsonl(self.path, start_step if resumed else -1)
      self.jsonl = open(self.path, "a", buffering=1)
      self.tb = EventWriter(os.path.join(workdir, "tensorboard"))
      if resumed:
        self.tb.restart(start_step + 1)

  def _jsonl(self):
    """The open metrics.jsonl, opened again if someone deleted or replaced it."""
    try:
      same = os.stat(self.path).st_ino == os.fstat(self.jsonl.fileno()).st_ino
    except FileNotFoundError:
      same = False
    if not same:
      self.jsonl.close()
      self.jsonl = open(self.path, "a", buffering=1)
    return self.jsonl

  def advance(self, n: int = 1) -> None:
    self.bar.update(n)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
    row = {"step": int(step), **{k: json_value(v) for k, v in clean.items()}}
    self._jsonl().write(json.dumps(row, allow_nan=False) + "\n")
    self.tb.scalars(int(step), clean)
    self.shown.update({k: f"{clean[k]:.4g}" for k in self.SHOWN if k in clean})
    self.bar.set_postfix(self.shown, refresh=False)

  def note(self, text: str) -> None:
    """A line on stderr that does not break the progress bar."""
    if self.enabled:
      self.bar.write(text, file=self.bar.fp)

  def close(self) -> None:
    self.bar.close()
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
