"""Reading records from files: jsonl, plain text (files or folders), parquet, ArrayRecord,
Arrow IPC (`.arrow`), and Hugging Face `datasets` folders (written by `Dataset.save_to_disk`).

`data.train_files` / `data.eval_files` name datasets: a comma-separated list, each entry a path,
a folder or a glob. Each entry is one dataset of a mixture (`data.train_weights`). A folder is
every data file under it, except that a Hugging Face dataset folder (one holding `state.json`)
is that dataset's `.arrow` shards in its own order and nothing else; a `DatasetDict` folder
(`dataset_dict.json`) is refused, wherever it is met, until one split is named (`folder/train`),
for its splits together would mix test data into training. The folders are read with pyarrow
alone, not the `datasets` package. Records come
back as dicts with the config's field names mapped to ours: `text`, `messages`, or
`prompt`/`chosen`/`rejected`. A plain-text file holds many documents, cut per `data.text_split`
(by default a blank line ends one), so that `data.eval_percent` can hold some out.

Problems in the data are `DataError`s that name the file and line (or record) and what to do.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from grain.sources import ArrayRecordDataSource

from trainer.data import templates
from trainer.errors import UserError

Record = dict[str, Any]
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
CODE_SUFFIXES = (".py",)  # whole files under text_split=blank_line
FORMATS = ("text", "chat", "preference")
TEXT_SPLITS = ("blank_line", "line", "file")  # how a plain-text file is cut into documents
RECORD_SUFFIXES = (".jsonl", ".parquet", ".arrayrecord", ".arrow")
ARROW_ROWS = 1024  # rows made into Python dicts at a time: a shard's batch may hold many more


class DataError(UserError):
  """Bad input data: one line that says where."""


class BadRecord(DataError):
  """A fault in one record, named by file:line (or row, or record): `data.skip_bad_records`
  skips and counts it."""


def _hf_dataset(folder: str) -> list[str]:
  """A Hugging Face dataset folder's `.arrow` shards in the order `state.json` lists them (the
  order of its rows), which a sort of the names need not keep."""
  state_path = os.path.join(folder, "state.json")
  try:
    with open(state_path, encoding="utf-8") as f:
      names = [d["filename"] for d in json.load(f)["_data_files"]]
  except OSError as e:
    raise DataError(f"{state_path}: cannot read it ({e.strerror})") from None
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{state_path}: not a Hugging Face dataset state (no _data_files list of "
                    f"{{filename}} objects: {one_line(e)}); save the dataset again with "
                    "Dataset.save_to_disk") from None
  files = [os.path.join(folder, str(name)) for name in names]
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise DataError(f"{state_path}: lists {missing[0]}, which is not there"
                    + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
  return files


def _refuse_dataset_dict(folder: str) -> None:
  """A DatasetDict holds splits (train, test, ...): reading them all as one dataset would train
  on the test split, so the user names one."""
  try:
    with open(os.path.join(folder, "dataset_dict.json"), encoding="utf-8") as f:
      splits = [str(s) for s in json.load(f)["splits"]]
  except (OSError, ValueError, KeyError, TypeError):
    splits = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  example = os.path.join(folder, splits[0] if splits else "train")
  raise DataError(f"{folder}: is a Hugging Face DatasetDict with splits "
                  f"{', '.join(splits) or '(none)'}; name one split as the dataset, e.g. "
                  f"{example}")


def _walk(folder: str) -> list[str]:
  """The data files under `folder` in path order; a Hugging Face dataset folder met on the way
  counts as its shards in its own order (and nothing else in it), a DatasetDict is refused."""
  found: list[tuple[str, list[str]]] = []  # (where it sorts, its files)
  for d, subdirs, fs in os.walk(folder):
    if "dataset_dict.json" in fs:
      _refuse_dataset_dict(d)
    if "state.json" in fs:
      found.append((os.path.join(d, ""), _hf_dataset(d)))
      subdirs.clear()  # the dataset is its shards alone
      continue
    found += [(p, [p]) for p in (os.path.join(d, f) for f in fs)
              if p.endswith(TEXT_SUFFIXES + RECORD_SUFFIXES)]
  return [f for _, files in sorted(found) for f in files]


def expand(spec: str) -> list[list[str]]:
  """'a.jsonl, dir/, b/*.parquet' -> one file list per comma-separated entry (sorted, but for a
  Hugging Face dataset's shards, which keep its order)."""
  datasets = []
  for entry in filter(None, (s.strip() for s in spec.split(","))):
    if os.path.isdir(entry):
      files = _walk(entry)
    else:
      files = sorted(glob.glob(entry)) if any(c in entry for c in "*?[") else (
          [entry] if os.path.exists(entry) else [])
    if not files:
      raise DataError(f"no data files match {entry!r}")
    datasets.append(files)
  return datasets


def one_line(e: BaseException) -> str:
  """An exception's message on one line (a user error is one line on stderr)."""
  return " ".join(str(e).split()) or type(e).__name__


def _short(value: Any, n: int = 40) -> str:
  """repr() cut to n characters: a bad value quoted in a message may be megabytes long."""
  text = repr(value)
  return text if len(text) <= n else text[:n] + "..."


def _kind(value: Any) -> str:
  """What a JSON value is, in JSON's words."""
  if isinstance(value, bool):
    return "a boolean"
  if isinstance(value, (int, float)):
    return "a number"
  return {str: "a string", list: "a list", dict: "an object"}.get(type(value), "null" if value
                                                                   is None else type(value).__name__)


def _open_text(path: str):
  """The file, opened binary; a file with NUL bytes in its first 8 KiB is refused whole."""
  try:
    f = open(path, "rb")
  except OSError as e:
    raise DataError(f"{path}: cannot read it ({e.strerror})") from None
  head = f.read(8192)
  f.seek(0)
  if b"\0" in head:
    f.close()
    raise DataError(f"{path}: holds NUL bytes, so it is binary or not UTF-8 text (UTF-16?); "
                    "give UTF-8 text files or leave this one out")
  return f


def _decode(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRecord(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}); re-encode the file as UTF-8") from None


def _json_object(text: str, where: str) -> Record:
  try:
    record = json.loads(text)
  except (ValueError, RecursionError) as e:
    raise BadRecord(f"{where}: malformed JSON line ({one_line(e)})") from None
  if not isinstance(record, dict):
    raise BadRecord(f"{where}: malformed JSON line ({_kind(record)}, not a JSON object)")
  return record


# Readers yield (where, record) for every record of one file; a record that cannot be read
# comes as the BadRecord that says why, so that `read_files` decides whether to skip it. A fault
# of the whole file (unreadable, binary) is a DataError raised at once.


def _jsonl(path: str, offset: int = 0, line: int = 1) -> Iterator[tuple[str, Record | BadRecord]]:
  """From the record at byte `offset` (line number `line`) on."""
  with _open_text(path) as f:
    f.seek(offset)
    for n, raw in enumerate(f, line):
      if not raw.strip():
        continue
      where = f"{path}:{n}"
      try:
        text = _decode(raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw, where)  # a BOM
        yield where, _json_object(text, where)
      except BadRecord as e:
        yield where, e


def _blocks(path: str, split: str, offset: int = 0,
            line: int = 1) -> Iterator[tuple[int, int, list[bytes]]]:
  """(first line, byte offset, raw lines) of each document of a text file per `split`, from the
  document at byte `offset` (line `line`) on. The lines come only when `split` needs them."""
  block: list[bytes] = []
  start = start_at = 0
  with _open_text(path) as f:
    f.seek(offset)
    at = offset
    for n, raw in enumerate(f, line):
      here, at = at, at + len(raw)
      if split != "file" and not raw.strip():  # a blank line: the end of a document
        if block:
          yield start, start_at, block
        block = []
        continue
      if not block:
        start, start_at = n, here
      block.append(raw)
      if split == "line":
        yield start, start_at, block
        block = []
  if block:
    yield start, start_at, block


def text_split_of(path: str, split: str) -> str:
  """Source code (`.py`) is one document per file under `blank_line`: its blank lines part
  statements, not texts."""
  return "file" if split == "blank_line" and path.endswith(CODE_SUFFIXES) else split


def _text(path: str, split: str, text_key: str, offset: int = 0,
          line: int = 1) -> Iterator[tuple[str, Record | BadRecord]]:
  """Documents of a plain-text file per `split` (TEXT_SPLITS): `blank_line` ends a document at
  every line that is empty or all whitespace; `line` makes each non-blank line a document;
  `file` makes the whole file one (`text_split_of`). A document's where is its first line."""
  split = text_split_of(path, split)
  for start, _, lines in _blocks(path, split, offset, line):
    where = f"{path}:{start}"
    try:  # a fault names the document's first undecodable line
      text = "".join(_decode(raw, f"{path}:{start + k}") for k, raw in enumerate(lines))
    except BadRecord as e:
      yield where, e
      continue
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # as Python's text mode reads it
    yield where, {text_key: text if split == "file" else text.removesuffix("\n")}


def _parquet(path: str, first: int = 0) -> Iterator[tuple[str, Record | BadRecord]]:
  """Rows from `first` on, a row group at a time (a big file is never read whole)."""
  try:
    f = pq.ParquetFile(path)
    sizes = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
  except Exception as e:  # noqa: BLE001 -- whatever pyarrow says, the file is the user's
    raise DataError(f"{path}: cannot read it as parquet ({one_line(e)})") from None
  at = 0
  for g, size in enumerate(sizes):
    if at + size > first:
      try:
        rows = f.read_row_group(g).to_pylist()
      except Exception as e:  # noqa: BLE001 -- as above
        raise DataError(f"{path}: cannot read it as parquet ({one_line(e)})") from None
      for i in range(max(first - at, 0), size):
        yield f"{path}: row {at + i}", rows[i]
    at += size


def _arrow_batches(source: pa.MemoryMappedFile) -> Iterator[pa.RecordBatch]:
  """The record batches of an Arrow IPC file, one at a time: the stream format (what
  `datasets` writes) or the random-access file format (it begins with the magic ARROW1)."""
  if source.read(6) == b"ARROW1":
    source.seek(0)
    reader = pa.ipc.open_file(source)
    for k in range(reader.num_record_batches):
      yield reader.get_batch(k)
  else:
    source.seek(0)
    yield from pa.ipc.open_stream(source)


def _arrow(path: str, first: int = 0) -> Iterator[tuple[str, Record | BadRecord]]:
  """Rows of an Arrow IPC file (a Hugging Face dataset's shard) from `first` on, as dicts, as
  parquet's are. The file is memory-mapped and read a batch at a time, so memory stays flat
  however big it is; batches before `first` are skipped undecoded."""
  i = 0
  try:
    with pa.memory_map(path) as source:
      for batch in _arrow_batches(source):
        for start in range(max(first - i, 0), batch.num_rows, ARROW_ROWS):
          for k, record in enumerate(batch.slice(start, ARROW_ROWS).to_pylist()):
            yield f"{path}: row {i + start + k}", record
        i += batch.num_rows
  except (OSError, pa.ArrowException) as e:  # not Arrow IPC, cut short, or corrupt
    after = f" after row {i - 1}" if i else ""
    raise DataError(f"{path}: cannot read it as Arrow IPC{after} ({one_line(e)})") from None


def _arrow_rows(path: str) -> int:
  try:
    with pa.memory_map(path) as source:
      return sum(batch.num_rows for batch in _arrow_batches(source))
  except (OSError, pa.ArrowException) as e:
    raise DataError(f"{path}: cannot read it as Arrow IPC ({one_line(e)})") from None


def _arrayrecord(path: str, text_key: str,
                 first: int = 0) -> Iterator[tuple[str, Record | BadRecord]]:
  """Each record is a UTF-8 JSON object (as the jsonl lines) or plain text."""
  try:
    source = ArrayRecordDataSource([path])
    count = len(source)
  except Exception as e:  # noqa: BLE001 -- as for parquet
    raise DataError(f"{path}: cannot read it as ArrayRecord ({one_line(e)})") from None
  for i in range(first, count):
    where = f"{path}: record {i}"
    try:
      raw = _decode(source[i], where)
      yield where, _json_object(raw, where) if raw.lstrip().startswith("{") else {text_key: raw}
    except BadRecord as e:
      yield where, e


@dataclasses.dataclass(frozen=True)
class Span:
  """Records `first` .. `first + count - 1` of one file (count -1: to its end). In a line-based
  file (jsonl, plain text) record `first` starts at byte `offset`, on line `line`."""
  path: str
  first: int = 0
  count: int = -1
  offset: int = 0
  line: int = 1


def _file_records(span: Span, fmt: str, text_key: str,
                  text_split: str) -> Iterator[tuple[str, Record | BadRecord]]:
  path = span.path
  if path.endswith(".jsonl"):
    records = _jsonl(path, span.offset, span.line)
  elif path.endswith(".parquet"):
    records = _parquet(path, span.first)
  elif path.endswith(".arrayrecord"):
    records = _arrayrecord(path, text_key, span.first)
  elif path.endswith(".arrow"):
    records = _arrow(path, span.first)
  elif fmt == "text":
    records = _text(path, text_split, text_key, span.offset, span.line)
  else:  # e.g. a .json file holding a list
    raise DataError(f"{path}: is read as plain text, but data.format={fmt} needs records with "
                    "fields: give .jsonl (a JSON object per line), .parquet, .arrayrecord or "
                    ".arrow")
  return records if span.count < 0 else itertools.islice(records, span.count)


def read_spans(spans: Sequence[Span], fmt: str, fields: dict[str, str], skip_bad: bool,
               stats: dict, text_split: str = "blank_line") -> Iterator[tuple[int, Record]]:
  """(k, record) for every good record of `spans`, normalised (`normalize`); k counts every
  record read, bad ones included, so that it names the same record however many are bad. Plain
  text (documents of a text file, a non-JSON ArrayRecord record) comes as {text field: text}.

  A fault in one record (not JSON, not UTF-8, a missing field, a wrong type, an unknown role)
  stops the run naming file:line, or with `skip_bad` is skipped and counted in
  stats["bad_records"] (the first one's message in stats["first_bad_record"]).
  """
  text_key = fields.get("text", "text")
  k = -1
  for span in spans:
    for where, record in _file_records(span, fmt, text_key, text_split):
      k += 1
      try:
        if isinstance(record, BadRecord):
          raise record
        yield k, normalize(record, fmt, fields, where)
      except BadRecord as e:
        if not skip_bad:
          raise DataError(f"{e}; fix it or set data.skip_bad_records=True") from None
        stats["bad_records"] = stats.get("bad_records", 0) + 1
        stats.setdefault("first_bad_record", str(e))


def read_files(files: list[str], fmt: str, fields: dict[str, str], skip_bad: bool, stats: dict,
               text_split: str = "blank_line") -> Iterator[tuple[int, Record]]:
  """`read_spans` over whole files."""
  return read_spans([Span(p) for p in files], fmt, fields, skip_bad, stats, text_split)


def spans(path: str, fmt: str, text_split: str, every: int) -> list[Span]:
  """The file cut into spans of `every` records (the last may hold fewer), found by reading it
  once without parsing a record: line-based files by their lines, the others by their
  metadata. An empty file has no span."""
  if path.endswith((".parquet", ".arrayrecord", ".arrow")):
    try:
      n = (pq.ParquetFile(path).metadata.num_rows if path.endswith(".parquet") else
           _arrow_rows(path) if path.endswith(".arrow") else len(ArrayRecordDataSource([path])))
    except DataError:
      raise
    except Exception as e:  # noqa: BLE001 -- the file is the user's
      raise DataError(f"{path}: cannot read it ({one_line(e)})") from None
    return [Span(path, s, min(every, n - s)) for s in range(0, n, every)]
  if path.endswith(".jsonl"):
    starts = _jsonl_starts(path)
  elif fmt == "text":
    starts = ((line, at) for line, at, _ in _blocks(path, text_split_of(path, text_split)))
  else:
    _file_records(Span(path), fmt, "text", text_split)  # raises what read_spans would
    return []
  out = []
  for k, (line, at) in enumerate(starts):
    if k % every == 0:
      out.append([k, 0, at, line])
    out[-1][1] += 1
  return [Span(path, first, count, at, line) for first, count, at, line in out]


def _jsonl_starts(path: str) -> Iterator[tuple[int, int]]:
  """(line, byte offset) of every non-blank line: where `_jsonl` finds a record."""
  with _open_text(path) as f:
    at = 0
    for n, raw in enumerate(f, 1):
      if raw.strip():
        yield n, at
      at += len(raw)


def _check_messages(messages: Any, where: str, what: str) -> None:
  if not isinstance(messages, list):
    raise BadRecord(f"{where}: {what} is {_kind(messages)}, not a list of {{role, content}} "
                    "objects")
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise BadRecord(f"{where}: {what}[{k}] is not a {{role, content}} object: {_short(m)}")
    if m["role"] not in templates.ROLES:
      raise BadRecord(f"{where}: {what}[{k}] has role {_short(m['role'])}, not one of "
                      f"{', '.join(templates.ROLES)}")
    if not isinstance(m["content"], str):
      raise BadRecord(f"{where}: {what}[{k}] content is {_kind(m['content'])}, not a string")


def normalize(record: Record, fmt: str, fields: dict[str, str], where: str) -> Record:
  """Map the config's field names to ours and check the record has what the format needs
  (a fault is a BadRecord naming `where`)."""
  def get(ours: str):
    theirs = fields.get(ours, ours)
    if theirs not in record:
      present = sorted(str(k)[:30] for k in record)
      listed = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "")
      raise BadRecord(f"{where}: record has no field {theirs!r} (set data.{ours}_field to the "
                      f"name your data uses; fields present: {listed})")
    return record[theirs]

  if fmt == "text":
    text = get("text")
    if not isinstance(text, str):
      raise BadRecord(f"{where}: field {fields.get('text', 'text')!r} is {_kind(text)}, not a "
                      "string")
    return {"text": text}
  if fmt == "chat":
    messages = get("messages")
    _check_messages(messages, where, fields.get("messages", "messages"))
    return {"messages": messages}
  if fmt == "preference":
    out = {k: get(k) for k in ("prompt", "chosen", "rejected")}
    for k, value in out.items():  # a string, or a conversation (TRL's format)
      if not isinstance(value, (str, list)):
        raise BadRecord(f"{where}: {fields.get(k, k)} is {_kind(value)}, not a string or a list "
                        "of {role, content} objects")
      if isinstance(value, list):
        _check_messages(value, where, fields.get(k, k))
    return out
  raise DataError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}")


def load_datasets(spec: str, fmt: str, fields: dict[str, str], skip_bad: bool,
                  stats: dict, text_split: str = "blank_line",
                  numbered: bool = False) -> list[list[Record]]:
  """One list of normalised records per dataset named in `spec`; `numbered`: of (k, record)
  pairs, k as `read_spans` counts."""
  out = []
  for files in expand(spec):
    bad_before = stats.get("bad_records", 0)
    records = [x if numbered else x[1]
               for x in read_files(files, fmt, fields, skip_bad, stats, text_split)]
    if not records:
      bad = stats.get("bad_records", 0) - bad_before
      skipped = f" ({bad} bad records skipped, the first: {stats['first_bad_record']})" if bad else ""
      raise DataError(f"no records in {', '.join(files)}{skipped}")
    out.append(records)
  return out
