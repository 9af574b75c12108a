"""Tokenizers: SentencePiece (trained on the run's corpus, or a `.model` file) and Hugging Face
`tokenizer.json` files (through the `tokenizers` package), behind one small interface:
`encode`, `decode`, `bos_id`, `eos_id`, `vocab_size`, and `affixes`: the ids the tokenizer's own
rules put around one text. `encode(text)` adds none of them (chat templates and prompts are
assembled from pieces); `encode(text, add_special=True)` adds them, as transformers'
`tokenizer(text)` does, so a prompt or a document starts the way the model saw its texts start.

A SentencePiece model trained here keeps code intact: no normalisation, whitespace runs are
pieces of their own, newlines are a symbol, digits are split one by one, and any character
outside the vocabulary falls back to its UTF-8 bytes, so decode(encode(text)) == text. Chat
templates' special tokens can be added as single pieces. Lines too long for SentencePiece's
trainer are cut into pieces for training only (`training_lines`); the data keeps them whole.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from tokenizers import Tokenizer as _HF


# SentencePiece's trainer skips longer sentences (its max_sentence_length, left at the default:
# passing it would change the bytes of the saved model, not the pieces)
MAX_SENTENCE_BYTES = 4192


def training_lines(texts: Iterable[str], limit: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
  """The non-blank lines of `texts`, as SentencePiece trains on them. A line longer than `limit`
  UTF-8 bytes (which SentencePiece would skip) is cut into pieces of at most limit // 4
  characters, before a space where there is one; shorter lines are passed as they are."""
  for text in texts:
    for line in text.split("\n"):
      if not line.strip():
        continue
      if len(line) <= limit // 4 or len(line.encode()) <= limit:
        yield line
        continue
      at, width = 0, limit // 4
      while at < len(line):
        end = min(at + width, len(line))
        if end < len(line):
          space = line.rfind(" ", at + 1, end)
          end = space if space > at else end
        if line[at:end].strip():
          yield line[at:end]
        at = end


class Tokenizer:
  def __init__(self, model_proto: bytes):
    if not model_proto:  # SentencePiece would load it as a model of no pieces
      raise ValueError("the file is empty")
    self.proto = model_proto
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as e:
      raise ValueError(f"not a SentencePiece model ({' '.join(str(e).split())})") from None

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, max_sentences: int = 300_000,
            specials: Sequence[str] = ()) -> "Tokenizer":
    """A BPE model of `vocab_size` pieces trained on the lines of `texts`. Text too small or
    too uniform for that many pieces is a ValueError that says how many it allows."""
    out = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=training_lines(texts), model_writer=out, vocab_size=vocab_size,
          model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
          split_by_whitespace=True, allow_whitespace_only_pieces=True, byte_fallback=True,
          split_digits=True, add_dummy_prefix=False,
          user_defined_symbols=["\n", *specials], input_sentence_size=max_sentences,
          shuffle_input_sentence=True, character_coverage=0.9995, num_threads=os.cpu_count() or 1,
          unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    except RuntimeError as e:
      raise ValueError(_training_failure(str(e), vocab_size)) from None
    return cls(out.getvalue())

  def save(self, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.write(self.proto)
    os.replace(tmp, path)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def affixes(self) -> tuple[list[int], list[int]]:
    """(before, after) one text: BOS and nothing, as runs here have always trained (and as
    `trainer.export` tells transformers with `add_bos_token`)."""
    return ([self.bos_id] if self.bos_id >= 0 else []), []

  def encode(self, text: str, add_special: bool = False) -> list[int]:
    return _wrap(self, self.sp.encode(text), add_special)

  def encode_batch(self, texts: Sequence[str], add_special: bool = False) -> list[list[int]]:
    encoded = self.sp.encode(list(texts), num_threads=os.cpu_count() or 1)
    return [_wrap(self, e, add_special) for e in encoded]

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode(list(ids))


def _training_failure(message: str, vocab_size: int) -> str:
  """SentencePiece's check that failed, said in the words of this project's config."""
  too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)",
                       message)
  if too_high:
    return (f"the text is too small or too uniform for {vocab_size} pieces: it allows at most "
            f"{too_high.group(1)}")
  too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
  if too_low:
    return (f"{vocab_size} pieces are too few for the text's characters and the special "
            f"tokens: it needs at least {too_low.group(1)}")
  if "sentences_.empty()" in message:
    return "the text has no non-blank line"
  return " ".join(message.split())


def prompt_ids(tokenizer, text: str) -> list[int]:
  """A text for the model to continue: what the tokenizer's rules put before a text (BOS or
  nothing), then the text; nothing after it."""
  return tokenizer.affixes[0] + tokenizer.encode(text)


def _wrap(tokenizer, ids: list[int], add_special: bool) -> list[int]:
  if not add_special:
    return ids
  before, after = tokenizer.affixes
  return [*before, *ids, *after]


class HFTokenizer:
  """A Hugging Face `tokenizer.json`; BOS/EOS from the `tokenizer_config.json` beside it when
  there is one, else from the tokens the Llama, Qwen and Gemma families use.

  Whether BOS or EOS go around a text is the post-processor's business in tokenizer.json (a
  TemplateProcessing `single` template: Llama 3 `<|begin_of_text|> $A`, Gemma `<bos> $A`; Qwen2
  has none). transformers 5 reads it the same way: with a tokenizer.json present it drops
  `add_bos_token` / `add_eos_token` from tokenizer_config.json (`tokenization_utils_base`) and
  keeps the file's post-processor, or adds nothing when the file has none."""

  _BOS = ("<|begin_of_text|>", "<s>", "<bos>")
  _EOS = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")

  def __init__(self, path: str):
    self.path = path
    self.tok = _HF.from_file(path)
    config = {}
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.exists(config_path):
      with open(config_path) as f:
        config = json.load(f)
    self.bos_id = self._special(config.get("bos_token"), self._BOS)
    self.eos_id = self._special(config.get("eos_token"), self._EOS)
    self.chat_template = config.get("chat_template") or ""
    if isinstance(self.chat_template, list):  # named templates: [{name, template}, ...]
      self.chat_template = next((t["template"] for t in self.chat_template
                                 if t.get("name") == "default"), "")
    jinja = os.path.join(os.path.dirname(path), "chat_template.jinja")
    if os.path.exists(jinja):  # transformers: the separate file wins over the config's entry
      with open(jinja) as f:
        self.chat_template = f.read()
    self.affixes = self._affixes()

  def _affixes(self) -> tuple[list[int], list[int]]:
    """The post-processor's ids before and after a probe text (its special-tokens mask says
    which ids it added)."""
    e = self.tok.encode("a", add_special_tokens=True)
    added = e.special_tokens_mask
    n_before = next((i for i, m in enumerate(added) if not m), len(added))
    n_after = next((i for i, m in enumerate(reversed(added)) if not m), 0)
    return e.ids[:n_before], e.ids[len(e.ids) - n_after:]

  def _special(self, configured, candidates) -> int:
    if isinstance(configured, dict):
      configured = configured.get("content")
    for token in ([configured] if configured else []) + list(candidates):
      i = self.tok.token_to_id(token)
      if i is not None:
        return i
    return -1

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size()

  def encode(self, text: str, add_special: bool = False) -> list[int]:
    return _wrap(self, self.tok.encode(text, add_special_tokens=False).ids, add_special)

  def encode_batch(self, texts: Sequence[str], add_special: bool = False) -> list[list[int]]:
    return [_wrap(self, e.ids, add_special)
            for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=False)

  FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

  def save(self, path: str) -> None:
    """Copies tokenizer.json to `path`, and its configuration files beside it."""
    shutil.copyfile(self.path, path)
    for name in self.FILES:
      src = os.path.join(os.path.dirname(self.path), name)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(os.path.dirname(path), name))


def load(path: str):
  """A `.model` (SentencePiece), a `tokenizer.json`, or a folder holding either."""
  if os.path.isdir(path):
    for name in ("tokenizer.json", "tokenizer.model"):
      if os.path.exists(os.path.join(path, name)):
        return load(os.path.join(path, name))
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
  if path.endswith(".json"):
    return HFTokenizer(path)
  return Tokenizer.load(path)


def file_name(tokenizer) -> str:
  """Where a run keeps its tokenizer in the workdir."""
  return "tokenizer.json" if isinstance(tokenizer, HFTokenizer) else "tokenizer.model"
