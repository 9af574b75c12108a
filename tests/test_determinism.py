"""Same command, same numbers: the data stream does not depend on thread timing, and fresh runs
of a recipe give bitwise-equal metrics."""

import json
import os
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from trainer.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SlowPlanning(pipeline.PackedRows):
  """Planning an epoch takes a while, as it does for thousands of examples: wide open to two
  reader threads planning the same epoch at once."""

  def _epoch(self, e):
    time.sleep(0.05)
    return super()._epoch(e)


def rows(cls):
  lengths = [3 + (7 * i) % 13 for i in range(60)]
  examples = ([np.arange(n, dtype=np.int32) + i for i, n in enumerate(lengths)],
              [np.ones(n, np.float32) for n in lengths])
  return cls([examples], [1.0], seq_len=16, mode="greedy", truncation="split", seed=3,
             shuffle=True, group=32, stats={})


def test_rows_read_by_many_threads_equal_rows_read_in_order():
  expected = rows(pipeline.PackedRows)
  n = expected.epoch(0).__len__()
  batches = pipeline.batches(rows(SlowPlanning), 4)  # a fresh one: epochs planned lazily
  it = iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=8, prefetch_buffer_size=64)))
  got = [next(it)["inputs"] for _ in range(6 * n // 4)]  # six epochs
  for b, batch in enumerate(got):
    for j, row in enumerate(batch):
      np.testing.assert_array_equal(row, expected(4 * b + j)["inputs"], err_msg=f"row {4 * b + j}")


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_three_fresh_sft_chat_runs_are_bitwise_equal(tmp_path):
  """configs/sft_chat.py past its fourth epoch (an epoch is ~55 steps), three times."""
  runs = []
  for k in range(3):
    workdir = str(tmp_path / f"run{k}")
    subprocess.run([sys.executable, "-m", "trainer.main", "--config=configs/sft_chat.py",
                    f"--workdir={workdir}", "--config.train.steps=240",
                    "--config.train.eval_every=120", "--config.train.eval_exact_match=40"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    runs.append([{k: v for k, v in m.items() if k not in ("tokens_per_sec", "mfu")}
                 for m in metrics(workdir)])
  assert runs[0] == runs[1] == runs[2]
  assert len([m for m in runs[0] if "loss" in m]) == 240 // 20
