"""Crash safety: training killed with SIGKILL at random moments, then rerun, must lose nothing.

    python tests/crash_trials.py --trials=20 [--seed=0] [--workdir=/tmp/crash]

One uninterrupted run of configs/tiny.py:smoke gives the reference losses. Then, per trial, a
run in a fresh workdir is started and killed (SIGKILL: no handler runs) after a random delay,
a few times (`--kills`), then rerun to the end. Checkpoints are written every 2 steps, asynchronously,
so many kills land during a write. After every kill: each step folder orbax lists must restore
whole (a partial write may only exist as a temporary folder), and the next start must resume from
the newest one. At the end the (step, loss) lines of every attempt equal the reference run's,
bitwise. Prints one line per trial and a summary; exit code 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
ARGS = ["--config=configs/tiny.py:smoke", f"--config.train.steps={STEPS}",
        "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=3",
        "--config.train.sample_tokens=0"]


def start(workdir: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "trainer.main", *ARGS, f"--workdir={workdir}"],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(workdir: str) -> list[tuple[int, float]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # the line being written when the process died
        continue
      if "loss" in row:
        out.append((row["step"], row["loss"]))
  return out


def steps_on_disk(workdir: str) -> tuple[list[int], list[str]]:
  """(finished step folders, temporary folders) under checkpoints/."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return [], []
  names = os.listdir(folder)
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if not n.isdigit()]


def readable(workdir: str, step: int) -> bool:
  """Whether orbax restores the step's state (into whatever structure it holds)."""
  code = ("import orbax.checkpoint as ocp, sys; "
          "m = ocp.CheckpointManager(sys.argv[1], item_names=('state', 'data')); "
          "m.restore(int(sys.argv[2]), args=ocp.args.Composite("
          "state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))")
  proc = subprocess.run([sys.executable, "-c", code, os.path.join(workdir, "checkpoints"),
                         str(step)], capture_output=True, text=True, timeout=300)
  return proc.returncode == 0


def trial(workdir: str, rng: random.Random, reference: dict[int, float], max_delay: float,
          attempts: int):
  """`attempts` starts killed after a random delay (unless they finish first), then one that
  runs to the end; returns (kills, kills during a write, problems)."""
  shutil.rmtree(workdir, ignore_errors=True)
  kills = during_write = 0
  problems = []
  for attempt in range(attempts + 1):
    before, _ = steps_on_disk(workdir)
    proc = start(workdir)
    delay = rng.uniform(1.0, max_delay) if attempt < attempts else None
    try:
      out, _ = proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGKILL)
      proc.communicate()
      kills += 1
      done, temporary = steps_on_disk(workdir)
      during_write += bool(temporary)
      if done and not readable(workdir, done[-1]):
        problems.append(f"step folder {done[-1]} is listed but does not restore")
      continue
    if proc.returncode != 0:
      problems.append(f"a rerun exited {proc.returncode}: {out[-500:]}")
      break
    if before and "resumed from" not in out:
      problems.append("a rerun with checkpoints on disk did not resume")
    if max(dict(losses(workdir)), default=0) == STEPS:
      break
  for step, loss in losses(workdir):
    if reference.get(step) != loss:
      problems.append(f"step {step}: loss {loss} != uninterrupted {reference.get(step)}")
      break
  if max(dict(losses(workdir)), default=0) != STEPS:
    problems.append("never reached the last step")
  return kills, during_write, problems


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--trials", type=int, default=20)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workdir", default="/tmp/jaxtrain-crash")
  ap.add_argument("--kills", type=int, default=3, help="killed starts per trial")
  ap.add_argument("--max_delay", type=float, default=0.0,
                  help="latest kill, seconds after start (default: a whole run's time)")
  args = ap.parse_args()
  reference_dir = os.path.join(args.workdir, "reference")
  shutil.rmtree(reference_dir, ignore_errors=True)
  t0 = time.time()
  proc = start(reference_dir)
  out, _ = proc.communicate()
  if proc.returncode != 0:
    print(out[-2000:])
    return 1
  whole = time.time() - t0
  reference = dict(losses(reference_dir))
  max_delay = args.max_delay or whole
  rng = random.Random(args.seed)
  total_kills = total_writes = failed = 0
  for i in range(args.trials):
    kills, writes, problems = trial(os.path.join(args.workdir, f"t{i}"), rng, reference,
                                    max_delay, args.kills)
    total_kills += kills
    total_writes += writes
    failed += bool(problems)
    print(f"trial {i}: {kills} kills ({writes} with a checkpoint being written): "
          f"{'ok' if not problems else '; '.join(problems)}", flush=True)
  print(f"{args.trials} trials, {total_kills} SIGKILLs ({total_writes} during a checkpoint "
        f"write), {failed} failed; an uninterrupted run takes {whole:.1f}s")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
