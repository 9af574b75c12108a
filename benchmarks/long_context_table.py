"""Perplexity by position on held-out long text: a model trained on 128-token rows, as it is
and with its rope rescaled 4x (no training), against runs of configs/long_context.py that trained
the extension (BENCHMARKS.md "Long context").

python benchmarks/long_context_table.py --base=/tmp/base_hf --runs=/tmp/long_yarn,/tmp/long_linear

Rows: --seq_len + 1 tokens cut from inside single held-out documents of the embedded corpus
(files whose crc32 puts them in the eval split, as every run holds them out), so a position's
context is all one file. Each column is exp(mean next-token NLL) over the targets at those
positions. Prints a markdown table; the figures and the host go to
benchmarks/results/long_context.json.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import host  # noqa: E402
from models import hf  # noqa: E402
from models.handle import model_handle  # noqa: E402
from trainer import export, losses  # noqa: E402
from trainer.data import stdlib_corpus, tokenizer as tokenizer_lib  # noqa: E402

_BASE = flags.DEFINE_string("base", "/tmp/base_hf", "the base model's Hugging Face folder")
_RUNS = flags.DEFINE_list("runs", [], "workdirs of configs/long_context.py runs")
_SEQ = flags.DEFINE_integer("seq_len", 512, "positions per row")
_ORIGINAL = flags.DEFINE_integer("original", 128, "the base's training length")
_BUCKETS = flags.DEFINE_integer("buckets", 4, "position ranges per row")
_ROWS = flags.DEFINE_integer("rows", 64, "held-out rows")
_OUT = flags.DEFINE_string("out", "benchmarks/results/long_context.json", "the JSON")


def held_out_rows(tokenizer, seq_len: int, n: int) -> np.ndarray:
  """(up to n, seq_len + 1): consecutive windows inside each held-out file, in corpus order."""
  _, docs = stdlib_corpus.load_documents(3_000_000, 5.0)
  rows = []
  for text in docs:
    ids = tokenizer_lib.prompt_ids(tokenizer, text)
    for start in range(0, len(ids) - seq_len, seq_len + 1):
      rows.append(ids[start:start + seq_len + 1])
      if len(rows) == n:
        return np.asarray(rows, np.int32)
  return np.asarray(rows, np.int32)


def perplexity_by_position(handle, params, rows: np.ndarray, buckets: int,
                           batch: int = 8) -> list[float]:
  @jax.jit
  def nll(params, tokens):
    model = handle.bind(params)
    h, _ = model.forward(tokens[:, :-1])
    return losses.token_nll(model.logits(h), tokens[:, 1:]).sum(0)  # (seq_len,)

  total = sum(np.asarray(nll(params, jnp.asarray(rows[i:i + batch]))).astype(np.float64)
              for i in range(0, len(rows), batch))
  per = total.reshape(buckets, -1).sum(1) / (rows.shape[0] * total.shape[0] // buckets)
  return [float(np.exp(v)) for v in per]


def main(argv):
  del argv
  tokenizer = tokenizer_lib.load(_BASE.value)
  rows = held_out_rows(tokenizer, _SEQ.value, _ROWS.value)
  factor = _SEQ.value / _ORIGINAL.value
  scaled = dict(rope_factor=factor, rope_original_max_len=_ORIGINAL.value,
                max_seq_len=max(_SEQ.value + 1, hf.read_config(_BASE.value).get(
                    "max_position_embeddings", 0)))
  models = [("base, as trained", {}),
            (f"base, position interpolation x{factor:g}", dict(rope_scaling="linear", **scaled)),
            (f"base, NTK-aware x{factor:g}", dict(rope_scaling="ntk", **scaled)),
            (f"base, dynamic NTK x{factor:g}", dict(rope_scaling="dynamic", **scaled)),
            (f"base, YaRN x{factor:g}", dict(rope_scaling="yarn", **scaled))]
  results = []
  for label, overrides in models:
    cfg, params = hf.load(_BASE.value, **overrides)
    results.append((label, perplexity_by_position(model_handle(cfg), params, rows,
                                                  _BUCKETS.value)))
  for workdir in _RUNS.value:
    run_cfg, handle, params, step = export.load_run(workdir)
    label = (f"{os.path.basename(workdir)}: trained {step} steps of {run_cfg.train.seq_len}, "
             f"{handle.cfg.rope_scaling} x{handle.cfg.rope_factor:g}")
    results.append((label, perplexity_by_position(model_handle(handle.cfg), params, rows,
                                                  _BUCKETS.value)))
  width = _SEQ.value // _BUCKETS.value
  spans = [f"{i * width}-{(i + 1) * width - 1}" for i in range(_BUCKETS.value)]
  print(f"{rows.shape[0]} held-out rows of {_SEQ.value} positions\n")
  print("| model | " + " | ".join(spans) + " |")
  print("| --- |" + " --- |" * len(spans))
  for label, ppl in results:
    print(f"| {label} | " + " | ".join(f"{p:.2f}" for p in ppl) + " |")
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"host": host.host_info(), "rows": int(rows.shape[0]), "seq_len": _SEQ.value,
               "positions": spans, "perplexity": dict(results)}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
