"""What every command line here shares: the recipe flag, its parsing, and user errors as one
line on stderr with exit code 2 (`trainer.main`, `trainer.data.prepare`)."""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import sys

from absl import flags
from ml_collections import config_flags

from trainer.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "tiny.py")
USER_ERROR_EXIT = 2


# the flags every command shares, defined once (absl refuses a flag defined twice in a process)
CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Recipe file (configs/*.py[:arg]); default {DEFAULT_CONFIG}.",
    lock_config=True)
VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for user errors.")


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USER_ERROR_EXIT)


@contextlib.contextmanager
def user_errors():
  """A UserError raised inside ends the command in one line and exit code 2 (with --verbose:
  the traceback)."""
  try:
    yield
  except UserError as e:
    if VERBOSE.value:
      raise
    fail(str(e))


def load_recipe(spec: str):
  """The ConfigDict a `--config=FILE[:ARG]` names, loaded the way config_flags loads it."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"--config={spec}: no such file")
  module_spec = importlib.util.spec_from_file_location("_recipe", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_override_keys(config, argv: list[str]) -> None:
  """Every --config.KEY=VALUE must name an existing key: say which one does not, and the nearest."""
  for a in argv:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for part in key.split("."):
      if not hasattr(node, "keys") or part not in node:
        options = [".".join(walked + [k]) for k in node.keys()] if hasattr(node, "keys") else []
        near = difflib.get_close_matches(".".join(walked + [part]), options, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise UserError(f"unknown config key {key}{hint}")
      node, walked = node[part], walked + [part]


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag, config file or config key is one line on stderr and exit
  code 2. The config file is user code: any exception while loading it is a user error."""
  specs = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  if not specs:
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  try:
    check_override_keys(load_recipe(specs[-1] if specs else DEFAULT_CONFIG), argv[1:])
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 -- reported in one line, or raised with --verbose
    if any(a in ("--verbose", "--verbose=true", "--verbose=True") for a in argv):
      raise
    message = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
    fail(message or type(e).__name__)
  return []


def own_training_files(config, argv: list[str]) -> str | None:
  """A recipe's `data.eval_files` belong to its own demo data. A command that brings its own
  `--config.data.train_files` without naming `--config.data.eval_files` evaluates on a held-out
  `data.eval_percent` of those files instead. Returns the recipe's eval files so dropped."""
  given = {a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")}
  if "data.train_files" not in given or "data.eval_files" in given or not config.data.eval_files:
    return None
  dropped, config.data.eval_files = config.data.eval_files, ""
  return dropped
