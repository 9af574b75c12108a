"""Chat templates: messages -> token ids and a loss mask that is 1 on assistant turns only.

Each template renders a conversation as a list of (text, trainable) chunks; a chunk is trainable
when it is an assistant reply or the token that ends it (so the model learns to stop). Chunks are
tokenized one by one, which keeps the mask exact at chunk edges. Special tokens are written as
their text (`<|eot_id|>`); a tokenizer that knows them (the model family's own, or one trained
here with `Template.specials`) turns each into one id.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Chunk = tuple[str, bool]
Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  specials: tuple[str, ...]  # strings that must be single tokens
  begin: str  # text before the first turn ("" where the tokenizer's BOS is used)
  turn: Callable[[str, str], tuple[str, str]]  # (role, content) -> (header, end of turn)
  system_in_first_user: bool = False  # Gemma has no system role
  roles: dict[str, str] = dataclasses.field(default_factory=dict)  # our role -> template role
  eos_ends_reply: bool = False  # the tokenizer's EOS (not a text marker) ends an assistant turn

  def render(self, messages: list[Message], add_generation_prompt: bool = False) -> list[Chunk]:
    messages = list(messages)
    if self.system_in_first_user and messages and messages[0]["role"] == "system":
      system, messages = messages[0]["content"], messages[1:]
      if messages and messages[0]["role"] == "user":
        messages[0] = {"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}
    chunks: list[Chunk] = [(self.begin, False)] if self.begin else []
    for m in messages:
      if m["role"] not in ROLES:
        raise ValueError(f"unknown role {m['role']!r} ({', '.join(ROLES)})")
      header, end = self.turn(self.roles.get(m["role"], m["role"]), m["content"])
      trainable = m["role"] == "assistant"
      chunks += [(header, False), (m["content"], trainable)]
      if trainable and self.eos_ends_reply:
        chunks.append((EOS, True))
      chunks.append((end, trainable and not self.eos_ends_reply))
    if add_generation_prompt:
      chunks.append((self.turn(self.roles.get("assistant", "assistant"), "")[0], False))
    return [(text, train) for text, train in chunks if text]

  def stop_id(self, tokenizer) -> int:
    """The token that ends an assistant turn: where generation stops."""
    if self.eos_ends_reply:
      return tokenizer.eos_id
    marker = self.turn(self.roles.get("assistant", "assistant"), "")[1].strip()
    ids = tokenizer.encode(marker)
    if len(ids) != 1:
      raise ValueError(f"the tokenizer splits the {self.name} end-of-turn marker {marker!r} into "
                       f"{len(ids)} tokens; use the model family's tokenizer or train one with "
                       "the template's special tokens")
    return ids[0]


EOS = "\x00<eos>"  # stands for the tokenizer's EOS id in a rendered conversation


TEMPLATES = {
    "llama3": Template(
        "llama3", ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>", lambda r, c: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>")),
    "chatml": Template(
        "chatml", ("<|im_start|>", "<|im_end|>"), "",
        lambda r, c: (f"<|im_start|>{r}\n", "<|im_end|>\n")),
    "gemma": Template(
        "gemma", ("<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>",
        lambda r, c: (f"<start_of_turn>{r}\n", "<end_of_turn>\n"), system_in_first_user=True,
        roles={"assistant": "model"}),
    "plain": Template(
        "plain", (), "", lambda r, c: (f"{r.capitalize()}: ", "\n\n"), eos_ends_reply=True),
}


def get(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f"data.template={name!r} is not one of {', '.join(TEMPLATES)}")
  return TEMPLATES[name]


def encode_chat(template: Template, tokenizer, messages: list[Message],
                add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask): int32 token ids and a 0/1 float32 mask of the tokens to learn.

  Templates without a begin marker start with what the tokenizer's rules put before a text
  (`affixes`: BOS for ours, nothing for Qwen2's chatml), as transformers' apply_chat_template
  renders the plain turns (a folder's Jinja template may add more: a default system turn, say).
  """
  ids: list[int] = [] if template.begin else list(tokenizer.affixes[0])
  mask: list[float] = [0.0] * len(ids)
  for text, trainable in template.render(messages, add_generation_prompt):
    piece = [tokenizer.eos_id] if text == EOS else tokenizer.encode(text)
    ids += piece
    mask += [float(trainable)] * len(piece)
  return np.asarray(ids, np.int32), np.asarray(mask, np.float32)
