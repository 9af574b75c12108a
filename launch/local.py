"""Run N training processes on this machine, as a multi-host job would run across hosts.

python launch/local.py --num_processes=2 --devices_per_process=4 -- --config=configs/tiny.py:smoke
  --workdir=/tmp/mh

Each process gets `--coordinator=127.0.0.1:PORT --num_processes=N --process_id=I` appended and
`devices_per_process` CPU devices (XLA_FLAGS). --dry_run prints the commands instead. The exit code
is the first non-zero exit code of the processes, or 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def commands(num_processes: int, port: int, trainer_args: list[str]) -> list[list[str]]:
  return [[sys.executable, "-m", "trainer.main", *trainer_args,
           f"--coordinator=127.0.0.1:{port}", f"--num_processes={num_processes}",
           f"--process_id={i}"] for i in range(num_processes)]


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--num_processes", type=int, default=2)
  ap.add_argument("--devices_per_process", type=int, default=4)
  ap.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  ap.add_argument("--dry_run", action="store_true")
  ap.add_argument("trainer_args", nargs="*", help="after --: arguments for trainer.main")
  args = ap.parse_args(argv)
  cmds = commands(args.num_processes, args.port or free_port(), args.trainer_args)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
  if args.dry_run:
    for c in cmds:
      print(f"JAX_PLATFORMS=cpu XLA_FLAGS={env['XLA_FLAGS']} {shlex.join(c)}")
    return 0
  procs = [subprocess.Popen(c, cwd=REPO, env=env) for c in cmds]
  codes = [p.wait() for p in procs]
  return next((c for c in codes if c), 0)


if __name__ == "__main__":
  sys.exit(main())
