"""Entry point: python -m trainer.main --config=configs/RECIPE.py[:ARG] [--config.KEY=VALUE ...]
[--workdir=DIR] [--verbose]

A mistake in the command line or the config (unknown key, bad value, sizes that do not fit)
prints one line on stderr and exits with code 2; `--verbose` shows the traceback too.
"""

from __future__ import annotations

if __name__ == "__main__":
  # glibc's huge pages for XLA:CPU's per-step buffers (trainer/hugepages.py): a tunable read at
  # process start, so the command starts again with it, before the imports below cost seconds
  from trainer import hugepages
  hugepages.reexec()

import logging as std_logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from parallel import distributed  # noqa: E402
from trainer import checkpoint, cli, train  # noqa: E402
from trainer.validate import UserError  # noqa: E402

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics, the tokenizer and config.json go. Rerunning with "
    "the same workdir resumes. Default: runs/<recipe name>.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "Multi-process: HOST:PORT of process 0. Not needed under SLURM or on "
    "Cloud TPU, where the environment says it.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one's index.")


class _NoSpaceFilter(std_logging.Filter):
  def filter(self, record) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return "No space left on device" not in f"{record.getMessage()} {error}"


def default_workdir(config_arg: str) -> str:
  name = os.path.splitext(os.path.basename(config_arg.split(":")[0]))[0]
  return os.path.join("runs", name)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {' '.join(argv[1:])}; settings go in --config.KEY=VALUE")


  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    cli.fail(str(e))

  if not cli.VERBOSE.value:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    # a full disk is reported in one line (trainer/train.py); not as orbax's threads' tracebacks
    logging.get_absl_handler().addFilter(_NoSpaceFilter())
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jaxtrain/xla"))
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  dropped = cli.own_training_files(cli.CONFIG.value, sys.argv[1:])
  if dropped and jax.process_index() == 0:
    print(f"note: evaluating on {cli.CONFIG.value.data.eval_percent:g}% of data.train_files "
          "held out,"
          f" not on the recipe's demo eval files ({dropped}); set data.eval_files to choose",
          flush=True)  # (stdout: stderr is kept for the one line of an error)
  try:
    try:
      train.run(cli.CONFIG.value, workdir)
    except Exception as e:  # noqa: BLE001 -- a full disk, wherever it was hit, is a user error
      if not checkpoint.no_space(e):
        raise
      raise checkpoint.disk_full(os.path.join(workdir, "checkpoints")) from e
  except UserError as e:
    if cli.VERBOSE.value:
      raise
    cli.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
