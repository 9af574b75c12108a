"""The prepare as an Apache Beam pipeline (trainer/data/beam.py) against the local path.

The local path (`--runner=local`, one process) is the reference: on the same corpus, Beam's
DirectRunner must write the same files, with byte-identical records, lengths, summaries and
manifest; and, as locally, a rerun into a finished folder must redo nothing.
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from grain.sources import ArrayRecordDataSource

from configs import tiny
from trainer.data import beam, prepare, shards
from trainer.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_TASK = 70  # records per task: several tasks per corpus
_WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "over", "green", "hills",
          "and", "slow", "rivers", "went", "down", "to", "the", "grey", "sea", "under", "a", "pale",
          "moon"]


def _sentence(rng: random.Random) -> str:
  return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 30)))


def _write_corpora(folder) -> dict[str, str]:
  """A text corpus (jsonl) and a chat one, a few hundred records each."""
  rng = random.Random(0)
  text, chat = folder / "text.jsonl", folder / "chat.jsonl"
  with open(text, "w") as f:
    f.writelines(json.dumps({"text": _sentence(rng)}) + "\n" for _ in range(330))
  with open(chat, "w") as f:
    for i in range(250):
      turns = [{"role": "user", "content": f"{i}: {_sentence(rng)}?"},
               {"role": "assistant", "content": _sentence(rng)}]
      if i % 3 == 0:
        turns = [{"role": "system", "content": "Answer briefly."}] + turns
      f.write(json.dumps({"messages": turns}) + "\n")
  return {"text": str(text), "chat": str(chat)}


def _config(fmt: str, path: str):
  c = tiny.get_config()
  c.data.update(source="files", train_files=path, format=fmt, tokenizer_vocab_size=320,
                eval_percent=10.0)
  return c


def _quiet(*_):
  pass


def _files(folder) -> dict[str, bytes]:
  out = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      out[name] = f.read()
  return out


def _mtimes(folder) -> dict[str, int]:
  return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """For each format: the corpus prepared locally and with Beam's DirectRunner, each training
  its own tokenizer."""
  pytest.importorskip("apache_beam")
  root = tmp_path_factory.mktemp("beam")
  out = {}
  for fmt, path in _write_corpora(root).items():
    local, beam = str(root / f"{fmt}-local"), str(root / f"{fmt}-beam")
    cfg = _config(fmt, path)
    prepare.prepare(cfg, local, workers=1, per_task=PER_TASK, log=_quiet)
    prepare.prepare(cfg, beam, per_task=PER_TASK, runner="DirectRunner",
                    beam_args=("--direct_num_workers=1",), log=_quiet)
    out[fmt] = cfg, local, beam
  return out


@pytest.mark.parametrize("fmt", ["text", "chat"])
def test_beam_writes_what_the_local_path_writes(prepared, fmt):
  _, local, beam = prepared[fmt]
  with open(os.path.join(local, shards.MANIFEST)) as f:
    manifest = json.load(f)
  names = [s["name"] for dss in manifest["splits"].values() for ds in dss for s in ds["shards"]]
  # the reference is no trivial one: several tasks, both splits, every record kept
  assert {"train", "eval"} <= set(manifest["splits"]) and len(names) >= 6
  records = 330 if fmt == "text" else 250
  assert sum(manifest["examples"].values()) == records and manifest["bad_records"] == 0
  local_files, beam_files = _files(local), _files(beam)
  assert sorted(beam_files) == sorted(local_files)
  # each trained its own tokenizer from the same text: the same model file
  assert beam_files["tokenizer.model"] == local_files["tokenizer.model"]
  for name in names:
    a = ArrayRecordDataSource([os.path.join(local, name + ".arrayrecord")])
    b = ArrayRecordDataSource([os.path.join(beam, name + ".arrayrecord")])
    assert len(a) == len(b) > 0, name
    assert [b[i] for i in range(len(b))] == [a[i] for i in range(len(a))], name
    np.testing.assert_array_equal(np.load(os.path.join(beam, name + ".lengths.npy")),
                                  np.load(os.path.join(local, name + ".lengths.npy")))
  # the summaries, the manifest and plan.json too: nothing in them depends on the engine
  for name in local_files:
    if name.endswith(".json"):
      assert json.loads(beam_files[name]) == json.loads(local_files[name]), name
  # and in the end every file is the same bytes (ArrayRecord files hold no time stamp)
  assert beam_files == local_files


def test_beam_rerun_redoes_nothing_and_finishes_a_cut_short_one(prepared):
  cfg, local, beam = prepared["text"]
  before = _mtimes(beam)
  summaries = sorted(n for n in before if n.endswith(".task.json"))
  prepare.prepare(cfg, beam, per_task=PER_TASK, runner="DirectRunner", log=_quiet)
  after = _mtimes(beam)
  assert {n: after[n] for n in before if n != shards.MANIFEST} == {
      n: before[n] for n in before if n != shards.MANIFEST}
  # a prepare killed before its last task wrote its summary: only that task is done again
  last = summaries[-1][:-len(".task.json")]
  os.remove(os.path.join(beam, summaries[-1]))
  os.remove(os.path.join(beam, last + ".arrayrecord"))
  said = []
  prepare.prepare(cfg, beam, per_task=PER_TASK, runner="DirectRunner", log=said.append)
  assert any(f"{len(summaries) - 1} of {len(summaries)} tasks already done" in s for s in said)
  again = _mtimes(beam)
  redone = {n for n in again if again[n] != after.get(n)}
  index = last.rsplit("-", 1)[1]  # the task's train and held-out eval shards and its summary
  assert redone == {shards.MANIFEST} | {n for n in again if n.startswith((f"train-d0-{index}.",
                                                                          f"eval-d0-{index}."))}
  assert len(redone) == 6
  assert _files(beam) == _files(local)


def test_without_beam_a_beam_runner_is_one_line(tmp_path, monkeypatch):
  corpus = _write_corpora(tmp_path)["text"]
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam: ImportError
  with pytest.raises(UserError) as e:
    prepare.prepare(_config("text", corpus), str(tmp_path / "out"), per_task=PER_TASK,
                    runner="DirectRunner", log=_quiet)
  assert str(e.value) == "--runner=DirectRunner needs Apache Beam: pip install -e '.[beam]'"


def test_a_bad_record_in_a_beam_task_is_one_line_naming_it(prepared, tmp_path):
  cfg, local, _ = prepared["text"]
  with open(cfg.data.train_files) as f:
    lines = f.readlines()
  lines[199] = '{"text": 5}\n'  # in the third task
  bad = tmp_path / "bad.jsonl"
  bad.write_text("".join(lines))
  cfg = _config("text", str(bad))
  cfg.data.tokenizer = os.path.join(local, "tokenizer.model")  # no training: the tasks meet it
  with pytest.raises(UserError, match=rf"^{bad}:200: field 'text' is a number, not a string; "):
    prepare.prepare(cfg, str(tmp_path / "out"), per_task=PER_TASK, runner="DirectRunner",
                    log=_quiet)
  # from a worker process or a cluster the runner tells it as text: its last line is the error
  told = RuntimeError(f"Traceback (most recent call last):\n  ...\ntrainer.data.sources."
                      f"DataError: {bad}:200: field 'text' is a number [while running 'x']\n")
  assert str(beam._worker_user_error(told)) == (
      f"{bad}:200: field 'text' is a number [while running 'x']")
  assert beam._worker_user_error(RuntimeError("ValueError: a bug, not the data")) is None


def _cli(corpus, out, *args):
  return subprocess.run(
      [sys.executable, "-m", "trainer.data.prepare", "--config=configs/tiny.py",
       "--config.data.source=files", f"--config.data.train_files={corpus}",
       "--config.data.tokenizer_vocab_size=320", "--config.data.eval_percent=10",
       f"--out={out}", f"--records_per_task={PER_TASK}", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_cli_passes_the_options_after_dashes_to_beam(prepared, tmp_path):
  """The Beam options after -- reach the pipeline: a bad one is refused in one line, and two
  worker processes (which import trainer.data.prepare afresh, as remote workers do) write the
  local path's files."""
  cfg, local, _ = prepared["text"]
  corpus = cfg.data.train_files
  bad = _cli(corpus, tmp_path / "bad", f"--config.data.tokenizer={local}/tokenizer.model",
             "--runner=DirectRunner", "--", "--direct_running_mode=sideways")
  assert bad.returncode == 2, bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: Beam options after --: argument --direct_running_mode: invalid choice: 'sideways' "
      "(choose from 'in_memory', 'multi_threading', 'multi_processing')")
  assert "Traceback" not in bad.stderr
  run = _cli(corpus, tmp_path / "out", "--runner=DirectRunner", "--",
             "--direct_num_workers=2", "--direct_running_mode=multi_processing")
  assert run.returncode == 0, run.stderr
  tasks = len([n for n in os.listdir(local) if n.endswith(".task.json")])
  assert f"running {tasks} tasks on DirectRunner" in run.stdout, run.stdout + run.stderr
  assert _files(tmp_path / "out") == _files(local), run.stdout + run.stderr[-3000:]
