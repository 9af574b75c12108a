"""Reading records from files: jsonl, plain text (files or folders), parquet, ArrayRecord.

`data.train_files` / `data.eval_files` name datasets: a comma-separated list, each entry a path,
a folder or a glob. Each entry is one dataset of a mixture (`data.train_weights`). Records come
back as dicts with the config's field names mapped to ours: `text`, `messages`, or
`prompt`/`chosen`/`rejected`.

Problems in the data are `DataError`s that name the file and line (or record) and what to do.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator

from trainer.errors import UserError

Record = dict[str, Any]
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
FORMATS = ("text", "chat", "preference")


class DataError(UserError):
  """Bad input data: one line that says where."""


def expand(spec: str) -> list[list[str]]:
  """'a.jsonl, dir/, b/*.parquet' -> one sorted file list per comma-separated entry."""
  datasets = []
  for entry in filter(None, (s.strip() for s in spec.split(","))):
    if os.path.isdir(entry):
      files = sorted(os.path.join(d, f) for d, _, fs in os.walk(entry) for f in fs
                     if f.endswith(TEXT_SUFFIXES + (".jsonl", ".parquet", ".arrayrecord")))
    else:
      files = sorted(glob.glob(entry)) if any(c in entry for c in "*?[") else (
          [entry] if os.path.exists(entry) else [])
    if not files:
      raise DataError(f"no data files match {entry!r}")
    datasets.append(files)
  return datasets


def _jsonl(path: str, skip_bad: bool, stats: dict) -> Iterator[Record]:
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError("not a JSON object")
      except ValueError as e:
        if skip_bad:
          stats["bad_records"] = stats.get("bad_records", 0) + 1
          continue
        raise DataError(f"{path}:{n}: malformed JSON line ({e}); fix it or set "
                        "data.skip_bad_records=True") from None
      yield record


def _parquet(path: str) -> Iterator[Record]:
  import pyarrow.parquet as pq
  yield from pq.read_table(path).to_pylist()


def _arrayrecord(path: str, skip_bad: bool, stats: dict, text_key: str) -> Iterator[Record]:
  """Each record is a UTF-8 JSON object (as the jsonl lines) or plain text."""
  from grain.sources import ArrayRecordDataSource
  source = ArrayRecordDataSource([path])
  for i in range(len(source)):
    raw = source[i].decode("utf-8", errors="replace")
    if raw.lstrip().startswith("{"):
      try:
        yield json.loads(raw)
        continue
      except ValueError:
        if not skip_bad:
          raise DataError(f"{path}: record {i}: malformed JSON; fix it or set "
                          "data.skip_bad_records=True") from None
        stats["bad_records"] = stats.get("bad_records", 0) + 1
        continue
    yield {text_key: raw}


def read_files(files: list[str], skip_bad: bool, stats: dict,
               text_key: str = "text") -> Iterator[tuple[str, Record]]:
  """(path, record) for every record; plain text (a whole file, or a non-JSON ArrayRecord
  record) comes as {text_key: text}."""
  for path in files:
    if path.endswith(".jsonl"):
      records = _jsonl(path, skip_bad, stats)
    elif path.endswith(".parquet"):
      records = _parquet(path)
    elif path.endswith(".arrayrecord"):
      records = _arrayrecord(path, skip_bad, stats, text_key)
    else:
      with open(path, encoding="utf-8", errors="replace") as f:
        records = iter([{text_key: f.read()}])
    for record in records:
      yield path, record


def normalize(record: Record, fmt: str, fields: dict[str, str], where: str) -> Record:
  """Map the config's field names to ours and check the record has what the format needs."""
  def get(ours: str):
    theirs = fields.get(ours, ours)
    if theirs not in record:
      raise DataError(f"{where}: record has no field {theirs!r} (set data.{ours}_field to the "
                      f"name your data uses; fields present: {', '.join(sorted(record))})")
    return record[theirs]

  if fmt == "text":
    text = get("text")
    if not isinstance(text, str):
      raise DataError(f"{where}: field {fields.get('text', 'text')!r} is not a string")
    return {"text": text}
  if fmt == "chat":
    messages = get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages):
      raise DataError(f"{where}: messages must be a list of {{role, content}} objects")
    return {"messages": messages}
  if fmt == "preference":
    return {k: get(k) for k in ("prompt", "chosen", "rejected")}
  raise DataError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")


def load_datasets(spec: str, fmt: str, fields: dict[str, str], skip_bad: bool,
                  stats: dict) -> list[list[Record]]:
  """One list of normalised records per dataset named in `spec`."""
  out = []
  for files in expand(spec):
    records = [normalize(r, fmt, fields, path)
               for path, r in read_files(files, skip_bad, stats, fields.get("text", "text"))]
    if not records:
      raise DataError(f"no records in {', '.join(files)}")
    out.append(records)
  return out
