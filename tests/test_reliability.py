"""Steps that must not hurt a run: non-finite steps skipped and counted, float16 loss scaling,
stopping after too many bad steps with the checkpoint intact, SIGTERM preemption, unreadable
checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import small_run
from trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def poison(monkeypatch, bad):
  """Batches number n (from 1) with `bad(n)` get infinite weights: a non-finite loss."""
  real, seen = train.to_global, [0]

  def to_global(batch, sharding):
    seen[0] += 1
    if bad(seen[0]):
      batch = {**batch, "weights": batch["weights"] * np.inf}
    return real(batch, sharding)
  monkeypatch.setattr(train, "to_global", to_global)


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_a_non_finite_step_changes_nothing_and_training_goes_on(tmp_path, monkeypatch):
  poison(monkeypatch, lambda n: n in (4, 5))  # the 4th and 5th training batches
  c = small_run.config(steps=8, log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0,
                       eval_batches=1)
  out = train.run(c, str(tmp_path / "run"))
  rows = [r for r in metrics(str(tmp_path / "run")) if "skipped" in r]
  assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 1, 0, 0, 0]
  assert rows[-1]["skipped_total"] == 2 and np.isfinite(out["loss"])
  # the skipped steps changed nothing: after step 5 the parameters and moments are those of
  # step 3
  stop_at = lambda n: small_run.config(steps=8, stop_after_steps=n, log_every=1, eval_every=0,
                                       checkpoint_every=0, sample_tokens=0)  # one LR schedule
  monkeypatch.undo()
  after3 = train.run(stop_at(3), str(tmp_path / "three"))["state"]
  poison(monkeypatch, lambda n: n in (4, 5))
  after5 = train.run(stop_at(5), str(tmp_path / "five"))["state"]
  for key in ("params", "opt_state"):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 after5[key], after3[key])
  assert int(after5["guard"]["skipped"]) == 2 and int(after5["guard"]["streak"]) == 2


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_too_many_non_finite_steps_stop_with_the_checkpoint_intact(tmp_path, monkeypatch):
  poison(monkeypatch, lambda n: n >= 7)
  c = small_run.config(steps=30, log_every=1, eval_every=0, checkpoint_every=5, sample_tokens=0,
                       max_nonfinite_steps=3)
  with pytest.raises(train.Diverged, match="3 steps in a row.*last checkpoint \\(step 5\\)"):
    train.run(c, str(tmp_path / "run"))
  monkeypatch.undo()
  again = train.run(small_run.config(steps=6, log_every=1, eval_every=0, checkpoint_every=0,
                                     sample_tokens=0), str(tmp_path / "run"))
  assert again["step"] == 6 and np.isfinite(again["loss"])  # resumed from step 5


def test_float16_loss_scale_halves_on_overflow_then_grows(tmp_path):
  c = small_run.config(steps=24, log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0,
                       lr=3e-3)
  c.precision.update(compute_dtype="float16", loss_scale=2.0**24, loss_scale_period=4)
  out = train.run(c, str(tmp_path / "run"))
  rows = [r for r in metrics(str(tmp_path / "run")) if "loss_scale" in r]
  scales = [r["loss_scale"] for r in rows]
  skipped = [r["skipped"] for r in rows]
  assert skipped[0] == 1 and scales[1] == scales[0] / 2  # overflow: skipped, scale halved
  first_ok = skipped.index(0)
  assert sum(skipped[first_ok:]) <= 3  # a grown scale may overflow again, now and then
  # four clean steps in a row double it
  assert any(b == 2 * a for a, b in zip(scales, scales[1:])), scales
  assert np.isfinite(out["loss"]) and rows[-1]["loss"] < rows[first_ok]["loss"]


def start(workdir, steps):
  return subprocess.Popen(
      [sys.executable, "-m", "trainer.main", "--config=configs/tiny.py:smoke",
       f"--workdir={workdir}", f"--config.train.steps={steps}", "--config.train.log_every=1",
       "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
       "--config.train.sample_tokens=0"], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_sigterm_checkpoints_the_current_step_and_exits_0_then_resumes_bitwise(tmp_path):
  whole = str(tmp_path / "whole")
  proc = start(whole, 40)
  assert proc.wait(timeout=300) == 0
  cut = str(tmp_path / "cut")
  proc = start(cut, 40)
  deadline = time.time() + 240
  while time.time() < deadline:  # wait until a few steps are logged
    if os.path.exists(os.path.join(cut, "metrics.jsonl")) and sum(
        '"loss"' in l for l in open(os.path.join(cut, "metrics.jsonl"))) >= 5:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  err += out
  saved = sorted(int(d) for d in os.listdir(os.path.join(cut, "checkpoints")) if d.isdigit())
  assert saved and 5 <= saved[-1] < 40, (saved, err)
  assert "preempted: checkpoint of step" in err
  proc = start(cut, 40)
  assert proc.wait(timeout=300) == 0
  losses = lambda d: [(r["step"], r["loss"]) for r in metrics(d) if "loss" in r]
  assert dict(losses(cut))[40] == dict(losses(whole))[40]  # bitwise, on CPU


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_an_unreadable_checkpoint_is_named_and_the_one_before_is_used(tmp_path, capsys):
  cfg = dict(log_every=1, eval_every=0, checkpoint_every=5, sample_tokens=0)
  whole = train.run(small_run.config(steps=12, **cfg), str(tmp_path / "whole"))
  run = str(tmp_path / "run")
  train.run(small_run.config(steps=10, **cfg), run)
  # truncate the largest file of the newest checkpoint, as a crash of the disk would
  newest = os.path.join(run, "checkpoints", "10")
  files = [os.path.join(d, f) for d, _, fs in os.walk(newest) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  resumed = train.run(small_run.config(steps=12, **cfg), run)
  captured = capsys.readouterr()
  assert f"checkpoint {newest} cannot be read" in captured.out + captured.err
  assert os.path.isdir(newest + ".unreadable")
  assert resumed["step"] == 12 and resumed["loss"] == whole["loss"]  # from step 5, bitwise


def test_a_checkpoint_of_another_configuration_is_refused_untouched(tmp_path):
  run = str(tmp_path / "run")
  cfg = dict(log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0)
  train.run(small_run.config(steps=3, **cfg), run)
  other = small_run.config(steps=6, **cfg)
  other.precision.compute_dtype = "float16"  # its state also holds a loss scale
  with pytest.raises(train.UserError, match="holds another train state.*guard/scale"):
    train.run(other, run)
  wider = small_run.config(steps=6, **cfg)
  wider.model.d_ff = 192  # another model: same names, other shapes
  with pytest.raises(train.UserError, match="different model \\(model.d_ff was 128, now 192\\)"):
    train.run(wider, run)
  assert os.listdir(os.path.join(run, "checkpoints")) == ["3"]  # nothing moved or deleted


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  sys.path.insert(0, os.path.join(REPO, "launch"))
  import local  # launch/local.py: the commands and environment of a local multi-process job
  workdir = str(tmp_path / "mh")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  args = ["--config=configs/tiny.py:smoke", f"--workdir={workdir}", "--config.train.steps=500",
          "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=0", "--config.train.sample_tokens=0"]
  procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for c in local.commands(2, local.free_port(), args)]
  try:
    deadline = time.time() + 240
    while time.time() < deadline and len([r for r in metrics_or_none(workdir) if "loss" in r]) < 3:
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # one host is told; the other is not
    outs = [p.communicate(timeout=180) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outs[1][1][-2000:] + outs[0][1][-2000:]
  stops = [int(err.split(f"process {i} stopped at step ")[1].split()[0])
           for i, (_, err) in enumerate(outs)]
  assert stops[0] == stops[1] and 3 <= stops[0] < 500, stops
  assert f"preempted: checkpoint of step {stops[0]}" in outs[0][0]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(stops[0])]


def metrics_or_none(workdir):
  return metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path):
  """tests/crash_trials.py with 3 trials (BENCHMARKS.md has a 20-trial run)."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "crash_trials.py"),
                         "--trials=3", f"--workdir={tmp_path}"], capture_output=True, text=True,
                        timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "0 failed" in proc.stdout
