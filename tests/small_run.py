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
  """Two runs' final loss and parameters agree: rtol 1e-5, atol 1e-6, except for at most one
  element in 10^4 of a leaf, which may differ by up to 1e-5.

  The exception covers parameters whose gradient is a near-cancelling sum: Adam divides by the
  gradient's own scale, so reduction-order rounding there shows as a visible difference (3e-7
  on one host, 1.2e-6 on another, in one element of 32768). A wrong computation moves many
  elements by far more."""
  assert out["loss"] == pytest.approx(ref["loss"], rel=1e-5)

  def close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    off = np.abs(a - b) > 1e-6 + 1e-5 * np.abs(b)
    assert off.sum() <= off.size // 10_000, (
        f"{off.sum()} of {off.size} elements differ by more than atol 1e-6 + rtol 1e-5, "
        f"largest {np.abs(a - b).max():.3g}")
  jax.tree.map(close, out["state"]["params"], ref["state"]["params"])


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(tool, *args, timeout=600, shell_prefix=""):
  """`python -m trainer.TOOL ARGS` from the repository: (exit code, stdout, stderr).
  shell_prefix: sh commands run first in the same process (`ulimit -f 64; `)."""
  cmd = [sys.executable, "-m", f"trainer.{tool}", *args]
  if shell_prefix:
    cmd = ["sh", "-c", f'{shell_prefix} exec "$@"', "sh", *cmd]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr
