"""Multi-process start-up: `jax.distributed.initialize` from explicit flags or the cluster's
environment.

Explicit: --coordinator=HOST:PORT --num_processes=N --process_id=I (the local launcher and tests).
SLURM (several tasks in the job) and Cloud TPU pods: jax reads the coordinator, process count and
id from the environment itself, so `initialize()` takes no arguments there. A single process does
nothing. On CPU, collectives across processes go through gloo.
"""

from __future__ import annotations

import os

import jax


def cluster_environment() -> str | None:
  """The name of the multi-process environment this process runs in, or None."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return "slurm"
  if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  explicit = coordinator is not None
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator needs --num_processes and --process_id too")
  env = cluster_environment()
  if not explicit and env is None:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
  if explicit:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  else:
    jax.distributed.initialize()
