"""A run's state, kept in its workdir as status.json for whoever watches it (trainer/dashboard).

    {"state": "running" | "finished" | "stopped" | "failed", "pid": 1234, "host": "name",
     "started": unix time, "updated": unix time, "step": the last step (when ended),
     "steps": train.steps, "error": the one line of a failure}

`trainer.train.run` writes "running" once the workdir is prepared and one of the others when
it returns or raises: "finished" at train.steps, "stopped" before (SIGTERM, or
train.stop_after_steps), "failed" with the error's first line. A process killed without a
chance to write (SIGKILL, a power cut) leaves "running": `read` then looks at the pid, on the
host that wrote it, and reports "failed" ("the process ended without a word") when it is gone.
The file is replaced whole (written aside, then renamed), so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import socket
import time

FILE = "status.json"
STATES = ("running", "finished", "stopped", "failed")


def _write(workdir: str, fields: dict) -> None:
  path = os.path.join(workdir, FILE)
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(fields, f)
    os.replace(tmp, path)
  except OSError:  # a full disk: the run's own error says so; the status is a courtesy
    try:
      os.remove(tmp)
    except OSError:
      pass


def _raw(workdir: str) -> dict | None:
  try:
    with open(os.path.join(workdir, FILE)) as f:
      fields = json.load(f)
  except (OSError, ValueError):
    return None
  return fields if isinstance(fields, dict) and fields.get("state") in STATES else None


def started(workdir: str, steps: int) -> None:
  now = time.time()
  _write(workdir, {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                   "started": now, "updated": now, "steps": steps})


def ended(workdir: str, state: str, step: int | None = None, error: str = "") -> None:
  """The run ended as `state` (finished, stopped or failed) at `step`."""
  fields = _raw(workdir) or {"pid": os.getpid(), "host": socket.gethostname()}
  fields.update(state=state, updated=time.time())
  if step is not None:
    fields["step"] = step
  if error.strip():
    fields["error"] = error.strip().splitlines()[0][:500]
  _write(workdir, fields)


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: it exists
    return True
  try:  # a zombie (ended, not yet reaped by its parent) is gone for our purposes
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
  except OSError:
    return True


def read(workdir: str) -> dict | None:
  """The status of the run in `workdir` (None: no status.json, e.g. a run from before it), with
  a "running" run whose process is gone from this host reported as failed."""
  fields = _raw(workdir)
  if fields is None:
    return None
  if (fields["state"] == "running" and fields.get("host") == socket.gethostname()
      and isinstance(fields.get("pid"), int) and not alive(fields["pid"])):
    fields = {**fields, "state": "failed", "error": "the process ended without a word "
              "(killed, or the machine went down)"}
  return fields
