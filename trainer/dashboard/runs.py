"""The runs under the dashboard's root folder, read from their workdirs (nothing is guessed):
status.json (trainer/run_status.py), metrics.jsonl, config.json, samples.jsonl.

A run is any folder under the root, at most `DEPTH` levels down, holding a status.json or a
run's config.json (one with a train section); a model, one with a Hugging Face config.json
(trainer.export's output). Ids are paths relative to the root ("sweep/lr3e-4").
`folder(root, id)` is the only way from an id to a path, and it refuses anything that would
leave the root (.., absolute paths, symbolic links pointing out).
"""

from __future__ import annotations

import json
import os

from trainer import run_status

DEPTH = 3


class NotFound(ValueError):
  """An id that names no run under the root (or a path outside it)."""


def _inside(root: str, path: str) -> bool:
  root = os.path.realpath(root)
  return os.path.commonpath([root, os.path.realpath(path)]) == root


def kind(path: str) -> str | None:
  """"run" (a training run's workdir), "model" (a Hugging Face folder, e.g. trainer.export's)
  or None."""
  if os.path.isfile(os.path.join(path, run_status.FILE)):
    return "run"
  described = _json(os.path.join(path, "config.json"))
  if not isinstance(described, dict):
    return None
  return "run" if "train" in described else "model" if "model_type" in described else None


def folder(root: str, run_id: str, want: str = "run") -> str:
  """The folder of run (or, `want="model"`, Hugging Face folder) `run_id`; NotFound for an id
  outside the root or naming none."""
  parts = run_id.split("/")
  if (not run_id or run_id.startswith("/") or "\\" in run_id or "\0" in run_id
      or any(p in ("", ".", "..") for p in parts)):
    raise NotFound(f"no {want} {run_id!r}")
  path = os.path.join(root, *parts)
  if not _inside(root, path) or kind(path) != want:
    raise NotFound(f"no {want} {run_id!r}")
  return path


def discover(root: str) -> dict[str, list[str]]:
  """{"runs": ids, "models": ids} under `root`, sorted."""
  found: dict[str, list[str]] = {"run": [], "model": []}
  root = os.path.realpath(root)
  for here, dirs, _ in os.walk(root):
    depth = here[len(root):].count(os.sep)
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "checkpoints"
                     and _inside(root, os.path.join(here, d)))
    if depth >= DEPTH:
      dirs[:] = []
    what = kind(here) if here != root else None
    if what is not None:
      found[what].append(os.path.relpath(here, root).replace(os.sep, "/"))
      dirs[:] = []  # a run's own subfolders (tensorboard, tokenizer) hold no runs
  return {"runs": sorted(found["run"]), "models": sorted(found["model"])}


def metrics(workdir: str, since: int = 0) -> tuple[list[dict], int]:
  """(the metrics lines from line `since` on, parsed, the line count read up to): a line being
  written (no newline yet) waits for the next call."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows, n = [], 0
  try:
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if n <= since:
          continue
        if not line.endswith("\n"):
          n -= 1
          break
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict):
          rows.append({k: v for k, v in row.items()
                       if isinstance(v, (int, float)) or k == "note"})
  except OSError:
    return [], since
  return rows, max(n, since)


def _json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def config(workdir: str) -> dict | None:
  return _json(os.path.join(workdir, "config.json"))


def samples(workdir: str) -> list[dict]:
  try:
    with open(os.path.join(workdir, "samples.jsonl")) as f:
      return [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError):
    return []


def summary(root: str, run_id: str) -> dict:
  """What the list of runs shows: status, steps, the last value of each metric."""
  workdir = folder(root, run_id)
  status = run_status.read(workdir)
  last = _last_values(workdir)
  # a run from before status.json: its state is not known
  state = status["state"] if status else "unknown"
  return {"id": run_id, "state": state, "status": status, "last": last,
          "steps": (status or {}).get("steps") or (config(workdir) or {}).get(
              "train", {}).get("steps"),
          "launched": os.path.isfile(os.path.join(workdir, "launch.json"))}


_last: dict[str, tuple[int, int, dict]] = {}  # metrics path -> (size, lines read, last values)


def _last_values(workdir: str) -> dict:
  """The newest value of every metric; only the lines added since the last call are read."""
  path = os.path.join(workdir, "metrics.jsonl")
  try:
    size = os.path.getsize(path)
  except OSError:
    return {}
  seen, upto, last = _last.get(path, (0, 0, {}))
  if size < seen:  # rewritten from the start
    upto, last = 0, {}
  rows, upto = metrics(workdir, upto)
  last = dict(last)
  for row in rows:
    last.update({k: v for k, v in row.items() if k != "note"})
  _last[path] = (size, upto, last)
  return last


def flatten(tree, prefix: str = "") -> dict:
  out = {}
  for k, v in (tree or {}).items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(configs: dict[str, dict | None]) -> dict[str, dict]:
  """key -> {run id: value} for every config key whose value differs between the runs."""
  flat = {run: flatten(c) for run, c in configs.items()}
  keys = sorted(set().union(*[set(f) for f in flat.values()])) if flat else []
  out = {}
  for key in keys:
    values = {run: f.get(key) for run, f in flat.items()}
    if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
      out[key] = values
  return out
