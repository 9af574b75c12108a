"""A recipe's demo, run several times from scratch: its eval metrics by step, whether the runs
were bitwise equal, and the median wall time. The figures BENCHMARKS.md quotes for the demos.

python benchmarks/demo_runs.py --config=configs/sft_chat.py --runs=3 --out=benchmarks/results/sft_chat.json
python benchmarks/demo_runs.py --config=configs/reward.py --runs=3 --out=benchmarks/results/reward.json

Each run is `python -m trainer.main --config=CONFIG [EXTRA...]` in a fresh workdir; the timing
fields of metrics.jsonl (tokens_per_sec, mfu) are left out of the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host import host_info  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("tokens_per_sec", "mfu")


def one_run(config: str, extra: list[str]) -> tuple[list[dict], float]:
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "trainer.main", f"--config={config}",
                           f"--workdir={workdir}", *extra], cwd=REPO, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
      sys.exit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]
  return rows, seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--out", default="")
  args, extra = parser.parse_known_args()
  runs = [one_run(args.config, extra) for _ in range(args.runs)]
  rows = runs[0][0]
  evals = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval_")}
           for r in rows if any(k.startswith("eval_") for k in r)}
  result = {
      "command": " ".join(["python -m trainer.main", f"--config={args.config}", *extra]),
      "runs": args.runs,
      "bitwise_equal": all(r == rows for r, _ in runs),
      "wall_seconds": [round(s, 1) for _, s in runs],
      "median_wall_seconds": round(statistics.median(s for _, s in runs), 1),
      "eval_by_step": evals,
      "last_loss": next(r["loss"] for r in reversed(rows) if "loss" in r),
      "host": host_info(),
  }
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
