"""What a run does at its edges: a full disk, a batch that cannot fit, a resume's metrics, an
update that would make parameters infinite, and stopping after N steps of an invocation."""

import errno
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import small_run
from trainer import checkpoint as ckpt_lib, memory, metrics as metrics_lib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(log_every=1, eval_every=0, sample_tokens=0, eval_batches=1)


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def main(*args, workdir):
  return subprocess.run([sys.executable, "-m", "trainer.main", "--config=configs/tiny.py:smoke",
                         f"--workdir={workdir}", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def error_lines(stderr):
  return [l for l in stderr.replace("\r", "\n").splitlines() if l.startswith("error: ")]


# --- resources ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB file system: two checkpoints of the smoke model fit, the third does not."""
  where = tmp_path / "disk"
  where.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                          str(where)], capture_output=True).returncode:
    pytest.skip("needs root to mount a small tmpfs")
  yield str(where)
  subprocess.run(["umount", str(where)], check=False)


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_full_disk_is_one_line_naming_the_newest_complete_checkpoint(small_disk):
  workdir = os.path.join(small_disk, "run")
  proc = main("--config.train.checkpoint_every=10", workdir=workdir)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  [line] = error_lines(proc.stderr)
  complete = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert complete, os.listdir(os.path.join(workdir, "checkpoints"))
  assert "no space left" in line
  assert f"newest complete checkpoint is step {complete[-1]} " in line, line
  # the named checkpoint is whole: the same command resumes from it once there is room
  for n in complete[:-1]:
    subprocess.run(["rm", "-rf", os.path.join(workdir, "checkpoints", str(n))], check=True)
  proc = main("--config.train.checkpoint_every=0", "--config.train.keep_checkpoints=1",
              workdir=workdir)
  assert f"resumed from {os.path.join(workdir, 'checkpoints')} at step {complete[-1]}" in \
      proc.stdout, proc.stderr[-2000:]


def test_a_failed_asynchronous_write_is_one_error_too(tmp_path, monkeypatch):
  """The room check passes (the file system lies), the write itself fails in orbax's thread."""
  if os.geteuid() != 0:
    pytest.skip("needs root to mount a small tmpfs")
  where = tmp_path / "disk"
  where.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here")
  try:
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", 
                        lambda p: shutil._ntuple_diskusage(2**40, 0, 2**40))
    with pytest.raises(train.UserError, match="no space left .* no complete checkpoint"):
      train.run(small_run.config(steps=4, checkpoint_every=2, **QUIET), str(where / "run"))
  finally:
    subprocess.run(["umount", str(where)], check=False)


def test_no_space_from_any_writer_is_the_same_one_line(tmp_path, monkeypatch):
  """Without root: the metrics file's write fails as a full disk would make it."""
  real = metrics_lib.MetricsWriter.write

  def write(self, step, scalars):
    if step >= 3:
      raise OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl")
    real(self, step, scalars)
  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write)
  with pytest.raises(train.UserError, match="no space left .* newest complete checkpoint is "
                                            "step 2 "):
    train.run(small_run.config(steps=6, checkpoint_every=2, **QUIET), str(tmp_path / "run"))


def test_a_batch_that_cannot_fit_is_refused_before_allocation(tmp_path):
  proc = main("--config.train.batch_size=99999999992", workdir=str(tmp_path / "w"))
  assert proc.returncode == 2
  [line] = error_lines(proc.stderr)
  assert "train.batch_size" in line and "train.memory_check=False" in line, line
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_check_fits_compares_the_estimate_with_the_device():
  devices = jax.devices()[:1]
  with open("/proc/meminfo") as f:  # the host's memory, read independently
    host = int(next(l for l in f if l.startswith("MemTotal:")).split()[1]) * 1024
  have, what = memory.device_memory(devices)
  assert have == pytest.approx(host, rel=0.01) and what == "host memory"
  memory.check_fits({"parameters": 0.9 * host}, devices)
  with pytest.raises(memory.UserError, match=r"needs about .* GiB per device"):
    memory.check_fits({"parameters": 0.5 * host, "activations": 0.6 * host,
                       "optimizer state in host memory (not counted)": 0.0}, devices)
  assert memory.device_memory(jax.devices()[:8])[0] == pytest.approx(host / 8, rel=0.01)


# --- metrics after a resume -----------------------------------------------------------------


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_resume_writes_no_duplicate_rows_and_tensorboard_forgets_them(tmp_path):
  from tensorboardX.proto import event_pb2
  whole = str(tmp_path / "whole")
  train.run(small_run.config(steps=6, checkpoint_every=0, **QUIET), whole)
  cut = str(tmp_path / "cut")
  train.run(small_run.config(steps=6, stop_after_steps=3, checkpoint_every=0, **QUIET), cut)
  with open(os.path.join(cut, "metrics.jsonl"), "a") as f:  # what a killed run left behind
    f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
  train.run(small_run.config(steps=6, checkpoint_every=0, **QUIET), cut)
  steps = [r["step"] for r in rows(cut) if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in rows(cut) if "loss" in r] == \
      [r["loss"] for r in rows(whole) if "loss" in r]
  starts = []
  for path in glob.glob(os.path.join(cut, "tensorboard", "events.out.tfevents.*")):
    data, at = open(path, "rb").read(), 0
    while at < len(data):
      n = int.from_bytes(data[at:at + 8], "little")
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      if event.HasField("session_log"):
        starts.append((event.step, event.session_log.status))
      at += 16 + n
  assert starts == [(4, event_pb2.SessionLog.START)]


def test_metrics_are_strict_json_and_survive_deletion(tmp_path):
  def strict(constant):
    raise ValueError(f"not JSON: {constant}")

  def read():
    return [json.loads(l, parse_constant=strict)
            for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]

  writer = metrics_lib.MetricsWriter(str(tmp_path), 10, 0)
  writer.write(1, {"loss": math.nan, "grad_norm": math.inf, "lr": 0.5})
  assert read() == [{"step": 1, "loss": None, "grad_norm": None, "lr": 0.5}]
  os.remove(tmp_path / "metrics.jsonl")  # deleted while the run goes on
  writer.write(2, {"loss": 1.5})
  writer.close()
  assert read() == [{"step": 2, "loss": 1.5}]


# --- the non-finite guard -------------------------------------------------------------------


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_an_update_that_would_make_parameters_infinite_is_skipped(tmp_path):
  """lr=1e39 is a finite float in the config and infinite in float32: the gradients are finite,
  the update is not. Every step is skipped, every checkpoint holds the initial parameters."""
  workdir = str(tmp_path / "run")
  out = train.run(small_run.config(steps=4, lr=1e39, checkpoint_every=2,
                                   max_nonfinite_steps=0, **QUIET), workdir)
  assert [r["skipped"] for r in rows(workdir) if "skipped" in r] == [1, 1, 1, 1]
  at2 = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 3).restore(
      2, jax.tree.map(np.asarray, out["state"]))[0]["params"]
  for a, b in zip(jax.tree.leaves(out["state"]["params"]), jax.tree.leaves(at2)):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(train.Diverged,
                     match="3 steps in a row.*checkpoint \\(step 2\\) holds finite"):
    train.run(small_run.config(steps=8, lr=1e39, checkpoint_every=2, max_nonfinite_steps=3,
                               **QUIET), str(tmp_path / "stops"))


def test_parameters_that_an_update_made_infinite_are_never_checkpointed(tmp_path, monkeypatch):
  """The step checks the gradients and the learning rate, not the new parameters (a pass over
  them would cost more than the update, benchmarks/optimizer_tail.py). An update that overflows
  anyway (forced here, in a run resumed from a finite step-2 checkpoint) is never written: the
  run stops at its next checkpoint, naming the last finite one."""
  workdir = str(tmp_path / "run")
  train.run(small_run.config(steps=4, stop_after_steps=2, checkpoint_every=2, **QUIET), workdir)
  monkeypatch.setattr(optax, "apply_updates", lambda params, updates: jax.tree.map(
      lambda p, u: p + u * jnp.inf, params, updates))
  with pytest.raises(train.Diverged, match="not finite at step 4.*checkpoint \\(step 2\\) "
                     "holds finite"):
    train.run(small_run.config(steps=4, checkpoint_every=2, max_nonfinite_steps=0, **QUIET),
              workdir)
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 3).latest_step() == 2


# --- stop_after_steps -----------------------------------------------------------------------


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_stop_after_steps_goes_on_with_the_same_command(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  cfg = lambda: small_run.config(steps=5, stop_after_steps=2, checkpoint_every=0, **QUIET)
  assert [train.run(cfg(), workdir)["step"] for _ in range(3)] == [2, 4, 5]
  assert "stopped at step 2 of 5" in capsys.readouterr().out
  before = rows(workdir)
  capsys.readouterr()
  out = train.run(cfg(), workdir)
  printed = capsys.readouterr().out
  assert out["step"] == 5 and "complete at step 5 of 5" in printed and "loss" not in printed
  assert rows(workdir) == before
