"""Prepared shards (trainer/data/prepare.py, shards.py): the same batches as the in-memory
pipeline, each process its own rows, resumable prepares, and one-line errors on bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import tiny
from trainer import train
from trainer.data import packing, pipeline, prepare, shards
from trainer.data.sources import DataError
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a of to and in is it that for on with as was at by an be this from or have not are "
         "but one two three four five six seven eight nine ten").split()


def words(rng, lo, hi):
  return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_corpus(path, fmt, n=240, seed=0):
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      if fmt == "text":
        record = {"body": words(rng, 1, 90)}
      elif fmt == "chat":
        record = {"messages": [{"role": "user", "content": words(rng, 1, 12)},
                               {"role": "assistant", "content": words(rng, 1, 30)}]}
      else:
        record = {"prompt": words(rng, 1, 12), "chosen": words(rng, 1, 10),
                  "rejected": words(rng, 1, 10)}
      f.write(json.dumps(record) + "\n")
  return str(path)


def files_config(train_files, fmt="text", mode="concat", **data):
  c = tiny.get_config("smoke")
  c.data.update(source="files", train_files=train_files, format=fmt, packing=mode,
                text_field="body", tokenizer_vocab_size=300, **data)
  c.train.update(seq_len=64, batch_size=4)
  return c


def prepared_config(cfg, folders, eval_folders=""):
  c = cfg.copy_and_resolve_references()
  c.data.update(source="prepared", train_files=folders, eval_files=eval_folders)
  return c


def build(cfg, workdir):
  os.makedirs(workdir, exist_ok=True)
  return pipeline.build(cfg, str(workdir), True)


def assert_same_batches(a, b, batch_size, n, **kw):
  """The first n batches (with repeat=False: all of them) are equal, field by field."""
  x, y = pipeline.batches(a, batch_size, **kw), pipeline.batches(b, batch_size, **kw)
  if kw.get("repeat") is False:
    assert len(x) == len(y)
    n = len(x)
  for i in range(n):
    bx, by = x[i], y[i]
    assert sorted(bx) == sorted(by)
    for k in bx:
      np.testing.assert_array_equal(bx[k], by[k], err_msg=f"batch {i} field {k}")


@pytest.mark.parametrize("fmt", ["text", "chat", "preference"])
def test_prepared_batches_equal_the_in_memory_batches(tmp_path, fmt):
  """One prepare serves every packing mode: shards hold examples, rows are packed when drawn."""
  corpus = write_corpus(tmp_path / "data.jsonl", fmt)
  manifest = prepare.prepare(files_config(corpus, fmt), str(tmp_path / "out"), per_task=50,
                             log=lambda _: None)
  assert len(list((tmp_path / "out").glob("train-*.arrayrecord"))) == 5
  for mode in packing.MODES:
    cfg = files_config(corpus, fmt, mode, pack_group=16)
    memory = build(cfg, tmp_path / "w1")  # the tokenizer trained once in w1, as prepare's
    streamed = build(prepared_config(cfg, str(tmp_path / "out")), tmp_path / "w2")
    # the same tokenizer, trained on the same text
    assert shards.tokenizer_fingerprint(memory.tokenizer) == manifest["tokenizer_fingerprint"]
    assert len(memory.train.examples) == manifest["examples"]["train"]
    assert len(memory.eval.examples) == manifest["examples"]["eval"] > 0
    assert_same_batches(memory.train, streamed.train, 4, 3 * len(memory.train.epoch(0)) // 4)
    assert_same_batches(memory.eval, streamed.eval, 4, 0, repeat=False)
    for key in ("padding_ratio", "train_examples", "eval_examples"):
      assert memory.stats[key] == streamed.stats[key], (mode, key)


def test_mixtures_by_weight_and_processes_reading_disjoint_rows(tmp_path):
  a = write_corpus(tmp_path / "a.jsonl", "text", 120, seed=1)
  b = write_corpus(tmp_path / "b.jsonl", "text", 80, seed=2)
  cfg = files_config(f"{a},{b}", train_weights="3,1", eval_percent=10.0)
  memory = build(cfg, tmp_path / "w1")
  prepare.prepare(cfg, str(tmp_path / "ab"), per_task=30, log=lambda _: None)
  streamed = build(prepared_config(cfg, str(tmp_path / "ab")), tmp_path / "w2")
  assert_same_batches(memory.train, streamed.train, 4, 40)
  whole = pipeline.batches(streamed.train, 4)
  parts = [pipeline.batches(streamed.train, 4, shard=(p, 2)) for p in range(2)]
  for step in range(10):  # process p holds rows p, p + 2, ...: disjoint, together the batch
    for field in whole[step]:
      np.testing.assert_array_equal(parts[0][step][field], whole[step][field][0::2])
      np.testing.assert_array_equal(parts[1][step][field], whole[step][field][1::2])
  # two folders as a mixture: the same as the two files
  for k, path in enumerate((a, b)):
    prepare.prepare(files_config(path, eval_percent=10.0, tokenizer=str(tmp_path / "w1" /
                                 "tokenizer.model")), str(tmp_path / f"d{k}"), per_task=30,
                    log=lambda _: None)
  two = build(prepared_config(cfg, f"{tmp_path}/d0,{tmp_path}/d1"), tmp_path / "w3")
  assert_same_batches(memory.train, two.train, 4, 40)


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_stop_and_resume_from_prepared_shards_is_bit_identical(tmp_path):
  corpus = write_corpus(tmp_path / "data.jsonl", "text", 300)
  cfg = files_config(corpus)
  prepare.prepare(cfg, str(tmp_path / "out"), per_task=100, log=lambda _: None)
  run = prepared_config(cfg, str(tmp_path / "out"))
  run.train.update(steps=6, batch_size=8, log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0)
  train.run(run, str(tmp_path / "straight"))
  run.train.stop_after_steps = 3
  train.run(run, str(tmp_path / "resumed"))
  train.run(run, str(tmp_path / "resumed"))
  def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
  assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
  assert sorted(losses(tmp_path / "straight")) == list(range(1, 7))
  # the reader's place in the stream, saved with the checkpoint: a few integers, not the data
  saved = [p for p in (tmp_path / "resumed" / "checkpoints" / "3" / "data").rglob("*")
           if p.is_file() and not p.name.startswith("_")]
  state = json.loads(saved[0].read_text())
  leaves = list(state.values()) if isinstance(state, dict) else []
  assert 0 < len(leaves) <= 4 and all(isinstance(v, int) for v in leaves), state


def _prepare_cli(args, **kw):
  return subprocess.Popen([sys.executable, "-m", "trainer.data.prepare", *args], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_a_killed_prepare_goes_on_where_it_stopped(tmp_path):
  corpus = write_corpus(tmp_path / "data.jsonl", "text", 600)
  args = ["--config=configs/tiny.py:smoke", "--config.data.source=files",
          f"--config.data.train_files={corpus}", "--config.data.text_field=body",
          "--config.data.tokenizer_vocab_size=300", "--records_per_task=20"]
  whole = _prepare_cli(args + [f"--out={tmp_path / 'whole'}"])
  assert whole.wait(timeout=300) == 0, whole.stderr.read()
  out = tmp_path / "killed"
  proc = _prepare_cli(args + [f"--out={out}"])
  deadline = time.time() + 120
  while time.time() < deadline and len([n for n in os.listdir(out) if n.endswith(".task.json")]
                                        if out.exists() else []) < 5:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = sorted(n for n in os.listdir(out) if n.endswith(".task.json"))
  assert 5 <= len(done) < 30 and not (out / shards.MANIFEST).exists()
  mtimes = {n: os.path.getmtime(out / n) for n in done}
  again = _prepare_cli(args + [f"--out={out}"])
  assert again.wait(timeout=300) == 0, again.stderr.read()
  assert f"{len(done)} of 30 tasks already done" in again.stdout.read()
  assert all(os.path.getmtime(out / n) == t for n, t in mtimes.items())  # not redone
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  for name in sorted(os.listdir(tmp_path / "whole")):
    if name.endswith((".arrayrecord", ".npy", "manifest.json", ".model")):
      assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_bad_records_during_prepare(tmp_path):
  corpus = tmp_path / "bad.jsonl"
  corpus.write_text('{"body": "one two"}\n{not json\n{"body": "three four"}\n' +
                    "".join(json.dumps({"body": f"w{i} x y"}) + "\n" for i in range(60)))
  cfg = files_config(str(corpus))
  with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
    prepare.prepare(cfg, str(tmp_path / "out"), per_task=10, log=lambda _: None)
  cfg.data.skip_bad_records = True
  manifest = prepare.prepare(cfg, str(tmp_path / "out2"), per_task=10, log=lambda _: None)
  assert manifest["bad_records"] == 1 and "bad.jsonl:2" in manifest["first_bad_record"]
  assert sum(manifest["examples"].values()) == 62
  cfg.data.skip_bad_records = False  # the same folder, other settings: refused, nothing touched
  with pytest.raises(UserError, match=r"holds a prepare of other settings \(data.skip_bad_records "
                     r"differ"):
    prepare.prepare(cfg, str(tmp_path / "out2"), per_task=10, log=lambda _: None)


def test_bad_prepared_folders_are_one_line(tmp_path):
  corpus = write_corpus(tmp_path / "data.jsonl", "chat", 120)
  cfg = files_config(corpus, "chat")
  out = tmp_path / "out"
  prepare.prepare(cfg, str(out), per_task=40, log=lambda _: None)
  run = prepared_config(cfg, str(out))
  load = lambda c: build(c, tmp_path / "w")
  with pytest.raises(DataError, match=r"data.train_files: .*nowhere is not a folder"):
    load(prepared_config(cfg, str(tmp_path / "nowhere")))
  with pytest.raises(DataError, match=r"no manifest.json"):
    load(prepared_config(cfg, str(tmp_path)))
  # another template: both fingerprints named
  other = run.copy_and_resolve_references()
  other.data.template = "llama3"
  with pytest.raises(DataError, match=r"template chatml-\w+, but this run's \(data.template="
                     r"llama3\) is llama3-\w+"):
    load(other)
  # another tokenizer
  tok = tmp_path / "other.model"
  pipeline.train_tokenizer([words(random.Random(5), 200, 400) for _ in range(50)], 300,
                           None, "x").save(str(tok))  # noqa
  other = run.copy_and_resolve_references()
  other.data.tokenizer = str(tok)
  with pytest.raises(DataError, match=r"written for tokenizer tok-\w+, but this run's .* is tok-"):
    load(other)
  # a truncated shard
  shard = sorted(out.glob("train-*.arrayrecord"))[1]
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match=r"train-d0-00001.arrayrecord: \d+ bytes, manifest.json "
                     r"says \d+ \(truncated"):
    load(run)
  shard.write_bytes(data)
  # a manifest that disagrees with its shards
  manifest = json.loads((out / "manifest.json").read_text())
  manifest["splits"]["train"][0]["shards"][0]["examples"] += 1
  (out / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(DataError, match=r"lengths.npy: holds \d+ lengths, manifest.json says"):
    load(run)
  # through the command line: one line, exit code 2
  proc = subprocess.run([sys.executable, "-m", "trainer.main", "--config=configs/tiny.py:smoke",
                         f"--workdir={tmp_path / 'cli'}", "--config.data.source=prepared",
                         f"--config.data.train_files={tmp_path / 'nowhere'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert "nowhere is not a folder" in proc.stderr


def test_the_default_corpus_prepares_and_trains_the_same(tmp_path):
  cfg = tiny.get_config("smoke")
  memory = build(cfg, tmp_path / "w1")
  prepare.prepare(cfg, str(tmp_path / "std"), per_task=40, log=lambda _: None)
  streamed = build(prepared_config(cfg, str(tmp_path / "std")), tmp_path / "w2")
  assert (tmp_path / "w1" / "tokenizer.model").read_bytes() == \
      (tmp_path / "w2" / "tokenizer.model").read_bytes()
  assert_same_batches(memory.train, streamed.train, 8, 6)
  assert_same_batches(memory.eval, streamed.eval, 8, 0, repeat=False)


@pytest.mark.slow
def test_two_processes_train_from_prepared_shards_as_one_from_the_files(tmp_path):
  """Two processes (4 devices each) read disjoint rows of the shards: their run's losses are
  the one-process in-memory run's."""
  cfg = tiny.get_config("smoke")
  prepare.prepare(cfg, str(tmp_path / "std"), per_task=40, log=lambda _: None)
  common = ["--config=configs/tiny.py:smoke", "--config.train.steps=4", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.sample_tokens=0"]
  launch = [sys.executable, os.path.join(REPO, "launch", "local.py"), "--num_processes=2",
            "--devices_per_process=4", "--"]
  proc = subprocess.run(launch + common + [f"--workdir={tmp_path / 'two'}",
                                           "--config.data.source=prepared",
                                           f"--config.data.train_files={tmp_path / 'std'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one = cfg.copy_and_resolve_references()
  one.train.update(steps=4, log_every=1, eval_every=0, sample_tokens=0)
  train.run(one, str(tmp_path / "one"))
  def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
  two, ref = losses(tmp_path / "two"), losses(tmp_path / "one")
  assert sorted(two) == [1, 2, 3, 4]
  for step in two:
    assert two[step] == pytest.approx(ref[step], rel=1e-5), step
