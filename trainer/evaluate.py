"""Evaluations beyond the loss: exact match of generated chat replies on held-out examples."""

from __future__ import annotations

from typing import Sequence

from trainer import generate
from trainer.data import templates


def chat_exact_match(handle, params, tokenizer, template: templates.Template,
                     records: Sequence[dict], *, buffer_len: int, max_new_tokens: int = 16,
                     compute_dtype=None) -> float:
  """Share of records whose last (assistant) message the model reproduces exactly (greedy,
  surrounding whitespace ignored) from the conversation before it."""
  prompts, answers = [], []
  for r in records:
    *context, reply = r["messages"]
    if reply["role"] != "assistant":
      continue
    ids, _ = templates.encode_chat(template, tokenizer, context, add_generation_prompt=True)
    prompts.append(ids.tolist())
    answers.append(reply["content"].strip())
  if not prompts:
    return float("nan")
  kwargs = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
  outs = generate.generate(handle, params, prompts, max_new_tokens, max_len=buffer_len,
                           stop_ids=(template.stop_id(tokenizer),), **kwargs)
  hits = sum(tokenizer.decode(o).strip() == a for o, a in zip(outs, answers))
  return hits / len(prompts)
