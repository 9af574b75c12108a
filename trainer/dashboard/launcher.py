"""Starting, stopping and resuming training runs from the dashboard: recipes from configs/ only,
each run a `python -m trainer.main` subprocess with its own workdir under the root.

A launch is checked by the trainer itself, so the page shows the command line's own one-line
message for a bad value: the process starts, validates its config before it touches data, and
either writes status.json ("running": launched) or exits with code 2 (the message is the
"error:" line of its log, and the new workdir is removed again). Stop is SIGTERM, on which the
trainer checkpoints the current step (trainer/train.py Preemption); resume runs the recorded
command again, which continues from that checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from trainer import cli, run_status
from trainer.dashboard import runs
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")
LAUNCH, LOG = "launch.json", "train.log"
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
KEY = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
STARTUP_S = 180  # how long a launch waits for the trainer to accept its config

_processes: dict[str, subprocess.Popen] = {}  # workdir -> the trainer this dashboard started


def recipes() -> list[str]:
  """The recipe files in configs/ (base.py holds the defaults every recipe starts from)."""
  return sorted(f for f in os.listdir(CONFIGS)
                if f.endswith(".py") and f != "__init__.py" and NAME.match(f))


def fields(recipe: str, arg: str = "") -> dict[str, str]:
  """The recipe's settings, flattened ("train.steps") and written as --config.KEY=VALUE takes
  them, for the launch form. UserError when the recipe refuses the argument."""
  if recipe not in recipes():
    raise UserError(f"recipe {recipe!r} is not one of configs/: {', '.join(recipes())}")
  spec = os.path.join(CONFIGS, recipe) + (f":{arg}" if arg else "")
  try:
    config = cli.load_recipe(spec)
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 -- the recipe's own refusal, e.g. a missing argument
    raise UserError(f"{recipe}{':' + arg if arg else ''}: {e}") from None
  return {k: repr(v) if isinstance(v, (tuple, list)) else str(v)
          for k, v in runs.flatten(config.to_dict()).items()}


def reap() -> None:
  """Collect the exit of every trainer this dashboard started that has ended."""
  for workdir, proc in list(_processes.items()):
    if proc.poll() is not None:
      del _processes[workdir]


def _error_line(workdir: str) -> str:
  try:
    with open(os.path.join(workdir, LOG), errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return "the trainer exited before it started"
  errors = [l for l in lines if l.startswith("error:")]
  return (errors[-1][len("error:"):].strip() if errors
          else lines[-1] if lines else "the trainer exited before it started")


def _start(workdir: str, command: list[str]) -> subprocess.Popen:
  log = open(os.path.join(workdir, LOG), "ab")
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, start_new_session=True, env=env)
  log.close()
  _processes[workdir] = proc
  return proc


def _wait_started(workdir: str, proc: subprocess.Popen, since: float) -> int | None:
  """None once the trainer runs (status.json newer than `since`), else its exit code."""
  deadline = time.time() + STARTUP_S
  while time.time() < deadline:
    status = run_status.read(workdir)
    if status is not None and status["state"] == "running" and \
        status.get("updated", 0) >= since and status.get("pid") == proc.pid:
      return None
    code = proc.poll()
    if code is not None:
      return code
    time.sleep(0.2)
  return None


def _command(workdir: str, recipe: str, arg: str, overrides: dict) -> list[str]:
  """trainer.main's command line for a recipe of configs/ and its overrides, each checked: the
  dashboard runs nothing else (a launch.json someone edited included)."""
  if recipe not in recipes():
    raise UserError(f"recipe {recipe!r} is not one of configs/: {', '.join(recipes())}")
  if not isinstance(arg, str) or any(c in arg for c in "\n\r\0"):
    raise UserError("the recipe argument must be one line")
  if not isinstance(overrides, dict):
    raise UserError("overrides must map config keys to values")
  for key, value in overrides.items():
    if not KEY.match(str(key)):
      raise UserError(f"{key!r} is not a config key (section.name)")
    if any(c in str(value) for c in "\n\r\0"):
      raise UserError(f"the value of {key} must be one line")
  spec = os.path.join(CONFIGS, recipe) + (f":{arg}" if arg else "")
  return [sys.executable, "-m", "trainer.main", f"--config={spec}", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in overrides.items())]


def launch(root: str, name: str, recipe: str, arg: str = "",
           overrides: dict[str, str] | None = None) -> str:
  """Start `recipe` (a file in configs/, with `arg` after its colon) with `overrides`
  ({"train.steps": "100"}) as run `name` under `root`; returns the run's id. UserError: the
  request or the config is refused (the trainer's own message), nothing left behind."""
  overrides = {k: str(v) for k, v in (overrides or {}).items()}
  if not NAME.match(name or ""):
    raise UserError(f"run name {name!r}: letters, digits, '_', '-' and '.', at most 64")
  workdir = os.path.join(root, name)
  command = _command(workdir, recipe, arg, overrides)
  if os.path.exists(workdir):
    raise UserError(f"{name} exists under the root: pick another run name")
  os.makedirs(workdir)
  with open(os.path.join(workdir, LAUNCH), "w") as f:
    json.dump({"recipe": recipe, "arg": arg, "overrides": overrides}, f, indent=1)
  since = time.time()
  code = _wait_started(workdir, _start(workdir, command), since)
  if code not in (None, 0):
    message = _error_line(workdir)
    if not os.path.exists(os.path.join(workdir, "config.json")):  # refused before it began
      shutil.rmtree(workdir, ignore_errors=True)
    raise UserError(message)
  return name


def _trainer_of(pid: int, workdir: str) -> bool:
  """Whether process `pid` is trainer.main training in `workdir` (so a reused pid is never
  signalled)."""
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      args = f.read().decode(errors="replace").split("\0")
    cwd = os.readlink(f"/proc/{pid}/cwd")
  except OSError:
    return False
  given = [a[len("--workdir="):] for a in args if a.startswith("--workdir=")]
  return "trainer.main" in args and any(
      os.path.realpath(os.path.join(cwd, g)) == os.path.realpath(workdir) for g in given)


def stop(root: str, run_id: str) -> None:
  """SIGTERM to the run's trainer: it checkpoints the current step and ends as "stopped"."""
  workdir = runs.folder(root, run_id)
  status = run_status.read(workdir)
  if status is None or status["state"] != "running":
    raise UserError(f"{run_id} is not running")
  pid = status.get("pid")
  if not isinstance(pid, int) or not _trainer_of(pid, workdir):
    raise UserError(f"{run_id}: process {pid} is not its trainer on this machine")
  os.kill(pid, signal.SIGTERM)


def resume(root: str, run_id: str) -> None:
  """Run a stopped (or failed) run's recorded command again: it continues from its newest
  checkpoint."""
  workdir = runs.folder(root, run_id)
  status = run_status.read(workdir)
  if status is not None and status["state"] == "running":
    raise UserError(f"{run_id} is running")
  if status is not None and status["state"] == "finished":
    raise UserError(f"{run_id} has finished: launch a new run to train further")
  try:
    with open(os.path.join(workdir, LAUNCH)) as f:
      launched = json.load(f)
    command = _command(workdir, launched["recipe"], launched.get("arg", ""),
                       launched.get("overrides", {}))
  except (OSError, ValueError, KeyError, TypeError):
    raise UserError(f"{run_id} was not launched from the dashboard: rerun its own command to "
                    "resume it") from None
  since = time.time()
  code = _wait_started(workdir, _start(workdir, command), since)
  if code not in (None, 0):
    raise UserError(_error_line(workdir))
