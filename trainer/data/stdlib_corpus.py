"""The embedded default corpus: the Python standard library's own source code and docstrings.

Every machine that runs this project has it (it ships with the interpreter), it is real text
written by people, and it needs no network. Files are split into train and held-out eval by a
hash of their path, so the split is stable and no file is in both.
"""

from __future__ import annotations

import os
import sysconfig
import zlib

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files(root: str | None = None) -> list[str]:
  """Paths of the standard library's .py files (tests and installed packages left out), relative
  to `root`, in a fixed order that mixes packages (sorted by a hash of the path)."""
  root = root or sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
  return sorted(found, key=lambda p: (zlib.crc32(p.encode()), p))


def load_documents(max_chars: int, eval_percent: float,
                   root: str | None = None) -> tuple[list[str], list[str]]:
  """(train_docs, eval_docs): whole files, about `max_chars` characters of train text in all.

  A file goes to eval when crc32(path) % 1000 < eval_percent * 10, so the split does not depend
  on `max_chars`. Eval gets at most max_chars * eval_percent / 100 characters.
  """
  root = root or sysconfig.get_paths()["stdlib"]
  paths = stdlib_files(root)
  if not paths:
    raise FileNotFoundError(f"no Python source files found under {root}")
  train, evals = [], []
  n_train = n_eval = 0
  eval_cap = max_chars * eval_percent / 100
  for rel in paths:
    is_eval = zlib.crc32(rel.encode()) % 1000 < eval_percent * 10
    if (n_eval >= eval_cap) if is_eval else (n_train >= max_chars):
      continue
    with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
      text = f.read()
    if is_eval:
      evals.append(text)
      n_eval += len(text)
    else:
      train.append(text)
      n_train += len(text)
    if n_train >= max_chars and n_eval >= eval_cap:
      break
  return train, evals
