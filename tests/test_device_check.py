"""benchmarks/device_check.py on CPU (tiny shapes, Pallas interpreted): the JSON it writes.

The figures of a CPU run say nothing about a GPU; what is checked is that every section and case
is there, that what ran gave finite positive figures counted by the stated formulas (recomputed
here independently), that cudnn is marked unavailable, and that the budget skips cases.
"""

import json
import math

import numpy as np
import pytest

from benchmarks import device_check

SECTIONS = ("attention", "flashmask", "train_step")


def _run(tmp_path, *flags):
  out = tmp_path / "device_check.json"
  result = device_check.main(["--out", str(out), *flags])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # the file is the result
  return result


def _causal_pairs(n: int) -> int:
  return int(np.tril(np.ones((n, n), bool)).sum())


def _document_pairs(segment_lengths) -> int:
  """Visible pairs of a causal document mask, counted on the dense (n x n) mask of each row."""
  total = 0
  for lengths in segment_lengths:
    seg = np.repeat(np.arange(len(lengths)), lengths)
    i, j = np.arange(len(seg))[:, None], np.arange(len(seg))[None, :]
    total += int(((seg[:, None] == seg[None, :]) & (j <= i)).sum())
  return total


def _check_common(result):
  assert result["tiny"] is True and result["device"]["backend"] == "cpu"
  assert result["host"]["cpu_model"] and "isa" in result["host"]
  assert result["device"]["jax"] and result["peak_flops_per_device"] > 0
  shape = device_check.TINY
  assert [(r["tokens"], r["impl"]) for r in result["attention"]] == [
      (n, impl) for n in shape["lengths"] for impl in ("pallas", "cudnn", "xla")]
  for section in SECTIONS:
    assert [r["impl"] for r in result[section]] == ["pallas", "cudnn", "xla"] * (
        len(shape["lengths"]) if section == "attention" else 1)
    for r in result[section]:
      if r["impl"] == "cudnn":  # the project's own check: cudnn needs an NVIDIA GPU
        assert r["status"] == "unavailable" and "cudnn" in r["reason"], r


def _check_attention_row(r):
  """Figures finite and positive, and the FLOPs those of the visible pairs, causal halved."""
  assert r["status"] == "ok", r
  for key in ("compile_s", "fwd_bwd_s", "fwd_bwd_tflops"):
    assert math.isfinite(r[key]) and r[key] > 0, (key, r)
  pairs = r["batch"] * _causal_pairs(r["tokens"]) if r["mask"] == "causal" else None
  if pairs is not None:
    assert r["visible_pairs"] == pairs
  # QK^T and PV: 2 * head_dim FLOPs each per pair and head forward; backward 2.5x forward
  flops = (1 + 2.5) * 2 * (2 * r["visible_pairs"] * r["heads"] * r["head_dim"])
  assert r["fwd_bwd_flops"] == pytest.approx(flops, rel=1e-12)
  assert r["fwd_bwd_tflops"] == pytest.approx(flops / r["fwd_bwd_s"] / 1e12, rel=1e-9)


def test_budget_zero_runs_the_first_case_only(tmp_path):
  result = _run(tmp_path, "--budget_s", "0")
  _check_common(result)
  rows = [r for s in SECTIONS for r in result[s]]
  first = rows[0]
  assert (first["impl"], first["tokens"], first["batch"]) == ("pallas", 256, 2)
  _check_attention_row(first)
  for r in rows[1:]:
    if r["impl"] != "cudnn":
      assert r["status"] == "skipped" and r["reason"].startswith("budget:"), r
  assert "flashmask_rows" not in result  # its corpus is not even tokenized


def test_bad_flags_are_one_line_and_exit_2(capsys):
  for flags in (["--sections", "attention,nope"], ["--budget_s", "-1"]):
    with pytest.raises(SystemExit) as e:
      device_check.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flags[0] in err, err


@pytest.mark.slow  # the whole tiny run: 1-2 min on 2 cores (two train steps to compile)
def test_tiny_run_every_section(tmp_path):
  result = _run(tmp_path)
  _check_common(result)
  for r in result["attention"]:
    if r["impl"] != "cudnn":
      _check_attention_row(r)
  rows = result["flashmask_rows"]
  assert sum(map(sum, rows["segment_lengths"])) == rows["batch"] * rows["tokens"]
  assert max(map(len, rows["segment_lengths"])) > 1  # packed: several documents to a row
  shares = (rows["tiles_skipped"], rows["tiles_full"], rows["tiles_partial"])
  assert sum(shares) == pytest.approx(1.0)
  blocks = rows["tokens"] // rows["block"]
  # a document mask hides at least what causal hides: the tiles above the diagonal
  assert rows["tiles_skipped"] >= blocks * (blocks - 1) / 2 / blocks**2
  for r in result["flashmask"]:
    if r["impl"] != "cudnn":
      _check_attention_row(r)
      assert r["visible_pairs"] == _document_pairs(rows["segment_lengths"])
  m = device_check.TINY["model"]
  for r in result["train_step"]:
    if r["impl"] == "cudnn":
      continue
    assert r["status"] == "ok", r
    for key in ("compile_s", "step_s", "tokens_per_sec", "mfu"):
      assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    # 6 FLOPs per parameter outside the input embedding, attention 6 * layers * T * heads * hd
    head_dim = m["d_model"] // m["n_heads"]
    matmul_params = r["params"] - m["vocab_size"] * m["d_model"]
    flops = 6 * matmul_params + 6 * m["n_layers"] * r["seq_len"] * m["n_heads"] * head_dim
    assert r["flops_per_token"] == flops
    assert r["tokens_per_sec"] == pytest.approx(r["batch"] * r["seq_len"] / r["step_s"])
    assert r["mfu"] == pytest.approx(
        r["tokens_per_sec"] * flops / result["peak_flops_per_device"])
    assert abs(r["loss"] - math.log(m["vocab_size"])) < 1.0  # a fresh model: near uniform
