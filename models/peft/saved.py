"""The project's own adapter folder: any PEFT method's adapters, where Hugging Face PEFT has no
format for them (Houlsby adapters, AdapterDrop, AdapterFusion, MAM, UniPELT) or as well.

    adapters.safetensors  every array under params["peft"], named by its path in the tree
                          ("adapter/mlp/down"), as our layout stores it (layer axis first)
    adapters.json         {"format": "jaxtrain-adapters", "version": 1, "peft": the run config's
                          peft section, "model": the ModelConfig's fields (the base's shape)}

    files = write(folder, peft_section, model_fields, adapters, dtype)   # trainer.export
    peft_section, model_fields, adapters = read(folder)                  # numpy arrays

`trainer.export --format=adapters` writes one; `trainer.generate --hf=BASE --adapters=DIR`
samples from a base model with one; `peft.fusion_adapters` (AdapterFusion's second stage) reads
several of method `adapter`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from models import safetensors_io

WEIGHTS, CONFIG = "adapters.safetensors", "adapters.json"
FORMAT, VERSION = "jaxtrain-adapters", 1


def _flat(tree, prefix=""):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", v


def write(folder: str, peft_section: dict, model_fields: dict, adapters: dict,
          dtype=np.float32) -> list[str]:
  """Write the adapters (floating arrays in `dtype`) and their description into `folder`."""
  def cast(a):
    return a.astype(dtype) if np.issubdtype(np.dtype(a.dtype), np.floating) else a
  tensors = [(name, cast(a)) for name, a in _flat(adapters)]
  safetensors_io.write(os.path.join(folder, WEIGHTS), tensors, {"format": FORMAT})
  with open(os.path.join(folder, CONFIG), "w") as f:
    json.dump({"format": FORMAT, "version": VERSION, "peft": peft_section,
               "model": model_fields}, f, indent=1)
  return [WEIGHTS, CONFIG]


def read(folder: str) -> tuple[dict, dict, dict]:
  """(peft section, model fields, adapters as nested dicts of numpy arrays); ValueError naming
  the file when it is not such a folder."""
  path = os.path.join(folder, CONFIG)
  try:
    with open(path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{folder} has no {CONFIG}: not an adapter folder trainer.export "
                     "--format=adapters wrote") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{path}: not a {FORMAT} description")
  if meta.get("version") != VERSION:
    raise ValueError(f"{path}: version {meta.get('version')}; this reader knows {VERSION}")
  for key in ("peft", "model"):
    if not isinstance(meta.get(key), dict):
      raise ValueError(f"{path}: key {key!r} missing or not an object")
  try:
    tensors = safetensors_io.SafetensorsFile(os.path.join(folder, WEIGHTS))
    adapters: dict = {}
    for name in tensors.names():
      node = adapters
      *parents, leaf = name.split("/")
      for k in parents:
        node = node.setdefault(k, {})
      node[leaf] = np.array(tensors.get(name))
  except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
    raise ValueError(f"{os.path.join(folder, WEIGHTS)}: unreadable ({e})") from None
  return meta["peft"], meta["model"], adapters
