"""From config to batches: records -> tokens (+ chat template and loss mask) -> packed rows ->
grain batches.

Everything is deterministic and random-access. Examples are tokenized once; each epoch shuffles
them (and draws the mixture of datasets by weight) with a seed derived from (seed, epoch), packs
them into rows, and row i of the endless stream is found by its epoch. The iterator's whole state
is therefore one integer, saved with every checkpoint, and process p of P reads rows p, p+P, ...
only: together the processes' batches hold exactly the single-process batch.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import os
import threading
import zlib
from typing import Any, Sequence

import grain
import numpy as np

from trainer.data import packing, pairs, shards, sources, stdlib_corpus, templates
from trainer.data import tokenizer as tokenizer_lib
from trainer.data.sources import DataError
from trainer.seeds import fold_seed

_ENDLESS = 2**62


# ----------------------------------------------------------------------------------------------
# Records -> examples
# ----------------------------------------------------------------------------------------------


def tokenize(records: Sequence[dict[str, Any]], fmt: str, tokenizer,
             template: templates.Template | None) -> tuple[list, list]:
  """Text: the text with what the tokenizer's rules add around it (`affixes`: BOS for ours and
  for Llama 3 or Gemma folders, nothing for Qwen2), then EOS unless that already ends it: the
  model learns where a document stops. Every token is learned. Chat: the template, assistant
  turns learned. Preference: `pairs.Pair`s (as the ids; no masks)."""
  if fmt == "text":
    encoded = tokenizer.encode_batch([r["text"] for r in records], add_special=True)
    end = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    ids = [np.asarray(e if e[-1:] == end else [*e, *end], np.int32) for e in encoded]
    masks = [(np.arange(len(x)) > 0).astype(np.float32) for x in ids]  # the first is no target
    return ids, masks
  if fmt == "chat":
    out = [templates.encode_chat(template, tokenizer, r["messages"]) for r in records]
    return [i for i, _ in out], [m for _, m in out]
  if fmt == "preference":
    return pairs.tokenize_pairs(records, tokenizer, template), [None] * len(records)
  raise DataError(f"data.format={fmt!r} is not one of {', '.join(sources.FORMATS)}")


class InMemory:
  """One dataset's tokenized examples, held in memory; `shards.Store` is its twin on disk, with
  the same `lengths`, `preference`, `example(i)` and len()."""

  def __init__(self, ids: list, masks: list):
    self.ids, self.masks = ids, masks
    self.lengths = np.array([len(x) for x in ids], np.int64)
    self.preference = bool(ids) and isinstance(ids[0], pairs.Pair)

  def __len__(self) -> int:
    return len(self.ids)

  def example(self, i: int):
    """(ids, mask), or a `pairs.Pair`."""
    return self.ids[i] if self.preference else (self.ids[i], self.masks[i])


class Examples:
  """The examples of several datasets under one index (dataset after dataset)."""

  def __init__(self, datasets: Sequence[InMemory | shards.Store]):
    self.datasets = datasets
    self.starts = np.cumsum([0] + [len(d) for d in datasets]).tolist()
    # the examples' token counts: the one place they are read (all else uses this array)
    self.lengths = np.concatenate([d.lengths for d in datasets] or [np.zeros(0, np.int64)])

  def __len__(self) -> int:
    return self.starts[-1]

  def __getitem__(self, ex: int):
    d = bisect.bisect_right(self.starts, ex) - 1
    return self.datasets[d].example(int(ex) - self.starts[d])

  def each(self):
    for d in self.datasets:
      for i in range(len(d)):
        yield d.example(i)


class PackedRows:
  """Row i of an endless stream of epochs; each epoch is the mixture of the datasets' pieces,
  shuffled, packed. Callable on a row index (a grain map function).

  Pieces and plans are numpy arrays (packing.Rows; packing.Stream for concat), and only the
  last `KEEP` epochs' plans are kept: an epoch is a pure function of (seed, epoch), so one asked
  for again is planned again, and memory does not grow with the epochs a long run goes through."""

  KEEP = 2

  def __init__(self, datasets: Sequence[InMemory | shards.Store | tuple], weights: Sequence[float], seq_len: int,
               mode: str, truncation: str, seed: int, shuffle: bool, group: int, stats: dict,
               name: str = "data"):
    """`name` says which split and files these are, for the error when none of their
    positions carries a loss weight."""
    datasets = [InMemory(*d) if isinstance(d, tuple) else d for d in datasets]
    self.examples = Examples(datasets)
    self.preference = any(d.preference for d in datasets)
    if self.preference:  # whole pairs only, placed best-fit
      mode = "greedy" if mode == "concat" else mode
      truncation = "drop"
    self.reference = None  # preference: (pairs, 2) precomputed reference log-probs
    self.seq_len, self.mode, self.seed, self.shuffle, self.group = seq_len, mode, seed, shuffle, group
    self.lengths = self.examples.lengths
    self.pieces = []  # per dataset, a (k, 3) array with global example indices
    for d, start in zip(datasets, self.examples.starts):
      fitted = packing.fit_examples(d.lengths, seq_len, truncation, stats)
      fitted[:, 0] += start
      self.pieces.append(fitted)
    why = self._nothing_to_learn(truncation, stats)
    if why:
      raise DataError(f"{name}: nothing to learn: {why}")
    w = np.asarray(weights, np.float64)
    total = sum(len(p) for p in self.pieces)
    self.counts = [int(round(total * x / w.sum())) if len(p) else 0
                   for x, p in zip(w, self.pieces)]
    self.plans: dict[int, packing.Rows | packing.Stream] = {}  # the last KEEP used, latest last
    self.starts = [0]  # first global row of each epoch planned so far
    # grain's reader threads call rows concurrently; epochs are planned lazily, and two threads
    # planning the same epoch once appended it twice (a run's data past the second epoch then
    # depended on thread timing: sft_chat diverged at step 110). One planner at a time.
    self._planning = threading.Lock()

  def _nothing_to_learn(self, truncation: str, stats: dict) -> str:
    """Why no position of the rows has a loss weight (then every loss would read 0.0000);
    "" when one has. The first weighted piece ends the search."""
    def weighted(ex: int, start: int, end: int) -> bool:  # a piece's targets are start+1..end-1
      x = self.examples[ex]
      return bool(x.weights.any() if self.preference else x[1][start + 1:end].any())
    if any(weighted(*p) for p in self._each_piece()):
      return ""
    if not self.preference and not any(m[1:].any() for _, m in self.examples.each()):
      return ("no record has an assistant turn (data.format=chat learns the assistant replies "
              "only)")
    fit = packing.length_to_fit(self.lengths, 0.95)
    hint = f"raise train.seq_len ({fit} would fit 95% of the examples)"
    if not any(len(p) for p in self.pieces):
      counts = [f"{stats[k]} {what}" for k, what in (
          ("too_short", "have fewer than 2 tokens"),
          ("dropped", f"are longer than train.seq_len={self.seq_len} (" + (
              "a pair is never split)" if self.preference else "data.truncation=drop)")))
          if stats.get(k)]
      return f"no example is left: {', '.join(counts)}" + (f"; {hint}" if stats.get("dropped") else "")
    if truncation == "drop":
      return (f"every example with an assistant reply is longer than train.seq_len={self.seq_len} "
              f"and data.truncation=drop leaves it out; {hint}")
    return (f"every assistant reply lies beyond the first train.seq_len={self.seq_len} tokens of "
            f"its example, which data.truncation={truncation} keeps; {hint}")

  def _each_piece(self):
    """Every piece as plain ints, a block at a time (a million tuples are never made at once)."""
    for pieces in self.pieces:
      for k in range(0, len(pieces), 4096):
        yield from pieces[k:k + 4096].tolist()

  def _epoch(self, e: int) -> packing.Rows | packing.Stream:
    rng = np.random.default_rng([self.seed, e])
    order = []
    for d, (pieces, count) in enumerate(zip(self.pieces, self.counts)):
      if count == 0:
        continue
      # the dataset's pieces, cycled as often as its weight asks, freshly shuffled each cycle
      taken = [np.random.default_rng([self.seed, e, d, c]).permutation(len(pieces))
               if self.shuffle else np.arange(len(pieces)) for c in range(-(-count // len(pieces)))]
      order.append(pieces[np.concatenate(taken)[:count]])
    order = np.concatenate(order) if order else np.zeros((0, 3), np.int64)
    if self.shuffle and len(self.pieces) > 1:
      order = order[rng.permutation(len(order))]
    return packing.plan_rows(order, self.seq_len, self.mode, self.group)

  def epoch(self, e: int) -> packing.Rows | packing.Stream:
    with self._planning:
      while len(self.starts) <= e + 1:  # epochs are planned in order: where each starts
        n = len(self.starts) - 1
        plan = self._epoch(n)
        self.starts.append(self.starts[-1] + len(plan))
        self.plans[n] = plan
      plan = self.plans.pop(e, None)
      if plan is None:  # no longer kept: planned again, the same rows
        plan = self._epoch(e)
      self.plans[e] = plan  # the latest used last
      while len(self.plans) > self.KEEP:
        del self.plans[next(iter(self.plans))]
      return plan

  def __call__(self, i: int) -> dict[str, np.ndarray]:
    """Row i; past the end of a finite (`batches(repeat=False)`) pass, an all-padding row."""
    i = int(i)
    if i < 0:
      return self._assemble([])
    while self.starts[-1] <= i:  # plan epochs up to the one holding row i
      self.epoch(len(self.starts) - 1)
    e = bisect.bisect_right(self.starts, i) - 1
    return self._assemble(self.epoch(e)[i - self.starts[e]])

  def _assemble(self, row):
    row = np.asarray(row, np.int64).reshape(-1, 3)
    if self.preference:
      return pairs.assemble(row, {ex: self.examples[ex] for ex in row[:, 0].tolist()}, None,
                            self.seq_len, self.reference)
    got = {ex: self.examples[ex] for ex in row[:, 0].tolist()}  # each example read once
    return packing.assemble(row, {ex: x[0] for ex, x in got.items()},
                            {ex: x[1] for ex, x in got.items()}, self.seq_len)


class _Padded:
  """Row indices of one pass, topped up to whole batches with all-padding rows (index -1)."""

  def __init__(self, n: int):
    self.n = n

  def __call__(self, i: int) -> int:
    return int(i) if i < self.n else -1


def single_pass(rows: PackedRows) -> PackedRows:
  """A view of the same examples, each exactly once and in order (no mixture, no shuffle): its
  `batches(..., repeat=False)` visit every example of `rows` (DPO's reference pass). Each of its
  epochs is that pass: every dataset's pieces once, in order, one dataset after another."""
  view = copy.copy(rows)
  view.shuffle, view.counts = False, [len(p) for p in rows.pieces]
  view.plans, view.starts, view._planning = {}, [0], threading.Lock()
  view.reference = None
  return view


def batches(rows: PackedRows, batch_size: int, *, shard: tuple[int, int] = (0, 1),
            repeat: bool = True) -> grain.MapDataset:
  """Batches of `batch_size` rows (this process's `batch_size // count` of them): endless, or
  one pass over the first epoch with the last batch topped up by padding rows (weight 0)."""
  index, count = shard
  if repeat:
    ds = grain.MapDataset.range(_ENDLESS)
  else:
    n = len(rows.epoch(0))
    ds = grain.MapDataset.range(-(-n // batch_size) * batch_size).map(_Padded(n))
  if count > 1:
    ds = ds[index::count]
  return ds.map(rows).batch(batch_size // count, drop_remainder=True)


# ----------------------------------------------------------------------------------------------
# Config -> tokenizer, train and eval rows
# ----------------------------------------------------------------------------------------------


def held_out(k: int, eval_percent: float) -> bool:
  """Whether record k of a dataset (bad records counted, `sources.read_spans`) is eval's."""
  return zlib.crc32(str(k).encode()) % 1000 < eval_percent * 10


def _split_eval(numbered: list, eval_percent: float) -> tuple[list, list]:
  held = [held_out(k, eval_percent) for k, _ in numbered]
  return ([r for (_, r), h in zip(numbered, held) if not h],
          [r for (_, r), h in zip(numbered, held) if h])


def _records(cfg, stats: dict) -> tuple[list[list[dict]], list[list[dict]]]:
  d = cfg.data
  if d.source == "stdlib":
    train_docs, eval_docs = stdlib_corpus.load_documents(d.max_chars, d.eval_percent)
    return [[{"text": t} for t in train_docs]], [[{"text": t} for t in eval_docs]]
  load = lambda spec, numbered=False: sources.load_datasets(
      spec, d.format, fields(d), d.skip_bad_records, stats, d.text_split, numbered)
  if d.eval_files:
    return load(d.train_files), load(d.eval_files)
  # hold out a share of every training dataset
  splits = [_split_eval(ds, d.eval_percent) for ds in load(d.train_files, numbered=True)]
  train, evals = [t for t, _ in splits], [e for _, e in splits if e]
  if not all(train) or not evals:
    raise DataError(f"data.eval_percent={d.eval_percent} leaves a split empty; give "
                    "data.eval_files or more records")
  return train, evals


def fields(d) -> dict[str, str]:
  """The config's record field names, by our names."""
  return {k: d[f"{k}_field"] for k in ("text", "messages", "prompt", "chosen", "rejected")}


def _split_names(d) -> tuple[str, str]:
  """How errors and warnings name the train and eval splits: by their files."""
  if d.source == "stdlib":
    return "train split (the standard library corpus)", "eval split (the standard library corpus)"
  if d.source == "prepared":
    return (f"train split (prepared {d.train_files})",
            f"eval split (prepared {d.eval_files or d.train_files})")
  held = f"data.eval_percent={d.eval_percent} held out of {d.train_files}"
  return f"train split ({d.train_files})", f"eval split ({d.eval_files or held})"


def _long_examples(name: str, rows: PackedRows, stats: dict, fmt: str) -> str | None:
  """A warning when more than 10% of a split's examples lose tokens to the row length
  (truncated, dropped) or, for chat, are split (a reply in another row than its prompt), with
  the seq_len that would fit 95% of them; counted on the whole split, as the lengths are at
  hand. Split plain text loses no token and is how long documents are trained: no warning."""
  kinds = ("truncated", "split", "dropped") if fmt == "chat" else ("truncated", "dropped")
  cut = {k: stats[k] for k in kinds if stats.get(k)}
  n = len(rows.examples)
  if not n or sum(cut.values()) <= 0.1 * n:
    return None
  fit = packing.length_to_fit(rows.lengths, 0.95)
  return (f"{name}: {sum(cut.values()) / n:.0%} of its {n} examples are longer than "
          f"train.seq_len={rows.seq_len} ({', '.join(f'{v} {k}' for k, v in cut.items())}); "
          f"train.seq_len={fit} would fit 95% of them")


def training_text(records: list[dict], template: templates.Template | None) -> list[str]:
  """What a tokenizer is trained on: the text, or each conversation rendered by the template."""
  if template is None:
    return [r["text"] for r in records]
  if records and "messages" not in records[0]:  # preference: prompt and both answers
    return ["".join(t for k in ("prompt", "chosen", "rejected") for t, _ in template.render(
        pairs.messages(r[k], "user" if k == "prompt" else "assistant", k))) for r in records]
  return ["".join(t for t, _ in template.render(r["messages"])) for r in records]


def given_tokenizer(cfg):
  """The tokenizer the config names, loaded, or None: `data.tokenizer`, else a Hugging Face
  `model.init_from` folder's own."""
  init = cfg.model.get("init_from", "")
  if cfg.data.tokenizer:
    return load_tokenizer(cfg.data.tokenizer, "data.tokenizer")
  return load_tokenizer(init[3:], "model.init_from") if init.startswith("hf:") else None


def load_tokenizer(source: str, key: str):
  """The tokenizer file or folder `source` names, or one line naming the config `key`."""
  try:
    return tokenizer_lib.load(source)
  except Exception as e:  # noqa: BLE001 -- any failure to read it is the user's file
    raise DataError(f"config key {key}: cannot read a tokenizer from {source} "
                    f"({sources.one_line(e)})") from None


def train_tokenizer(texts, vocab_size: int, template: templates.Template | None, name: str):
  """A SentencePiece model trained on `texts` (the template's special tokens as single pieces);
  too little text for `vocab_size` is one line saying what to change."""
  try:
    return tokenizer_lib.Tokenizer.train(texts, vocab_size,
                                         specials=template.specials if template else ())
  except ValueError as e:
    raise DataError(f"config key data.tokenizer_vocab_size: cannot train a tokenizer of "
                    f"{vocab_size} pieces on {name}: {e}; change data.tokenizer_vocab_size, "
                    "give more text, or give data.tokenizer") from None


@dataclasses.dataclass
class Data:
  tokenizer: Any
  template: templates.Template | None  # chat data only
  train: PackedRows
  eval: PackedRows
  eval_records: list[dict]  # the held-out records themselves (for generation-based evals)
  stats: dict[str, Any]  # counts (truncated, dropped, bad records...) and the padding ratio
  warnings: list[str]  # for the console: bad records skipped, many examples longer than a row


def build(cfg, workdir: str, is_leader: bool, sync=lambda: None) -> Data:
  """Tokenizer, template, train and eval rows of the run.

  The leader trains (or copies) the tokenizer into the workdir; after `sync()` every process
  loads that one file, so all agree on it.
  """
  d, t = cfg.data, cfg.train
  stats: dict[str, Any] = {}
  template = templates.get(d.template) if d.format in ("chat", "preference") else None
  train_name, eval_name = _split_names(d)
  warnings = []
  if d.source == "prepared":
    tokenizer, train_sets, eval_sets = _prepared(cfg, template)
    eval_records = []
    if is_leader:  # a copy beside the checkpoints
      tokenizer.save(os.path.join(workdir, tokenizer_lib.file_name(tokenizer)))
  else:
    train_records, eval_records = _records(cfg, stats)
    if stats.get("bad_records"):
      n = stats["bad_records"]
      warnings.append(f"skipped {n} bad record{'s' * (n > 1)} (data.skip_bad_records), the "
                      f"first: {stats.pop('first_bad_record')}")
    tokenizer = _tokenizer(cfg, workdir, is_leader, sync, template, train_records, train_name)
    train_sets = [InMemory(*tokenize(r, d.format, tokenizer, template)) for r in train_records]
    eval_sets = [InMemory(*tokenize(r, d.format, tokenizer, template)) for r in eval_records]
    eval_records = [r for ds in eval_records for r in ds]
  if template is not None:
    try:
      template.stop_id(tokenizer)
    except ValueError as e:
      raise DataError(f"config key data.template: {e}") from None

  weights = [float(w) for w in d.train_weights.split(",")] if d.train_weights else \
      [len(ds) for ds in train_sets]
  if len(weights) != len(train_sets) or min(weights) <= 0:
    raise DataError(f"config key data.train_weights: {d.train_weights!r} must be one positive "
                    f"weight per dataset in data.train_files ({len(train_sets)})")
  common = dict(seq_len=t.seq_len, mode=d.packing, truncation=d.truncation, group=d.pack_group)
  train = PackedRows(train_sets, weights, seed=fold_seed(t.seed), shuffle=True, stats=stats,
                     name=train_name, **common)
  eval_stats: dict[str, Any] = {}
  evals = PackedRows(eval_sets, [len(ds) for ds in eval_sets], seed=0, shuffle=False,
                     stats=eval_stats, name=eval_name, **common)
  warnings += filter(None, (_long_examples(train_name, train, stats, d.format),
                            _long_examples(eval_name, evals, eval_stats, d.format)))
  stats.update({f"eval_{k}": v for k, v in eval_stats.items()})  # e.g. eval_truncated
  stats["padding_ratio"] = packing.padding_ratio(train.epoch(0), t.seq_len)
  stats["train_examples"] = sum(len(ds) for ds in train_sets)
  stats["eval_examples"] = sum(len(ds) for ds in eval_sets)
  return Data(tokenizer, template, train, evals, eval_records, stats, warnings)


def _tokenizer(cfg, workdir: str, is_leader: bool, sync, template, train_records,
               train_name: str):
  """The tokenizer given (data.tokenizer, or the Hugging Face model's own), copied into the
  workdir by the leader; or one the leader trains there on the training text once per workdir,
  then read by every process after `sync()`, so that all agree on it."""
  d = cfg.data
  tokenizer = given_tokenizer(cfg)
  if tokenizer is not None:
    if is_leader:  # a copy beside the checkpoints
      tokenizer.save(os.path.join(workdir, tokenizer_lib.file_name(tokenizer)))
    return tokenizer
  saved = os.path.join(workdir, "tokenizer.model")
  failure = None  # the leader's, raised after the barrier: every process then stops
  if is_leader and not os.path.exists(saved):
    try:
      train_tokenizer((x for ds in train_records for x in training_text(ds, template)),
                      d.tokenizer_vocab_size, template, f"the {train_name}").save(saved)
    except DataError as e:
      failure = e
  sync()
  if failure is not None:
    raise failure
  if not os.path.exists(saved):
    raise DataError(f"{saved}: process 0 could not train the tokenizer (its error says why)")
  return tokenizer_lib.Tokenizer.load(saved)


def _prepared(cfg, template) -> tuple[Any, list, list]:
  """data.source=prepared: the tokenizer and the train and eval datasets (`shards.Store`s) of
  the folders in data.train_files (and data.eval_files), each checked against the run: its
  format, template and tokenizer."""
  d = cfg.data
  folders = {key: [x.strip() for x in d[key].split(",") if x.strip()]
             for key in ("train_files", "eval_files")}
  if not folders["train_files"]:
    raise DataError("config key data.train_files: empty; with data.source=prepared name the "
                    "folders python -m trainer.data.prepare wrote")
  manifests = {(key, f): shards.read_manifest(f, f"data.{key}")
               for key, fs in folders.items() for f in fs}
  first = folders["train_files"][0]
  tokenizer = given_tokenizer(cfg)
  whose = f"this run's ({d.tokenizer or cfg.model.get('init_from', '')})"
  if tokenizer is None:
    path = os.path.join(first, manifests["train_files", first]["tokenizer"])
    tokenizer, whose = load_tokenizer(path, "data.train_files"), f"{first}'s"
  want_tok = shards.tokenizer_fingerprint(tokenizer)
  want_tpl = shards.template_fingerprint(template)
  for (key, folder), m in manifests.items():
    if m["format"] != d.format:
      raise DataError(f"config key data.{key}: {folder} was prepared as data.format="
                      f"{m['format']}, this run has data.format={d.format}")
    if m["tokenizer_fingerprint"] != want_tok:
      raise DataError(f"config key data.{key}: {folder} was written for tokenizer "
                      f"{m['tokenizer_fingerprint']}, but {whose} is {want_tok}; prepare it "
                      "again with this tokenizer")
    if m["template_fingerprint"] != want_tpl:
      raise DataError(f"config key data.{key}: {folder} was written for template "
                      f"{m['template_fingerprint']}, but this run's (data.template={d.template}) "
                      f"is {want_tpl}; prepare it again, or set data.template to its template")
  preference = d.format == "preference"
  def stores(key: str, folder: str, split: str) -> list:
    return [shards.Store(folder, ds["shards"], preference)
            for ds in manifests[key, folder]["splits"].get(split, [])]
  train = [s for f in folders["train_files"] for s in stores("train_files", f, "train")]
  if not train:
    raise DataError(f"config key data.train_files: {', '.join(folders['train_files'])} hold no "
                    "training examples")
  if folders["eval_files"]:  # their eval split, or all of them when they have none
    evals = [s for f in folders["eval_files"]
             for s in stores("eval_files", f, "eval") or stores("eval_files", f, "train")]
  else:
    evals = [s for f in folders["train_files"] for s in stores("train_files", f, "eval")]
  if not any(len(s) for s in evals):
    raise DataError(f"config key data.eval_files: {', '.join(folders['train_files'])} hold no "
                    "held-out examples (prepared with data.eval_percent=0?); name a prepared "
                    "folder for eval")
  return tokenizer, train, evals
