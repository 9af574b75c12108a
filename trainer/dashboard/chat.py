"""Sampling from a run's checkpoint or a Hugging Face folder under the root, through the
project's KV-cache sampler (trainer/generate.py). The last few models stay loaded."""

from __future__ import annotations

import collections
import threading
import time
import types

from trainer import generate as generate_lib
from trainer.data import templates, tokenizer as tokenizer_lib
from trainer.errors import UserError

KEEP = 2  # models kept loaded
_cache: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()  # one generation at a time: they share the machine's cores


def _model(workdir: str | None, hf_dir: str | None, step: int | None):
  key = (workdir, hf_dir, step)
  if key not in _cache:
    _cache[key] = generate_lib.load_model(workdir, hf_dir, step)
    while len(_cache) > KEEP:
      _cache.popitem(last=False)
  _cache.move_to_end(key)
  return _cache[key]


def reply(workdir: str | None, hf_dir: str | None, prompt: str, *, step: int | None = None,
          max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
          top_p: float = 1.0, seed: int = 0, chat: bool = False) -> dict:
  """{"text", "tokens", "seconds"} of one continuation (with `chat`, one user turn of the
  template the run trained with, or the folder's). UserError for what the command line
  refuses."""
  if not 1 <= max_new_tokens <= 4096:
    raise UserError(f"max_new_tokens={max_new_tokens} must be in 1..4096")
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise UserError("temperature >= 0, top_k >= 0 and top_p in (0, 1], please")
  with _lock:
    run_cfg, handle, params, tokenizer = _model(workdir, hf_dir, step)
    stops = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    if chat:
      # as `trainer.generate --chat` picks it: the run's template, or the folder's
      where = types.SimpleNamespace(template=None, workdir=workdir, hf=hf_dir)
      template = generate_lib.chat_template(where, run_cfg, tokenizer)
      stops = [template.stop_id(tokenizer), *stops]
      ids = templates.encode_chat(template, tokenizer, [{"role": "user", "content": prompt}],
                                  add_generation_prompt=True)[0].tolist()
    else:
      ids = tokenizer_lib.prompt_ids(tokenizer, prompt)
    if len(ids) + max_new_tokens > handle.cfg.max_seq_len:
      raise UserError(f"the prompt ({len(ids)} tokens) and max_new_tokens={max_new_tokens} "
                      f"exceed the model's {handle.cfg.max_seq_len} positions")
    t = time.perf_counter()
    out = generate_lib.generate(handle, params, [ids], max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, stop_ids=stops)[0]
    return {"text": tokenizer.decode(out), "tokens": len(out),
            "seconds": time.perf_counter() - t}
