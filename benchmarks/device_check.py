"""One device check: attention kernels, FlashMask, and a ~1B train step's MFU, into one JSON.

python benchmarks/device_check.py --out benchmarks/results/device_check.json
    [--budget_s 420] [--tiny] [--sections attention,flashmask,train_step]

Meant for the first few minutes an accelerator is lent (one H100/H200 or TPU chip, under 8
minutes in all). Every case is compiled ahead of time, its compile seconds recorded apart from
its run seconds, and guarded: a case that fails (cuDNN missing, out of memory, a lowering error)
is recorded with its error and the rest runs. The JSON is rewritten after every case, so a run
cut short keeps what it measured.

  attention   forward + backward of each `model.attention_impl` as models/layers.py runs it
              (pallas: our FlashMask kernel; cudnn: jax.nn.dot_product_attention on cuDNN; xla:
              the project's blocked dot_product_attention), causal, bfloat16, 16 query heads over
              8 KV heads of 128, at 2k, 8k and 32k tokens per row, rows so that a call holds 32k
              tokens. The mask is built inside the call from segment ids, as the model builds it.
              FLOPs count visible (query, key) pairs only, so causal is halved: 4 * pairs *
              heads * head_dim forward, 3.5x that forward + backward (the backward recomputes the
              scores: FlashAttention's convention, as benchmarks/attention.py).
  flashmask   packed SFT rows of 8k tokens (the stdlib's functions and classes, tokenized and
              greedy-packed: benchmarks/attention.py), a causal document mask: the Pallas kernel
              with FlashMask vectors against xla and cudnn with the same mask dense; TFLOP/s of
              the visible pairs, and the share of tiles the kernel skips.
  train_step  a 1.04B-parameter Llama shape (d 2048, 16 layers, 16 heads / 8 KV heads of 128,
              ffn 7168, vocab 32768) in bfloat16 with float32 master weights and AdamW, batch
              4 x 4096, the step `train.plan` builds (`train_throughput.compiled_step`, what
              trainer.main runs), once per attention_impl: seconds a step, tokens/s, and MFU =
              tokens/s * ModelConfig.flops_per_token / the chip's peak (trainer.metrics, as the
              trainer logs it).

Budget: a case starts only while the seconds since start plus what the previous case of its
section took (a guess for a section's first case on an accelerator) fit in --budget_s; the first
case of the run always runs. The rest are recorded as skipped, with the reason. The default 420 s
leaves a minute of the 8 for start-up and a case that overruns its guess.

--tiny (automatic on CPU): lengths 256 and 512, 2 heads over 1 of 32, a 0.9M-parameter model,
batch 2 x 128; the Pallas kernel runs in its interpreter as in the tests. The figures then only
show that the script works; cudnn is recorded as unavailable.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

START = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import parallel  # noqa: E402
import train_throughput  # noqa: E402
from benchmarks import attention as attention_bench  # noqa: E402
from benchmarks.host import host_info  # noqa: E402
from configs import base  # noqa: E402
from models import layers  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.kernels import flashmask as fm  # noqa: E402
from models.kernels.flash_attention import default_block  # noqa: E402
from trainer import metrics as metrics_lib, train  # noqa: E402
from trainer.validate import UserError, check_backend, model_config  # noqa: E402

IMPLS = ("pallas", "cudnn", "xla")
SECTIONS = ("attention", "flashmask", "train_step")

FULL = dict(lengths=(2048, 8192, 32768), tokens=32768, heads=16, kv_heads=8, head_dim=128,
            packed_len=8192, repeats=5, steps=5, batch=4, seq_len=4096,
            model=dict(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8,
                       d_ff=7168, max_seq_len=4096, rope_theta=500000.0),
            corpus_chars=1_000_000, tokenizer_vocab=4096,
            # seconds a section's first case is guessed to take, before one has been timed
            first_guess=dict(attention=15.0, flashmask=15.0, train_step=90.0))
TINY = dict(lengths=(256, 512), tokens=512, heads=2, kv_heads=1, head_dim=32, packed_len=512,
            repeats=2, steps=2, batch=2, seq_len=128,
            model=dict(vocab_size=2048, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                       d_ff=384, max_seq_len=128, rope_theta=10000.0),
            corpus_chars=300_000, tokenizer_vocab=1024,
            first_guess=dict(attention=0.0, flashmask=0.0, train_step=0.0))


# ----------------------------------------------------------------------------------------------
# Budget and the guarded case
# ----------------------------------------------------------------------------------------------


class Budget:
  """Seconds since the script started against `seconds`: a case starts only if the previous
  case of its section (or the section's first guess) still fits; the first case always runs."""

  def __init__(self, seconds: float, first_guess: dict[str, float], start: float):
    self.seconds, self.start = seconds, start
    self.last = dict(first_guess)
    self.started = 0

  def refusal(self, section: str) -> str | None:
    elapsed = time.perf_counter() - self.start
    expected = self.last.get(section, 0.0)
    if self.started and elapsed + expected > self.seconds:
      return (f"budget: {elapsed:.0f} s spent + {expected:.0f} s expected > --budget_s "
              f"{self.seconds:g}")
    return None

  def record(self, section: str, seconds: float) -> None:
    self.started += 1
    self.last[section] = seconds


def _error(e: BaseException) -> str:
  lines = [line for line in str(e).splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


class Check:
  """The JSON being built, written to `out` after every case."""

  def __init__(self, out: str, budget: Budget, result: dict):
    self.out, self.budget, self.result = out, budget, result

  def case(self, section: str, row: dict, measure, precheck=None) -> dict:
    """Run measure() -> dict of figures into `row` unless the budget refuses; errors recorded.
    precheck() raising UserError (the project's check_backend) marks the case unavailable,
    whatever the budget."""
    try:
      if precheck is not None:
        precheck()
    except UserError as e:
      row.update(status="unavailable", reason=str(e))
    reason = None if "status" in row else self.budget.refusal(section)
    if reason:
      row.update(status="skipped", reason=reason)
    elif "status" not in row:
      t = time.perf_counter()
      try:
        row.update(measure())
        row["status"] = "ok"
      except UserError as e:  # the project's own refusal (check_backend): not available here
        row.update(status="unavailable", reason=str(e))
      except Exception as e:  # out of memory, a kernel that does not lower: record, go on
        row.update(status="error", error=_error(e))
      row["case_s"] = time.perf_counter() - t
      gc.collect()  # the case's device buffers, before the next case allocates its own
      self.budget.record(section, row["case_s"])
    self.result[section].append(row)
    print(json.dumps(row), flush=True)
    self.write()
    return row

  def write(self) -> None:
    self.result["elapsed_s"] = time.perf_counter() - self.budget.start
    if self.out:
      os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
      with open(self.out + ".tmp", "w") as f:
        json.dump(self.result, f, indent=1)
      os.replace(self.out + ".tmp", self.out)


# ----------------------------------------------------------------------------------------------
# Attention cases
# ----------------------------------------------------------------------------------------------


def run_config(impl: str, shape: dict | None = None, batch: int = 1, seq_len: int = 128):
  """The run config of a case: base defaults, bfloat16 compute, this attention_impl."""
  cfg = base.get_config()
  if shape:
    cfg.model.update(**shape)
  cfg.model.attention_impl = impl
  cfg.precision.compute_dtype = "bfloat16"
  cfg.mesh.update(data=1)
  cfg.train.update(batch_size=batch, seq_len=seq_len, lr=1e-4, warmup_steps=0,
                   lr_schedule="constant")
  return cfg


def segment_runs(segment_ids: np.ndarray) -> list[list[int]]:
  """Per row, the lengths of its runs of equal segment ids (trailing padding is a run too, as
  the masks treat it)."""
  out = []
  for row in np.asarray(segment_ids):
    bounds = np.flatnonzero(np.diff(row)) + 1
    out.append(np.diff(np.concatenate([[0], bounds, [len(row)]])).astype(int).tolist())
  return out


def visible_pairs(runs: list[list[int]]) -> int:
  """(query, key) pairs a causal document mask lets through: L (L + 1) / 2 per segment."""
  return sum(n * (n + 1) // 2 for row in runs for n in row)


def attention_flops(pairs: int, heads: int, head_dim: int) -> float:
  """Forward + backward FLOPs of attention over `pairs` visible pairs: QK^T and PV are
  2 * head_dim each per pair and head forward; the backward is 2.5x (it recomputes QK^T)."""
  return 3.5 * 4 * pairs * heads * head_dim


def _positions(segment_ids: np.ndarray) -> np.ndarray:
  """Positions counting from 0 in every segment, as the data pipeline makes them."""
  b, n = segment_ids.shape
  idx = np.broadcast_to(np.arange(n), (b, n))
  starts = np.concatenate([np.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  return (idx - first).astype(np.int32)


def _attend(mcfg: ModelConfig, impl: str, n: int):
  """attend(q, k, v, positions, segment_ids): the mask built and the attention run as
  `layers.Attention` does for attention_impl `impl` (no cache, no prefix, no ring)."""
  scale = mcfg.scale

  def attend(q, k, v, positions, segment_ids):
    mask = layers.attention_inputs(impl, positions, segment_ids, 0)
    if impl == "xla":
      return layers.dot_product_attention(q, k, v, mask, scale, 0.0, layers.query_blocks(n))
    if impl == "pallas":
      return layers.partitioned_flash_attention(q, k, v, mask, scale, 0.0)
    return layers.library_attention(q, k, v, mask, scale, impl)
  return attend


def attention_case(impl: str, segment_ids: np.ndarray, shape: dict, options) -> dict:
  """Forward + backward of one impl over rows with these segment ids: compile and run seconds,
  the visible pairs, FLOPs and TFLOP/s."""
  b, n = segment_ids.shape
  heads, kv_heads, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
  mcfg = ModelConfig(vocab_size=2, d_model=heads * head_dim, n_layers=1, n_heads=heads,
                     n_kv_heads=kv_heads, head_dim=head_dim, d_ff=2, max_seq_len=n)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (b, n, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, n, kv_heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, n, kv_heads, head_dim), jnp.bfloat16)
  args = (q, k, v, jnp.asarray(_positions(segment_ids)), jnp.asarray(segment_ids, jnp.int32))
  compile_s, run_s = attention_bench.compile_and_time(
      attention_bench._fwd_bwd(_attend(mcfg, impl, n)), *args, repeats=shape["repeats"],
      options=options)
  pairs = visible_pairs(segment_runs(segment_ids))
  flops = attention_flops(pairs, heads, head_dim)
  return dict(compile_s=compile_s, fwd_bwd_s=run_s, visible_pairs=pairs, fwd_bwd_flops=flops,
              fwd_bwd_tflops=flops / run_s / 1e12)


def tile_shares(segment_ids: np.ndarray) -> dict:
  """Shares of the kernel's tiles (its default blocks) skipped, fully visible and partial
  under the causal document mask of these rows (`flashmask.tile_kinds`, as the kernel plans)."""
  n = segment_ids.shape[1]
  block = default_block(n)
  kinds = np.asarray(fm.tile_kinds(fm.document(segment_ids), n, block, block))
  return dict(block=block, tiles_skipped=float((kinds == fm.SKIP).mean()),
              tiles_full=float((kinds == fm.FULL).mean()),
              tiles_partial=float((kinds == fm.PARTIAL).mean()))


# ----------------------------------------------------------------------------------------------
# Train step
# ----------------------------------------------------------------------------------------------


def train_case(impl: str, shape: dict, peak: float) -> dict:
  """The train step of the shape's model with this attention_impl: compile seconds, seconds a
  step (mean of `steps` after one untimed), tokens/s and MFU as `train.run` computes them."""
  cfg = run_config(impl, shape["model"], shape["batch"], shape["seq_len"])
  mcfg = model_config(cfg, cfg.model.vocab_size)
  run, compile_s = train_throughput.compiled_step(cfg)  # compiles, then runs one step
  t = time.perf_counter()
  loss = run(shape["steps"])
  step_s = (time.perf_counter() - t) / shape["steps"]
  tokens = shape["batch"] * shape["seq_len"]
  flops_per_token = mcfg.flops_per_token(shape["seq_len"])
  units = metrics_lib.peak_units(jax.devices()[:1])
  return dict(params=mcfg.num_params(), tokens_per_step=tokens, compile_s=compile_s,
              step_s=step_s, tokens_per_sec=tokens / step_s, flops_per_token=flops_per_token,
              mfu=tokens / step_s * flops_per_token / (peak * units), loss=loss)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _sections(text: str) -> tuple[str, ...]:
  names = tuple(s for s in text.split(",") if s)
  bad = [s for s in names if s not in SECTIONS]
  if bad or not names:
    raise argparse.ArgumentTypeError(f"{text!r}: sections are {', '.join(SECTIONS)}")
  return names


def _budget(text: str) -> float:
  value = float(text)
  if not value >= 0:
    raise argparse.ArgumentTypeError(f"{text!r}: seconds >= 0")
  return value


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    """A bad flag is one line on stderr and exit code 2, as the project's other commands."""
    print(f"{self.prog}: {message}", file=sys.stderr)
    sys.exit(2)


def packed_rows(shape: dict) -> np.ndarray:
  """Segment ids of tokens // packed_len packed SFT rows, spread evenly over all the rows the
  corpus packs into: the packer's first rows of each group hold its longest examples (one
  document a row), its last ones many short ones."""
  n, b = shape["packed_len"], max(1, shape["tokens"] // shape["packed_len"])
  lengths = attention_bench.example_lengths(shape["corpus_chars"], shape["tokenizer_vocab"])
  rows = attention_bench.packed_segments(lengths, n, len(lengths))
  return rows[((np.arange(b) + 0.5) * len(rows) / b).astype(int)]


def device_info() -> dict:
  d = jax.devices()[0]
  info = dict(backend=jax.default_backend(), platform=d.platform, kind=d.device_kind,
              count=len(jax.devices()), jax=jax.__version__, python=platform.python_version())
  try:
    stats = d.memory_stats() or {}
    if "bytes_limit" in stats:
      info["memory_gib"] = stats["bytes_limit"] / 2**30
  except Exception:  # CPU and some plugins have none
    pass
  return info


def main(argv=None, start: float | None = None) -> dict:
  """`start`: the perf_counter the budget counts from (default: now)."""
  start = time.perf_counter() if start is None else start
  ap = _Parser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="", help="the JSON file (rewritten after every case)")
  ap.add_argument("--budget_s", type=_budget, default=420.0,
                  help="start no case past these seconds since start (see the docstring)")
  ap.add_argument("--tiny", action="store_true", help="tiny shapes (automatic on CPU)")
  ap.add_argument("--sections", type=_sections, default=SECTIONS,
                  help=f"comma-separated, of {','.join(SECTIONS)}")
  args = ap.parse_args(argv)
  tiny = args.tiny or jax.default_backend() == "cpu"
  shape = TINY if tiny else FULL
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                            jax.devices()[:1])
  options = train.compiler_options(mesh)  # LLVM -O1 on CPU, as the trainer compiles
  peak, peak_source = metrics_lib.peak_flops_per_device()
  result = {"command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]),
            "tiny": tiny, "budget_s": args.budget_s, "device": device_info(),
            "host": host_info(), "peak_flops_per_device": peak, "peak_source": peak_source,
            "shapes": {k: v for k, v in shape.items() if k != "first_guess"},
            "flop_counting": "attention: 3.5 * 4 * visible (query, key) pairs * heads * head_dim "
                             "forward + backward; train_step: ModelConfig.flops_per_token",
            **{s: [] for s in SECTIONS}}
  check = Check(args.out, Budget(args.budget_s, shape["first_guess"], start), result)
  try:
    check.write()
  except OSError as e:
    ap.error(f"--out {args.out}: {e.strerror}")

  def available(impl, cfg=None):
    return lambda: check_backend(cfg or run_config(impl), jax.default_backend())
  dims = {k: shape[k] for k in ("heads", "kv_heads", "head_dim", "repeats")}
  heads = {k: shape[k] for k in ("heads", "kv_heads", "head_dim")}

  if "attention" in args.sections:
    for n in shape["lengths"]:
      seg = np.ones((max(1, shape["tokens"] // n), n), np.int32)  # one document a row: causal
      for impl in IMPLS:
        check.case("attention", dict(impl=impl, mask="causal", tokens=n, batch=len(seg),
                                     **heads),
                   lambda impl=impl, seg=seg: attention_case(impl, seg, dims, options),
                   available(impl))

  if "flashmask" in args.sections:
    n = shape["packed_len"]
    seg = None
    if not check.budget.refusal("flashmask"):  # tokenizing the corpus takes seconds
      seg = packed_rows(shape)
      result["flashmask_rows"] = dict(tokens=n, batch=len(seg), segment_lengths=segment_runs(seg),
                                      **tile_shares(seg))
    for impl in IMPLS:
      check.case("flashmask", dict(impl=impl, mask="FlashMask document" if impl == "pallas"
                                   else "dense document", tokens=n, **heads),
                 lambda impl=impl: attention_case(impl, seg, dims, options), available(impl))

  if "train_step" in args.sections:
    for impl in IMPLS:
      cfg = run_config(impl, shape["model"], shape["batch"], shape["seq_len"])
      check.case("train_step", dict(impl=impl, batch=shape["batch"], seq_len=shape["seq_len"]),
                 lambda impl=impl: train_case(impl, shape, peak), available(impl, cfg))

  check.write()
  _print_tables(result)
  return result


def _print_tables(result: dict) -> None:
  """The figures as Markdown rows for BENCHMARKS.md."""
  def fig(row, key, fmt):
    return format(row[key], fmt) if row.get("status") == "ok" else row.get("status", "")
  print(f"\n{result['device']['kind']} ({result['device']['backend']}), jax "
        f"{result['device']['jax']}, host {result['host']['cpu_model']}")
  print("| tokens | impl | fwd+bwd TFLOP/s | compile s |\n| --- | --- | --- | --- |")
  for r in result["attention"]:
    print(f"| {r['tokens']} | {r['impl']} | {fig(r, 'fwd_bwd_tflops', '.3g')} | "
          f"{fig(r, 'compile_s', '.1f')} |")
  for r in result["flashmask"]:
    print(f"| {r['tokens']} packed | {r['impl']} ({r['mask']}) | {fig(r, 'fwd_bwd_tflops', '.3g')}"
          f" | {fig(r, 'compile_s', '.1f')} |")
  if "flashmask_rows" in result:
    print(f"tiles skipped by the kernel: {result['flashmask_rows']['tiles_skipped']:.1%}")
  print("| impl | step s | tokens/s | MFU | compile s |\n| --- | --- | --- | --- | --- |")
  for r in result["train_step"]:
    print(f"| {r['impl']} | {fig(r, 'step_s', '.3f')} | {fig(r, 'tokens_per_sec', ',.0f')} | "
          f"{fig(r, 'mfu', '.1%')} | {fig(r, 'compile_s', '.1f')} |")


if __name__ == "__main__":
  main(start=START)
