"""Tokenizers. SentencePiece, trained on the run's corpus or loaded from a `.model` file.

The trained model keeps code intact: no normalisation, whitespace runs are pieces of their own,
newlines are a symbol, and any character outside the vocabulary falls back to its UTF-8 bytes,
so decode(encode(text)) == text.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm


class Tokenizer:
  def __init__(self, model_proto: bytes):
    self.proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, max_sentences: int = 300_000) -> "Tokenizer":
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=out, vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_by_whitespace=True, allow_whitespace_only_pieces=True, byte_fallback=True,
        user_defined_symbols=["\n"], input_sentence_size=max_sentences,
        shuffle_input_sentence=True, character_coverage=0.9995, num_threads=os.cpu_count() or 1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
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

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.sp.encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode(list(ids))
