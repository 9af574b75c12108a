"""A run config small enough for tests: `configs/tiny.py:smoke`, with overrides; and how two
runs are compared."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny


def config(**train):
  c = tiny.get_config("smoke")
  c.train.update(**train)
  return c


def assert_same_training(out, ref):
  """Two runs' final loss and parameters agree (rtol 1e-5)."""
  assert out["loss"] == pytest.approx(ref["loss"], rel=1e-5)
  # rtol 1e-5 as asked; the 1e-6 atol covers parameters whose gradient is a near-cancelling sum,
  # where Adam's normalisation turns reduction-order rounding into a visible (~3e-7) difference.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-6),
               out["state"]["params"], ref["state"]["params"])


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(tool, *args, timeout=600, shell_prefix=""):
  """`python -m trainer.TOOL ARGS` from the repository: (exit code, stdout, stderr).
  shell_prefix: sh commands run first in the same process (`ulimit -f 64; `)."""
  cmd = [sys.executable, "-m", f"trainer.{tool}", *args]
  if shell_prefix:
    cmd = ["sh", "-c", f'{shell_prefix} exec "$@"', "sh", *cmd]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr
