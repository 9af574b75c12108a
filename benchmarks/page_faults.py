"""What glibc's huge pages do to a train step on CPU: page faults, kernel time and step time.

Runs our step of benchmarks/train_throughput.py (configs/medium.py, float32, full fine-tuning;
`--side peer`: transformers' step of that shape instead) in a fresh process per setting of
GLIBC_TUNABLES (read by glibc only at process start), the settings alternating over `--rounds`,
and prints per setting the median step time, the minor page faults and the kernel (system) CPU
time per step, summed over threads (`getrusage`), and the compile time (the peer: first step).
`--pause S`: the process sleeps S seconds before each timed step, which measures the first step
after a pause (an eval, a checkpoint, the other side's turn in benchmarks/train_throughput.py).

python benchmarks/page_faults.py [--side peer --remat none --steps 4 --rounds 2 --pause 6
    --tunables glibc.malloc.hugetlb=0,glibc.malloc.hugetlb=1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(side: str, remat: str, steps: int, pause: float) -> None:
  sys.path.insert(0, HERE)
  import train_throughput as tt

  if side == "ours":
    run, compile_s = tt.ours("float32", "full", remat)
  else:
    run, compile_s = tt.peer("float32", "full")  # its "compile" is its first step
  run(1)
  rows = []
  for _ in range(steps):
    time.sleep(pause)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    run(1)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    rows.append((seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
  print(json.dumps({"compile_s": compile_s, "steps": rows}))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--side", default="ours", choices=("ours", "peer"),
                  help="peer: transformers' step of the same shape (train_throughput.py) instead")
  ap.add_argument("--remat", default="", help="our model.remat instead of the config's")
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--pause", type=float, default=0.0,
                  help="seconds the process sleeps before each timed step")
  ap.add_argument("--tunables", default="glibc.malloc.hugetlb=0,glibc.malloc.hugetlb=1")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args.side, args.remat, args.steps, args.pause)
    return
  settings = args.tunables.split(",")
  rows = {s: [] for s in settings}
  compile_s = {s: [] for s in settings}
  for _ in range(args.rounds):
    for setting in settings:
      out = subprocess.run(
          [sys.executable, __file__, "--child", "--side", args.side, "--remat", args.remat,
           "--steps", str(args.steps), "--pause", str(args.pause)],
          env={**os.environ, "GLIBC_TUNABLES": setting}, capture_output=True, text=True,
          check=True).stdout
      result = json.loads(out.strip().splitlines()[-1])
      rows[setting] += result["steps"]
      compile_s[setting].append(result["compile_s"])
  what = "transformers" if args.side == "peer" else f"ours, remat {args.remat or 'config default'}"
  print(f"{what}, {args.rounds} processes x {args.steps} steps each, pause {args.pause} s")
  for setting, steps in rows.items():
    seconds, faults, kernel = (statistics.median(x) for x in zip(*steps))
    compiled = statistics.median(compile_s[setting])
    print(f"GLIBC_TUNABLES={setting}: step {seconds:.2f} s, {faults:,.0f} minor faults, "
          f"kernel time {kernel:.2f} s per step; "
          f"{'first step' if args.side == 'peer' else 'compile'} {compiled:.1f} s")


if __name__ == "__main__":
  main()
