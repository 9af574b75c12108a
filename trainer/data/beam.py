"""The prepare's tasks as an Apache Beam pipeline (the optional extra: pip install -e '.[beam]').

  python -m trainer.data.prepare --config=... --out=DIR --runner=DirectRunner|DataflowRunner|
      FlinkRunner|SparkRunner -- [Beam pipeline options: --project=P --region=R ...]

The pipeline is `Create(tasks) | Reshuffle() | Map(prepare.run_task)`: the plan (`prepare.plan`)
and the tokenizer are made here, on the machine that submits the job, and each worker runs on
whole tasks the very function the local path runs. `Reshuffle` stops the runner from fusing the
tasks with their creation, which would leave them all on the one worker that read the list.

Why not array_record's `WriteToArrayRecord` sink: with it Beam decides which examples go in which
file and how the files are named (and it reshards on retries), so a shard would no longer be one
task's examples in the order of its records. Here a task writes its own shards
(`shards.write_shard`, as locally), named by the task, so the shards are byte for byte those of
`--runner=local`, the manifest lists them in the plan's order, and a rerun finds the tasks already
done by their summaries and skips them. A task retried after a failure writes its files again
under their `.tmp` names and renames them into place; leave a runner's speculative execution off
(two copies of one task at once would write the same `.tmp` files).

The workers write with local file APIs (`open`, `os.replace`, ArrayRecordWriter), so `--out` and
the data files must be paths that every worker and this machine see alike: a shared filesystem
(NFS, or a bucket mounted with GCS FUSE), given as absolute paths; there is no gs:// layer. When
the pipeline has run, the summaries are read back here from `--out`, in task order, to write the
manifest; a summary missing there says the workers wrote somewhere else.

The tasks and settings travel to the workers as JSON text; Beam itself serializes the function,
which they import by name (`trainer.data.beam._run_task`: the workers need the project installed,
see the README). `data.source=stdlib` reads the workers' own Python standard library, the same
text only when they run the same Python as this machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import logging
import os
import sys
import time
from types import ModuleType

from trainer.data.sources import Span, one_line
from trainer.errors import UserError

LOCAL_RUNNERS = ("DirectRunner", "FnApiRunner", "PrismRunner")  # in or beside this process
# Beam's DirectRunner first tries Prism, a binary it downloads at run time, then falls back to the
# FnApiRunner, its in-process batch engine: we go to that one directly (no network, one engine,
# and it honours --direct_num_workers and --direct_running_mode). --runner=PrismRunner asks for
# Prism.
_ENGINE = {"DirectRunner": "FnApiRunner"}
TASKS = "trainer.data.prepare"  # Task, Settings, run_task, summary_path


def _prepare() -> ModuleType:
  """trainer.data.prepare, the tasks' module, found by name: it imports this one, and when it is
  the running program (`python -m`) importing it again would define its flags twice."""
  main = sys.modules.get("__main__")
  if getattr(getattr(main, "__spec__", None), "name", "") == TASKS:
    return main
  return importlib.import_module(TASKS)


# A task and the settings as JSON text (Beam's string coder carries it), and back on a worker.


def _task_json(task) -> str:
  return json.dumps(dataclasses.asdict(task))


def _settings_json(s) -> str:
  return json.dumps(dataclasses.asdict(s))


def _run_task(task_json: str, settings_json: str) -> str:
  """A worker: one task, as `prepare.run_task` runs it on the local path. Returns its name."""
  prepare = _prepare()
  d = json.loads(task_json)
  task = prepare.Task(**{**d, "spans": tuple(Span(**x) for x in d["spans"]),
                         "stdlib": tuple(d["stdlib"]) if d["stdlib"] else None})
  prepare.run_task(task, prepare.Settings(**json.loads(settings_json)))
  return task.name


def _import_beam(runner: str):
  if runner in LOCAL_RUNNERS:  # its workers' chatter, not a job's progress: warnings only
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    # a task's error is logged there with its traceback, then raised here: a user error (bad
    # data) is then one line, and any other error still comes with its traceback
    logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)  # not its import-time warning that BigQuery's clients are missing
  try:
    import apache_beam  # the optional extra, only when a Beam runner is asked for
    from apache_beam.options import pipeline_options
  except ImportError:
    raise UserError(f"--runner={runner} needs Apache Beam: pip install -e '.[beam]'") from None
  finally:
    root.setLevel(level)
  return apache_beam, pipeline_options


def _options(pipeline_options, beam_args: tuple[str, ...], runner: str):
  """The pipeline options, parsed now: argparse answers a bad value with its usage and an exit,
  made here one line. (An option no runner knows is only warned about: a portable runner may
  pass it on to its job server.)"""
  options = pipeline_options.PipelineOptions(list(beam_args), runner=_ENGINE.get(runner, runner))
  said = io.StringIO()
  try:
    with contextlib.redirect_stderr(said):
      options.get_all_options()
  except SystemExit:
    why = said.getvalue().strip().splitlines()[-1:] or ["not valid"]
    raise UserError(f"Beam options after --: {why[0].split('error: ', 1)[-1]}") from None
  return options


def _worker_user_error(e: Exception) -> UserError | None:
  """A user error (bad data) a task raised in a worker process or on a cluster, where the runner
  reports it as text: the last "trainer...DataError: message" line of that text."""
  kinds, todo = set(), [UserError]
  while todo:
    kind = todo.pop()
    kinds.add(f"{kind.__module__}.{kind.__qualname__}")
    todo.extend(kind.__subclasses__())
  said = [line.split(": ", 1)[1] for line in str(e).splitlines()
          if line.split(": ", 1)[0].strip() in kinds and ": " in line]
  return UserError(said[-1].strip()) if said else None


def _check_paths(tasks: list, s, runner: str) -> None:
  """Remote workers start in another folder: a relative path would name another file there."""
  if runner in LOCAL_RUNNERS:
    return
  if not os.path.isabs(s.out):
    raise UserError(f"--out={s.out}: --runner={runner} needs an absolute path, of a filesystem "
                    "every worker mounts")
  for task in tasks:
    for span in task.spans:
      if not os.path.isabs(span.path):
        raise UserError(f"config key data.{task.origin}_files: {span.path}: --runner={runner} "
                        "needs absolute paths, of a filesystem every worker mounts")


def run(tasks: list, s, runner: str, beam_args: tuple[str, ...], log) -> list[dict]:
  """Run the tasks (`prepare.Task`) not yet done on the Beam `runner` with the pipeline options
  `beam_args` (the command line after --); returns every task's summary, in task order."""
  beam, pipeline_options = _import_beam(runner)
  prepare = _prepare()
  _check_paths(tasks, s, runner)
  pending = [t for t in tasks if not os.path.exists(prepare.summary_path(s.out, t))]
  if len(pending) < len(tasks):
    log(f"{len(tasks) - len(pending)} of {len(tasks)} tasks already done; doing the rest")
  if pending:
    options = _options(pipeline_options, beam_args, runner)
    try:
      pipeline = beam.Pipeline(options=options)
    except ValueError as e:  # an unknown runner, or its options missing (--project ...)
      raise UserError(f"--runner={runner}: {one_line(e)}") from None
    _ = (pipeline
         | "tasks" >> beam.Create([_task_json(t) for t in pending])
         | "spread over workers" >> beam.Reshuffle()
         | "tokenize and write shards" >> beam.Map(_run_task, _settings_json(s)))
    log(f"running {len(pending)} tasks on {runner}")
    t0 = time.perf_counter()
    try:
      pipeline.run().wait_until_finish()
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 -- a worker's user error, told in text, is one line
      raise _worker_user_error(e) or e from None
    log(f"{runner}: {len(pending)} tasks done in {time.perf_counter() - t0:.0f}s")
  missing = [t.name for t in tasks if not os.path.exists(prepare.summary_path(s.out, t))]
  if missing:
    raise UserError(f"--out={s.out}: the pipeline finished, but {len(missing)} of {len(tasks)} "
                    f"task summaries are not there (e.g. {missing[0]}.task.json): --out must be "
                    "a filesystem that every worker and this machine mount")
  return [prepare.run_task(t, s) for t in tasks]  # done: each summary read back, in task order
