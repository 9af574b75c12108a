"""Reading and writing .safetensors files with numpy memory maps, bfloat16 included.

The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} (offsets from the end of the header), then the raw little-endian data. Reading maps
the file and hands out views, so loading one tensor never reads the others; writing streams one
tensor at a time. (The `safetensors` package's numpy API has no bfloat16.)
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
  """Lazy access to the tensors of one file: `names()`, `shape(name)`, `get(name)` (a view)."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    self.header, self._start = header, 8 + n
    self._map = None

  def names(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    if self._map is None:
      self._map = np.memmap(self.path, np.uint8, mode="r")
    info = self.header[name]
    dtype = DTYPES.get(info["dtype"])
    if dtype is None:
      raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    raw = self._map[self._start + begin:self._start + end]
    return raw.view(dtype).reshape(info["shape"])


def write(path: str, tensors: Iterable[tuple[str, object]], metadata: dict | None = None):
  """Write (name, array) pairs. Arrays may be lazy (jax arrays, or anything with shape, dtype and
  __array__): the header needs only shapes and dtypes, and each array is brought to host memory
  when its turn comes, so at most one is there at a time."""
  tensors = list(tensors)
  header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
  for name, a in tensors:
    dtype = np.dtype(a.dtype)
    if dtype not in NAMES:
      raise ValueError(f"cannot write {name}: dtype {dtype}")
    nbytes = int(np.prod(a.shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": NAMES[dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, a in tensors:
      f.write(np.ascontiguousarray(np.asarray(a)).tobytes())
  os.replace(tmp, path)
