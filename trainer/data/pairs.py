"""Preference pairs (prompt, chosen, rejected) laid out in shared-prompt rows.

A pair takes one stretch of a row: the prompt once, then each answer as a branch that starts
again from the prompt's last token:

  inputs     p0 .. p[P-2] | p[P-1] c0 .. c[C-1] | p[P-1] r0 .. r[R-1]
  targets    p1 .. p[P-1] | c0 .. c[C-1]  -     | r0 .. r[R-1]  -
  positions  0  .. P-2    | P-1 .. P-1+C        | P-1 .. P-1+R
  segment    3k+1         | 3k+2                | 3k+3            (pair k of the row)

so both answers see the prompt and not each other (models/layers.py `attention_mask` and
models/kernels/flashmask.py `from_segments` with shared_prompt), at the positions they would have
after it alone. The last position of a branch has the answer's last token as input: a reward
model reads its score there, as transformers' sequence classifiers read the last token. The
answer tokens the template marks as trainable (the reply and its end-of-turn token) carry
weight 1: DPO sums their log-probs.

Pairs are never split across rows (one longer than a row is dropped and counted), and
`data.packing=concat` packs them greedily.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from trainer.data import packing, templates
from trainer.data.sources import DataError

FIELDS = ("inputs", "targets", "weights", "positions", "segment_ids")
ANSWERS = 2  # answers per prompt: the decoder's `Context.shared_prompt` for these rows


class Group:
  """One prompt and n answers laid out as above (answer i is branch i + 2, its segment
  (n + 1) k + i + 2 in group k of a row); len() is positions + 1 (as a piece of n tokens fills
  n - 1 positions in trainer/data/packing.py). GRPO's completions of one prompt are a group."""

  def __init__(self, prompt, answers, masks):
    if len(prompt) < 1 or not answers or any(len(a) < 1 for a in answers):
      raise ValueError("a group needs a prompt and non-empty answers")
    p = len(prompt)
    parts = [(prompt[:-1], prompt[1:], np.zeros(p - 1), np.arange(p - 1), 1)]
    for branch, (answer, mask) in enumerate(zip(answers, masks), start=2):
      n = len(answer)
      parts.append((np.concatenate([prompt[-1:], answer]), np.concatenate([answer, [0]]),
                    np.concatenate([mask, [0.0]]), np.arange(p - 1, p + n), branch))
    parts = [(*part[:4], np.full(len(part[0]), part[4])) for part in parts]
    self.inputs, self.targets, self.weights, self.positions, self.branch = (
        np.concatenate([part[i] for part in parts]) for i in range(5))
    self.inputs, self.targets = self.inputs.astype(np.int32), self.targets.astype(np.int32)
    self.weights, self.positions = self.weights.astype(np.float32), self.positions.astype(np.int32)
    self.branch = self.branch.astype(np.int32)
    self.answers = len(answers)
    # each answer's first position (its input there is the prompt's last token)
    self.first = {b: int(np.argmax(self.branch == b)) for b in range(2, len(answers) + 2)}

  def __len__(self) -> int:
    return len(self.inputs) + 1

  def segments(self, k: int) -> np.ndarray:
    """The segment ids of this group as group k of its row."""
    return (self.answers + 1) * k + self.branch


class Pair(Group):
  """A preference pair: a group of two answers, the chosen (branch 2) and the rejected (3)."""

  def __init__(self, prompt, chosen, chosen_mask, rejected, rejected_mask):
    if len(prompt) < 1 or len(chosen) < 1 or len(rejected) < 1:
      raise ValueError("a preference pair needs a prompt and two non-empty answers")
    super().__init__(prompt, [chosen, rejected], [chosen_mask, rejected_mask])
    self.parts = (prompt, chosen, chosen_mask, rejected, rejected_mask)  # as given (shards.py)


def messages(value, role: str, where: str) -> list[dict]:
  """A prompt or answer as messages: a string is one turn of `role`; a list is taken as it is
  (TRL's conversational format)."""
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
    return value
  raise DataError(f"{where} must be a string or a list of {{role, content}} messages")


def tokenize_pairs(records: Sequence[dict[str, Any]], tokenizer,
                   template: templates.Template) -> list[Pair]:
  """Each record rendered with the chat template: the prompt up to the assistant header, each
  answer as the assistant turn that follows it (its reply and end-of-turn learned)."""
  out = []
  for r in records:
    prompt = messages(r["prompt"], "user", "a preference prompt")
    ids, _ = templates.encode_chat(template, tokenizer, prompt, add_generation_prompt=True)
    answers = []
    for key in ("chosen", "rejected"):
      turn = messages(r[key], "assistant", f"a preference {key} answer")
      full, mask = templates.encode_chat(template, tokenizer, prompt + turn)
      # chunks are tokenized one by one, so the conversation starts with the prompt's ids; the
      # header of the assistant turn is the generation prompt
      if not np.array_equal(full[:len(ids)], ids):
        raise DataError(f"data.template={template.name}: the {key} answer does not extend its "
                        "prompt token for token")
      answers += [full[len(ids):], mask[len(ids):]]
    out.append(Pair(ids, *answers))
  return out


def assemble(row, pairs: Sequence[Pair], _unused, seq_len: int,
             reference: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One row of whole pairs (an (m, 3) array of pieces (pair, 0, len)); also `example` (the
  pair's index at each of its positions, -1 on padding) and `reference` (precomputed reference
  log-probs of each answer at its first position, zero elsewhere; zeros without a table)."""
  out = {k: np.zeros(seq_len, np.float32 if k == "weights" else np.int32) for k in FIELDS}
  out["example"] = np.full(seq_len, -1, np.int32)
  out["reference"] = np.zeros(seq_len, np.float32)
  at = 0
  for k, (ex, _, _) in enumerate(packing.as_pieces(row).tolist()):
    pair = pairs[ex]
    n = len(pair.inputs)
    for field in ("inputs", "targets", "weights", "positions"):
      out[field][at:at + n] = getattr(pair, field)
    out["segment_ids"][at:at + n] = pair.segments(k)
    out["example"][at:at + n] = ex
    if reference is not None:
      out["reference"][at + pair.first[2]] = reference[ex, 0]
      out["reference"][at + pair.first[3]] = reference[ex, 1]
    at += n
  return out
