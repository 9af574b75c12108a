"""What glibc's huge pages do to our train step on CPU: page faults, kernel time and step time.

Runs the step of benchmarks/train_throughput.py (configs/medium.py, float32, full fine-tuning)
in a fresh process per setting of GLIBC_TUNABLES (read by glibc only at process start), the
settings alternating over `--rounds`, and prints per setting the median step time, the minor
page faults and the kernel (system) CPU time per step, summed over threads (`getrusage`).

python benchmarks/page_faults.py [--remat none --steps 4 --rounds 2
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


def child(remat: str, steps: int) -> None:
  sys.path.insert(0, HERE)
  import train_throughput as tt

  run, compile_s = tt.ours("float32", "full", remat)
  run(1)
  rows = []
  for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    run(1)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    rows.append((seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
  print(json.dumps({"compile_s": compile_s, "steps": rows}))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--remat", default="", help="our model.remat instead of the config's")
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--tunables", default="glibc.malloc.hugetlb=0,glibc.malloc.hugetlb=1")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args.remat, args.steps)
    return
  settings = args.tunables.split(",")
  rows = {s: [] for s in settings}
  for _ in range(args.rounds):
    for setting in settings:
      out = subprocess.run(
          [sys.executable, __file__, "--child", "--remat", args.remat, "--steps", str(args.steps)],
          env={**os.environ, "GLIBC_TUNABLES": setting}, capture_output=True, text=True,
          check=True).stdout
      rows[setting] += json.loads(out.strip().splitlines()[-1])["steps"]
  print(f"remat {args.remat or 'config default'}, {args.rounds} processes x {args.steps} steps each")
  for setting, steps in rows.items():
    seconds, faults, kernel = (statistics.median(x) for x in zip(*steps))
    print(f"GLIBC_TUNABLES={setting}: step {seconds:.2f} s, {faults:,.0f} minor faults, "
          f"kernel time {kernel:.2f} s per step")


if __name__ == "__main__":
  main()
