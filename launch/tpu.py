"""Cloud TPU pods: the same command on every worker of a TPU VM, through gcloud.

  python launch/tpu.py --tpu=NAME --zone=ZONE [--project=P] [--setup] [--background]
      [--dry_run] -- --config=configs/RECIPE.py --workdir=/mnt/shared/run

--setup first copies this checkout's last commit to every worker (`git archive HEAD`: commit
your changes first) through `gcloud compute tpus tpu-vm scp --worker=all`, and installs it with
jax[tpu] into a virtual environment there. Then `gcloud compute tpus tpu-vm ssh --worker=all` runs trainer.main on all
workers at once; jax reads the pod's coordinator, process count and ids from the TPU VM's
environment, so the command carries no multi-process flags. --background detaches it (nohup, log
in ~/jaxtrain.log on each worker) so that closing the terminal does not stop the run.
--dry_run prints every command, in order, and runs none.

The workdir must be a file system all workers share (e.g. Filestore or a gcsfuse mount): every
worker writes its own shards of each checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/jaxtrain"
REMOTE_VENV = "~/jaxtrain-venv"
ARCHIVE = "/tmp/jaxtrain.tar.gz"


def commands(args, trainer_args: list[str]) -> list[list[str]]:
  where = [args.tpu, f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project
                                                else [])

  def on_all(remote: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *where, "--worker=all",
            f"--command={remote}"]

  out = []
  if args.setup:
    out.append(["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"])
    out.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE,
                f"{args.tpu}:{os.path.basename(ARCHIVE)}", "--worker=all",
                *where[1:]])
    out.append(on_all(
        f"mkdir -p {REMOTE_DIR} && "
        f"tar xzf {os.path.basename(ARCHIVE)} -C {REMOTE_DIR} && "
        f"python3 -m venv {REMOTE_VENV} && "
        f"{REMOTE_VENV}/bin/pip install -q -e {REMOTE_DIR} 'jax[tpu]'"))
  run = f"{REMOTE_VENV}/bin/python -m trainer.main {shlex.join(trainer_args)}".strip()
  if args.background:
    run = f"nohup {run} > ~/jaxtrain.log 2>&1 &"
  out.append(on_all(f"cd {REMOTE_DIR} && {run}"))
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--tpu", required=True, help="the TPU VM's name")
  ap.add_argument("--zone", required=True)
  ap.add_argument("--project", default="")
  ap.add_argument("--setup", action="store_true", help="copy the code and install it first")
  ap.add_argument("--background", action="store_true", help="detach the run (nohup) on workers")
  ap.add_argument("--dry_run", action="store_true", help="print the commands, run none")
  ap.add_argument("trainer_args", nargs="*", help="after --: arguments for trainer.main")
  args = ap.parse_args(argv)
  for cmd in commands(args, args.trainer_args):
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      code = subprocess.run(cmd, check=False).returncode
      if code:
        return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
