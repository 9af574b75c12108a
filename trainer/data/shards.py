"""Tokenized examples on disk: ArrayRecord shards and the manifest that says what they hold.

A prepared folder (`python -m trainer.data.prepare`) looks like

  DIR/manifest.json                 written last: a folder without one is unfinished
  DIR/tokenizer.model               (or tokenizer.json) the tokenizer the ids belong to
  DIR/train-d0-00000.arrayrecord    the examples of one piece of work ("task"), one per record
  DIR/train-d0-00000.lengths.npy    their token counts, so packing plans without reading them
  DIR/train-d0-00000.task.json      the task's summary; its presence says the task is complete

Files are written under a `.tmp` name of their writer's own and renamed into place, the summary
last, so a killed prepare leaves no half-written shard that looks whole. A record is a few flat arrays (no
pickle): `encode` lays them out as a small header (count, then dtype code and length of each)
followed by their bytes. A text or chat example is (ids int32, loss mask uint8); a preference
pair is (prompt ids, chosen ids, chosen mask, rejected ids, rejected mask), as `pairs.Pair`
takes them.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import struct
import threading
from typing import Any, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from grain.sources import ArrayRecordDataSource

from trainer.data import pairs, templates
from trainer.data.sources import DataError, one_line
from trainer.data.tokenizer import HFTokenizer

MANIFEST = "manifest.json"
VERSION = 1
WRITER_OPTIONS = "group_size:1,zstd:1"  # a record per chunk: a random read decodes one record;
# zstd level 1 writes 7 times faster than the default 3 and, on token ids, as small
_DTYPES = (np.dtype(np.int32), np.dtype(np.uint8))
SPLITS = ("train", "eval")
HISTOGRAM_EDGES = [2 ** k for k in range(1, 21)]  # token counts: <2, 2-3, 4-7, ..., >= 2^20


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


def encode(arrays: Sequence[np.ndarray]) -> bytes:
  head = [struct.pack("<I", len(arrays))]
  for a in arrays:
    head.append(struct.pack("<BI", _DTYPES.index(a.dtype), a.size))
  return b"".join(head + [np.ascontiguousarray(a).tobytes() for a in arrays])


def decode(raw: bytes) -> list[np.ndarray]:
  (n,), at = struct.unpack_from("<I", raw), 4
  kinds = []
  for _ in range(n):
    kinds.append(struct.unpack_from("<BI", raw, at))
    at += 5
  out = []
  for code, size in kinds:
    dtype = _DTYPES[code]
    out.append(np.frombuffer(raw, dtype, size, at))
    at += size * dtype.itemsize
  return out


def example_arrays(example) -> list[np.ndarray]:
  """A tokenized example (ids and mask, or a `pairs.Pair`) as the arrays of its record."""
  if isinstance(example, pairs.Pair):
    prompt, chosen, chosen_mask, rejected, rejected_mask = example.parts
    return [np.asarray(prompt, np.int32), np.asarray(chosen, np.int32),
            np.asarray(chosen_mask, np.uint8), np.asarray(rejected, np.int32),
            np.asarray(rejected_mask, np.uint8)]
  ids, mask = example
  return [np.asarray(ids, np.int32), np.asarray(mask, np.uint8)]


def length(example) -> int:
  """What packing counts: an example's tokens, a pair's positions + 1 (`pairs.Pair`)."""
  return len(example) if isinstance(example, pairs.Pair) else len(example[0])


def tokens(example) -> int:
  """Token ids the example holds (a pair: its prompt and both answers)."""
  if isinstance(example, pairs.Pair):
    return sum(len(example.parts[k]) for k in (0, 1, 3))
  return len(example[0])


# ----------------------------------------------------------------------------------------------
# Fingerprints: what the ids mean
# ----------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash of the tokenizer's serialized model and its BOS/EOS ids."""
  h = hashlib.sha256()
  h.update(tokenizer.tok.to_str().encode() if isinstance(tokenizer, HFTokenizer)
           else tokenizer.proto)
  h.update(json.dumps([tokenizer.bos_id, tokenizer.eos_id, tokenizer.affixes]).encode())
  return "tok-" + h.hexdigest()[:16]


_PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
          {"role": "assistant", "content": "A"}]


def template_fingerprint(template: templates.Template | None) -> str:
  """The template's name and a hash of how it renders a probe conversation; "" for text."""
  if template is None:
    return ""
  rendered = template.render(_PROBE) + template.render(_PROBE[:2], add_generation_prompt=True)
  return f"{template.name}-" + hashlib.sha256(json.dumps(rendered).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def shard_name(split: str, dataset: int, task: int) -> str:
  return f"{split}-d{dataset}-{task:05d}"


def histogram(lengths: np.ndarray) -> list[int]:
  return np.bincount(np.searchsorted(HISTOGRAM_EDGES, lengths, side="right"),
                     minlength=len(HISTOGRAM_EDGES) + 1).tolist()


def tmp_suffix() -> str:
  """This writer's own temporary name: two writers of one file (a task run twice at once, as a
  runner's speculative execution does) never rename each other's half-written file."""
  return f".{os.getpid()}-{threading.get_ident()}.tmp"


def write_json(path: str, value) -> None:
  """`value` as JSON in `path`, renamed into place once whole."""
  tmp = path + tmp_suffix()
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def write_shard(directory: str, name: str, examples: Sequence[Any]) -> dict[str, Any]:
  """The examples as `name`.arrayrecord and their lengths as `name`.lengths.npy, each renamed
  into place once whole. Returns the shard's entry of the manifest (not yet written)."""
  path = os.path.join(directory, name)
  lengths = np.asarray([length(x) for x in examples], np.int64)
  tmp = tmp_suffix()
  writer = ArrayRecordWriter(path + ".arrayrecord" + tmp, WRITER_OPTIONS)
  for x in examples:
    writer.write(encode(example_arrays(x)))
  writer.close()
  with open(path + ".lengths.npy" + tmp, "wb") as f:
    np.save(f, lengths, allow_pickle=False)
  os.replace(path + ".lengths.npy" + tmp, path + ".lengths.npy")
  os.replace(path + ".arrayrecord" + tmp, path + ".arrayrecord")
  return {"name": name, "examples": len(examples), "tokens": sum(map(tokens, examples)),
          "bytes": os.path.getsize(path + ".arrayrecord"), "histogram": histogram(lengths)}


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_manifest(directory: str, key: str) -> dict[str, Any]:
  """The manifest of a prepared folder, its shards checked against it (present, their sizes
  and example counts as it says); any fault is one line naming `key` and the folder."""
  if not os.path.isdir(directory):
    raise DataError(f"config key {key}: {directory} is not a folder (a prepared folder is what "
                    "python -m trainer.data.prepare --out=DIR writes)")
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise DataError(f"config key {key}: {directory} has no {MANIFEST}: it is not a prepared "
                    "folder, or its prepare did not finish (rerun it: it goes on where it "
                    "stopped)")
  try:
    with open(path) as f:
      manifest = json.load(f)
    splits = {s: manifest["splits"][s] for s in manifest["splits"]}
    version = manifest["version"]
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: not a manifest this version reads ({one_line(e)})") from None
  if version != VERSION:
    raise DataError(f"{path}: manifest version {version}, this version reads {VERSION}; "
                    "prepare the data again")
  for split, datasets in splits.items():
    for dataset in datasets:
      for shard in dataset["shards"]:
        base = os.path.join(directory, shard["name"])
        for suffix in (".arrayrecord", ".lengths.npy"):
          if not os.path.exists(base + suffix):
            raise DataError(f"{path}: lists {base + suffix}, which is missing; prepare the "
                            "data again")
        size = os.path.getsize(base + ".arrayrecord")
        if size != shard["bytes"]:
          raise DataError(f"{base}.arrayrecord: {size} bytes, {MANIFEST} says {shard['bytes']} "
                          "(truncated, or from another prepare); prepare the data again")
  return manifest


class Store:
  """One dataset's examples across its shards, by index: `lengths` (read once, small) and
  `example(i)` (read from disk on demand). Reader threads share it."""

  def __init__(self, directory: str, shards: Sequence[dict], preference: bool):
    self.preference = preference
    self.names = [os.path.join(directory, s["name"]) for s in shards]
    self.counts = [s["examples"] for s in shards]
    self.lengths = np.concatenate(
        [self._lengths(n, c) for n, c in zip(self.names, self.counts)] or [np.zeros(0, np.int64)])
    self.ends = np.cumsum(self.counts).tolist()
    self._source = None

  @staticmethod
  def _lengths(name: str, count: int) -> np.ndarray:
    try:
      lengths = np.load(name + ".lengths.npy", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise DataError(f"{name}.lengths.npy: cannot read it ({one_line(e)}); prepare the data "
                      "again") from None
    if lengths.shape != (count,):
      raise DataError(f"{name}.lengths.npy: holds {lengths.shape[0]} lengths, {MANIFEST} says "
                      f"{count} examples; prepare the data again")
    return lengths

  def source(self) -> ArrayRecordDataSource:
    if self._source is None:
      try:
        self._source = ArrayRecordDataSource([n + ".arrayrecord" for n in self.names])
        n = len(self._source)
      except Exception as e:  # noqa: BLE001 -- a damaged shard, whatever the reader says
        raise DataError(f"{os.path.dirname(self.names[0])}: cannot read its shards "
                        f"({one_line(e)}); prepare the data again") from None
      if n != len(self.lengths):
        raise DataError(f"{os.path.dirname(self.names[0])}: its shards hold {n} examples, "
                        f"{MANIFEST} says {len(self.lengths)}; prepare the data again")
    return self._source

  def __len__(self) -> int:
    return len(self.lengths)

  def example(self, i: int):
    """(ids, mask) as float32, or a `pairs.Pair`."""
    try:
      arrays = decode(self.source()[i])
    except DataError:
      raise
    except Exception as e:  # noqa: BLE001 -- as in `source`
      shard = self.names[bisect.bisect_right(self.ends, i)]
      raise DataError(f"{shard}.arrayrecord: cannot read example {i} ({one_line(e)}); prepare "
                      "the data again") from None
    if self.preference:
      return pairs.Pair(*arrays)
    return arrays[0], arrays[1].astype(np.float32)
