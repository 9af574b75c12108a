"""Multi-node GPU training under SLURM: writes the batch script, and starts each task in it.

Submit (or, with --dry_run, print the batch script that would be submitted):

  python launch/slurm.py --nodes=2 --gpus_per_node=8 [--per=node|gpu] [--partition=P]
      [--time=HH:MM:SS] [--account=A] [--port=PORT] [--venv=DIR] [--dry_run]
      -- --config=configs/RECIPE.py --workdir=/shared/run

The batch script runs `srun` with one task per node (`--per=node`, the default: each process
drives all GPUs of its node) or one per GPU (`--per=gpu`: each process sees one GPU through
CUDA_VISIBLE_DEVICES). Every task runs this file again with --task, which reads its place in the
job from SLURM's environment and starts the trainer with explicit multi-process flags:

  --coordinator=FIRST_NODE:PORT   first host of SLURM_JOB_NODELIST (expanded here, no scontrol)
  --num_processes=SLURM_NTASKS  --process_id=SLURM_PROCID

`python launch/slurm.py --task --dry_run -- ARGS` inside an allocation prints that command.
The workdir must be on a file system every node sees (checkpoints are written by all processes).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PORT = 12355


def expand_hostlist(hostlist: str) -> list[str]:
  """SLURM's compressed host list, e.g. "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1.

  Ranges keep their zero padding; several bracket groups in one name expand as a product."""
  hosts, depth, start = [], 0, 0
  parts = []
  for i, ch in enumerate(hostlist + ","):  # split on the commas outside brackets
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(hostlist[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"unbalanced brackets in host list {hostlist!r}")
  for part in filter(None, (p.strip() for p in parts)):
    names = [""]
    for literal, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
      options = [literal]
      if group:
        options = []
        for item in group.split(","):
          lo, _, hi = item.partition("-")
          if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in host list {hostlist!r}")
          width = len(lo)
          options += [literal + str(n).zfill(width) for n in range(int(lo), int(hi or lo) + 1)]
      names = [n + o for n in names for o in options]
    hosts += names
  return hosts


def task_command(env: dict[str, str], trainer_args: list[str], port: int,
                 per: str) -> tuple[dict[str, str], list[str]]:
  """(extra environment, command) for the task SLURM's variables in `env` describe."""
  missing = [v for v in ("SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_PROCID") if v not in env]
  if missing:
    raise SystemExit(f"--task runs inside a SLURM job step (srun); {', '.join(missing)} not set")
  coordinator = expand_hostlist(env["SLURM_JOB_NODELIST"])[0]
  extra = {}
  if per == "gpu":
    extra["CUDA_VISIBLE_DEVICES"] = env.get("SLURM_LOCALID", "0")
  cmd = [sys.executable, "-m", "trainer.main", *trainer_args,
         f"--coordinator={coordinator}:{port}", f"--num_processes={env['SLURM_NTASKS']}",
         f"--process_id={env['SLURM_PROCID']}"]
  return extra, cmd


def batch_script(args, trainer_args: list[str]) -> str:
  tasks_per_node = args.gpus_per_node if args.per == "gpu" else 1
  directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
                f"--ntasks-per-node={tasks_per_node}", f"--gpus-per-node={args.gpus_per_node}",
                f"--cpus-per-task={args.cpus_per_task}", f"--time={args.time}",
                "--output=%x-%j.out", "--exclusive"]
  if args.partition:
    directives.append(f"--partition={args.partition}")
  if args.account:
    directives.append(f"--account={args.account}")
  task = [os.path.join(REPO, "launch", "slurm.py"), "--task", f"--per={args.per}",
          f"--port={args.port}", "--", *trainer_args]
  lines = ["#!/bin/bash"] + [f"#SBATCH {d}" for d in directives] + [
      "# Written by launch/slurm.py. One task per " + args.per + "; each starts trainer.main",
      "# with its coordinator and process id taken from SLURM's environment.",
      "set -euo pipefail",
      f"cd {shlex.quote(REPO)}"]
  if args.venv:
    lines.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
  lines.append(f"srun --kill-on-bad-exit=1 python {shlex.join(task)}")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--nodes", type=int, default=2)
  ap.add_argument("--gpus_per_node", type=int, default=8)
  ap.add_argument("--per", choices=("node", "gpu"), default="node",
                  help="one process per node (all its GPUs) or per GPU")
  ap.add_argument("--partition", default="")
  ap.add_argument("--account", default="")
  ap.add_argument("--time", default="24:00:00")
  ap.add_argument("--cpus_per_task", type=int, default=8)
  ap.add_argument("--job_name", default="jaxtrain")
  ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="coordinator port on node 0")
  ap.add_argument("--venv", default="", help="a virtual environment every node can activate")
  ap.add_argument("--task", action="store_true", help="inside srun: start this task's trainer")
  ap.add_argument("--dry_run", action="store_true", help="print what would run, run nothing")
  ap.add_argument("trainer_args", nargs="*", help="after --: arguments for trainer.main")
  args = ap.parse_args(argv)
  if args.nodes < 1 or args.gpus_per_node < 1:
    ap.error("--nodes and --gpus_per_node must be at least 1")

  if args.task:
    extra, cmd = task_command(dict(os.environ), args.trainer_args, args.port, args.per)
    if args.dry_run:
      print(shlex.join([f"{k}={v}" for k, v in extra.items()] + cmd))
      return 0
    os.chdir(REPO)
    os.execve(cmd[0], cmd, {**os.environ, **extra})

  script = batch_script(args, args.trainer_args)
  if args.dry_run:
    print(script, end="")
    return 0
  return subprocess.run(["sbatch"], input=script, text=True, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
