"""Prepare a recipe's data once: read its sources, tokenize, write ArrayRecord shards.

  python -m trainer.data.prepare --config=configs/RECIPE.py --out=DIR [--workers=N]
      [--config.data.KEY=VALUE ...] [--records_per_task=N] [--runner=local|DirectRunner|...]

then train from them with `--config.data.source=prepared --config.data.train_files=DIR`.

The sources are the ones the recipe names (`data.source=stdlib` or `files`: jsonl, text files
and folders, parquet, ArrayRecord, a `datasets` folder), read and checked exactly as training
reads them, and tokenized as training would (`pipeline.tokenize`): the same examples in the same
order, so a run from DIR trains on the same batches as a run from the files.

The work is cut into tasks of about `--records_per_task` consecutive records of one dataset
(`plan`), found by one pass over the files that parses no record. Each task writes its own shards
(`shards.write_shard`), its training examples and, when the recipe holds out
`data.eval_percent`, its held-out ones, then a summary; the manifest is written when every task
is done. Tasks are independent, so they run on N local processes or as an Apache Beam pipeline
(`trainer/data/beam.py`), and a killed prepare, run again, does only the tasks without a summary.
The tokenizer is the recipe's (`data.tokenizer`, or the Hugging Face model's) or, as training
does, one trained here, on the first `data.max_chars` characters of training text.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import time
from typing import Any, Iterator

import numpy as np
from absl import app, flags

from trainer import cli
from trainer.data import beam, pipeline, shards, sources, stdlib_corpus, templates
from trainer.data import tokenizer as tokenizer_lib
from trainer.data.sources import DataError, Span
from trainer.errors import UserError

_OUT = flags.DEFINE_string("out", None, "The folder to write the shards and manifest to.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Local worker processes.")
_RECORDS = flags.DEFINE_integer("records_per_task", 20_000, "Records per task (and shard).")
_RUNNER = flags.DEFINE_string(
    "runner", "local", "local (--workers processes) or an Apache Beam runner: DirectRunner, "
    "DataflowRunner, FlinkRunner, SparkRunner (pip install -e '.[beam]'); further Beam "
    "options after --, e.g. -- --project=P --region=R --temp_location=gs://...")

PLAN = "plan.json"  # what a rerun must agree with to go on where the last one stopped
# the data keys that decide the examples: a rerun into the same folder must not change them
_PLAN_KEYS = ("source", "max_chars", "train_files", "eval_files", "eval_percent", "format",
              "text_field", "messages_field", "prompt_field", "chosen_field", "rejected_field",
              "template", "skip_bad_records", "text_split", "tokenizer", "tokenizer_vocab_size")


@dataclasses.dataclass(frozen=True)
class Task:
  """Records `first` .. of one dataset of the recipe (`origin` "train": data.train_files, whose
  held-out share goes to eval when `holdout` > 0; "eval": data.eval_files), read from `spans`
  (files), or from the standard library corpus's `stdlib` (split, start, count)."""
  origin: str
  dataset: int
  index: int
  first: int
  holdout: float
  spans: tuple[Span, ...] = ()
  stdlib: tuple[str, int, int] | None = None

  @property
  def name(self) -> str:
    return f"{self.origin}-d{self.dataset}-{self.index:05d}"

  def records(self) -> int:
    return self.stdlib[2] if self.stdlib else sum(s.count for s in self.spans)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a task needs besides itself (picklable: it travels to worker processes)."""
  out: str
  format: str
  fields: dict
  skip_bad: bool
  text_split: str
  template: str  # "" for text
  max_chars: int
  eval_percent: float


def settings(cfg, out: str) -> Settings:
  d = cfg.data
  return Settings(out, d.format, pipeline.fields(d), d.skip_bad_records, d.text_split,
                  d.template if d.format in ("chat", "preference") else "", d.max_chars,
                  d.eval_percent)


# ----------------------------------------------------------------------------------------------
# The plan: tasks
# ----------------------------------------------------------------------------------------------


def plan(cfg, per_task: int) -> list[Task]:
  d = cfg.data
  if per_task < 1:
    raise UserError(f"--records_per_task={per_task} must be at least 1")
  if d.source == "stdlib":
    train, evals = stdlib_corpus.load_documents(d.max_chars, d.eval_percent)
    return [Task(origin, 0, k, start, 0.0, stdlib=(origin, start, min(per_task, n - start)))
            for origin, n in (("train", len(train)), ("eval", len(evals)))
            for k, start in enumerate(range(0, n, per_task))]
  if d.source != "files":
    raise UserError(f"config key data.source: prepare reads stdlib or files, not {d.source!r}")
  if not d.train_files:
    raise UserError("config key data.train_files: empty; name the files to prepare")
  tasks = []
  lists = [("train", d.train_files, 0.0 if d.eval_files else d.eval_percent)]
  if d.eval_files:
    lists.append(("eval", d.eval_files, 0.0))
  for origin, spec, holdout in lists:
    for k, files in enumerate(sources.expand(spec)):
      group: list[Span] = []
      first = count = index = 0
      for path in files:
        for span in sources.spans(path, d.format, d.text_split, per_task):
          if group and count + span.count > per_task:
            tasks.append(Task(origin, k, index, first, holdout, tuple(group)))
            first, count, index, group = first + count, 0, index + 1, []
          group.append(span)
          count += span.count
      if group:
        tasks.append(Task(origin, k, index, first, holdout, tuple(group)))
      elif not tasks or tasks[-1].dataset != k or tasks[-1].origin != origin:
        raise DataError(f"no records in {', '.join(files)}")
  return tasks


# ----------------------------------------------------------------------------------------------
# One task
# ----------------------------------------------------------------------------------------------


_WORKER: dict[str, Any] = {}  # per process: the settings, tokenizer and template, loaded once


def _setup(s: Settings) -> None:
  if _WORKER.get("settings") != s:
    _WORKER.update(settings=s, tokenizer=tokenizer_lib.load(_tokenizer_file(s.out)),
                   template=templates.get(s.template) if s.template else None)


def _records(task: Task, s: Settings, stats: dict) -> Iterator[tuple[int, dict]]:
  if task.stdlib:
    split, start, count = task.stdlib
    train, evals = stdlib_corpus.load_documents(s.max_chars, s.eval_percent)
    docs = (train if split == "train" else evals)[start:start + count]
    return ((k, {"text": t}) for k, t in enumerate(docs))
  return sources.read_spans(task.spans, s.format, s.fields, s.skip_bad, stats, s.text_split)


def summary_path(out: str, task: Task) -> str:
  return os.path.join(out, task.name + ".task.json")


def run_task(task: Task, s: Settings) -> dict[str, Any]:
  """Tokenize the task's records and write its shards, then its summary (the mark that it is
  done). Returns the summary; a task already done is read back, not redone."""
  done = summary_path(s.out, task)
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  _setup(s)
  stats: dict[str, Any] = {}
  kept: dict[str, list[dict]] = {"train": [], "eval": []}
  for k, record in _records(task, s, stats):
    held = task.holdout and pipeline.held_out(task.first + k, task.holdout)
    kept["eval" if held or task.origin == "eval" else "train"].append(record)
  out = {"task": task.name, "origin": task.origin, "dataset": task.dataset,
         "records": sum(map(len, kept.values())), "bad_records": stats.get("bad_records", 0),
         "first_bad_record": stats.get("first_bad_record", ""), "shards": {}}
  # an eval task writes an eval shard; a train task a train shard, and an eval one when it holds
  # a share out
  for split in (["eval"] if task.origin == "eval" else ["train", "eval"] if task.holdout else
                ["train"]):
    records = kept[split]
    ids, masks = pipeline.tokenize(records, s.format, _WORKER["tokenizer"], _WORKER["template"])
    examples = ids if s.format == "preference" else list(zip(ids, masks))
    name = shards.shard_name(split, task.dataset, task.index)
    out["shards"][split] = shards.write_shard(s.out, name, examples)
  shards.write_json(done, out)
  return out


# ----------------------------------------------------------------------------------------------
# The whole prepare
# ----------------------------------------------------------------------------------------------


def _tokenizer_file(out: str) -> str:
  for name in ("tokenizer.json", "tokenizer.model"):
    if os.path.exists(os.path.join(out, name)):
      return os.path.join(out, name)
  raise DataError(f"{out}: holds no tokenizer (tokenizer.model or tokenizer.json)")


def _training_texts(cfg, tasks: list[Task], s: Settings, template) -> Iterator[str]:
  """Training text for a tokenizer, as training's in-memory path gathers it, up to
  `data.max_chars` characters."""
  n = 0
  for task in tasks:
    if task.origin != "train":
      continue
    records = [r for k, r in _records(task, s, {})
               if not (task.holdout and pipeline.held_out(task.first + k, task.holdout))]
    for text in pipeline.training_text(records, template):
      yield text
      n += len(text)
      if n >= cfg.data.max_chars and cfg.data.source == "files":
        return


def ensure_tokenizer(cfg, out: str, tasks: list[Task], s: Settings, log) -> Any:
  """The recipe's tokenizer, or one trained here (once: a rerun reuses it), saved in `out`."""
  d = cfg.data
  template = templates.get(s.template) if s.template else None
  tokenizer = pipeline.given_tokenizer(cfg)
  if tokenizer is not None:
    tokenizer.save(os.path.join(out, tokenizer_lib.file_name(tokenizer)))
  else:
    saved = os.path.join(out, "tokenizer.model")
    if not os.path.exists(saved):
      log(f"training a tokenizer of {d.tokenizer_vocab_size} pieces")
      pipeline.train_tokenizer(_training_texts(cfg, tasks, s, template), d.tokenizer_vocab_size,
                               template, "the training text").save(saved)
    tokenizer = tokenizer_lib.Tokenizer.load(saved)
  if template is not None:
    try:
      template.stop_id(tokenizer)
    except ValueError as e:
      raise DataError(f"config key data.template: {e}") from None
  return tokenizer


def _check_plan(cfg, out: str, per_task: int) -> None:
  """Write what decides the shards; a rerun into the same folder must agree with it."""
  want = {"data": {k: cfg.data[k] for k in _PLAN_KEYS}, "records_per_task": per_task,
          "init_from": cfg.model.get("init_from", "")}  # a Hugging Face model's tokenizer
  path = os.path.join(out, PLAN)
  if os.path.exists(path):
    with open(path) as f:
      have = json.load(f)
    if have != want:
      diff = sorted({f"data.{k}" for k in want["data"]
                     if have.get("data", {}).get(k) != want["data"][k]} |
                    {f"--{k}" if k == "records_per_task" else f"model.{k}"
                     for k in ("records_per_task", "init_from") if have.get(k) != want[k]})
      raise UserError(f"--out={out}: holds a prepare of other settings ({', '.join(diff)} "
                      "differ); give another --out, or delete the folder to start over")
    return
  shards.write_json(path, want)


def write_manifest(cfg, out: str, tokenizer, summaries: list[dict], s: Settings) -> dict:
  """The manifest from the tasks' summaries (in task order), written last."""
  template = templates.get(s.template) if s.template else None
  splits: dict[str, list[dict]] = {}
  for summary in summaries:
    for split, shard in summary["shards"].items():
      datasets = splits.setdefault(split, [])
      name = f"{summary['origin']}-d{summary['dataset']}"
      if not datasets or datasets[-1]["name"] != name:
        datasets.append({"name": name, "examples": 0, "tokens": 0, "shards": []})
      datasets[-1]["shards"].append(shard)
      datasets[-1]["examples"] += shard["examples"]
      datasets[-1]["tokens"] += shard["tokens"]
  hist = {split: np.sum([sh["histogram"] for ds in dss for sh in ds["shards"]], axis=0).tolist()
          for split, dss in splits.items()}
  bad = [x for x in summaries if x["bad_records"]]
  manifest = {
      "version": shards.VERSION, "format": s.format,
      "template": s.template, "template_fingerprint": shards.template_fingerprint(template),
      "tokenizer": tokenizer_lib.file_name(tokenizer),
      "tokenizer_fingerprint": shards.tokenizer_fingerprint(tokenizer),
      "source": cfg.data.source if cfg.data.source == "stdlib" else cfg.data.train_files,
      "eval": (f"data.eval_files={cfg.data.eval_files}" if cfg.data.eval_files else
               f"data.eval_percent={cfg.data.eval_percent} held out"),
      "examples": {k: sum(ds["examples"] for ds in v) for k, v in splits.items()},
      "tokens": {k: sum(ds["tokens"] for ds in v) for k, v in splits.items()},
      "length_histogram": {"edges": shards.HISTOGRAM_EDGES, **hist},
      "bad_records": sum(x["bad_records"] for x in summaries),
      "first_bad_record": bad[0]["first_bad_record"] if bad else "",
      "splits": splits,
  }
  path = os.path.join(out, shards.MANIFEST)
  shards.write_json(path, manifest)
  return manifest


def _run_local(tasks: list[Task], s: Settings, workers: int, log) -> list[dict]:
  """Every task on `workers` processes (1: this one), with progress on stderr."""
  pending = [t for t in tasks if not os.path.exists(summary_path(s.out, t))]
  if len(pending) < len(tasks):
    log(f"{len(tasks) - len(pending)} of {len(tasks)} tasks already done; doing the rest")
  progress = _Progress(len(tasks), len(tasks) - len(pending))
  if workers <= 1 or len(pending) <= 1:
    for t in pending:
      progress.update(run_task(t, s))
  else:
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    with context.Pool(min(workers, len(pending)), initializer=_die_with_parent) as pool:
      for summary in pool.imap_unordered(_run_task_star, [(t, s) for t in pending]):
        progress.update(summary)
  progress.close()
  return [run_task(t, s) for t in tasks]  # every summary, read back in task order


def _die_with_parent() -> None:
  """A worker ends with the prepare that started it (Linux's PR_SET_PDEATHSIG): a killed prepare
  leaves no worker behind finishing a task nobody waits for."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
  except (OSError, AttributeError):  # not Linux: the worker stops at its next result instead
    pass


def _run_task_star(args) -> dict:
  return run_task(*args)


class _Progress:
  def __init__(self, total: int, done: int):
    self.total, self.done, self.tokens, self.t0 = total, done, 0, time.perf_counter()
    self.last = 0.0

  def update(self, summary: dict) -> None:
    self.done += 1
    self.tokens += sum(s["tokens"] for s in summary["shards"].values())
    now = time.perf_counter()
    if now - self.last > 2 or self.done == self.total:
      rate = self.tokens / max(now - self.t0, 1e-9)
      print(f"\rprepare: {self.done}/{self.total} tasks, {self.tokens:,} tokens "
            f"({rate:,.0f} tokens/s)", end="", file=sys.stderr, flush=True)
      self.last = now

  def close(self) -> None:
    if self.total:
      print(file=sys.stderr, flush=True)


def prepare(cfg, out: str, workers: int = 1, per_task: int = 20_000, runner: str = "local",
            beam_args: tuple[str, ...] = (), log=print) -> dict:
  """Write the recipe's data as shards in `out`; returns the manifest. Rerun, it goes on
  where it stopped: the half-written files a killed prepare left (their `.tmp` names) are
  removed, and no task with a summary is done again. One prepare writes into a folder at a
  time."""
  if not out:
    raise UserError("--out: required (the folder to write the shards to)")
  os.makedirs(out, exist_ok=True)
  for name in os.listdir(out):
    if name.endswith(".tmp"):
      os.remove(os.path.join(out, name))
  _check_plan(cfg, out, per_task)
  s = settings(cfg, out)
  t0 = time.perf_counter()
  tasks = plan(cfg, per_task)
  log(f"{len(tasks)} tasks over {sum(t.records() for t in tasks):,} records "
      f"({time.perf_counter() - t0:.1f}s to plan)")
  tokenizer = ensure_tokenizer(cfg, out, tasks, s, log)
  if runner == "local":
    summaries = _run_local(tasks, s, workers, log)
  else:
    summaries = beam.run(tasks, s, runner, beam_args, log)  # imports Apache Beam only now
  manifest = write_manifest(cfg, out, tokenizer, summaries, s)
  log(f"done: {out}: " + ", ".join(
      f"{split} {manifest['examples'][split]:,} examples, {manifest['tokens'][split]:,} tokens"
      for split in manifest["splits"]) + (f"; {manifest['bad_records']} bad records skipped, "
      f"the first: {manifest['first_bad_record']}" if manifest["bad_records"] else "") +
      f"; {time.perf_counter() - t0:.0f}s")
  return manifest


def main(argv: list[str]) -> None:
  beam_args = tuple(argv[1:])
  if beam_args and _RUNNER.value == "local":
    cli.fail(f"unexpected arguments {' '.join(beam_args)}; settings go in --config.KEY=VALUE")
  dropped = cli.own_training_files(cli.CONFIG.value, sys.argv[1:])
  if dropped:
    print(f"note: holding out {cli.CONFIG.value.data.eval_percent:g}% of data.train_files for "
          f"eval, not the recipe's demo eval files ({dropped}); set data.eval_files to choose")
  with cli.user_errors():
    prepare(cli.CONFIG.value, _OUT.value, _WORKERS.value, _RECORDS.value, _RUNNER.value,
            beam_args)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
