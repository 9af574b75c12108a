"""Sampling with a KV cache: prefill the prompts in one pass, then a jitted decode loop.

    python -m trainer.generate --workdir=DIR --prompt="def fib(n):" --max_new_tokens=64
    python -m trainer.generate --hf=DIR --prompt=... --temperature=0.8 --top_p=0.9
    python -m trainer.generate --hf=DIR --chat --prompt="What is 2+3?"
    python -m trainer.generate --hf=BASE --adapters=DIR --prompt=...  # trainer.export's adapters

The prompt is tokenized as the model's tokenizer defines a text's start (BOS for the project's
own tokenizers and for Llama 3 or Gemma folders, none for Qwen2); with --chat it is one user turn
of the chat template, followed by the assistant's header, and the reply stops at end of turn.

Only the continuation goes to stdout; speed and notes go to stderr. Temperature 0 is greedy.

Prompts of different lengths are left-padded to a common length P, so every row writes its next
token to the same cache slot; padding is segment 0 and real tokens segment 1, so no real token
attends to padding, and positions count from each row's first real token. The decode loop is a
`jax.lax.while_loop` that stops when every row has produced a stop token or `max_new_tokens`.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from models import hf
from models.config import ModelConfig
from models.decoder import Context
from models.handle import ModelHandle, cast_floating, model_handle
from models.peft import Peft, saved
from models.quant import model as quant_model
from trainer import export
from trainer.data import templates, tokenizer as tokenizer_lib
from trainer.errors import UserError
from trainer.seeds import fold_seed


def filter_logits(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Logits to sample from: divided by the temperature, outside the top-k and outside the
  smallest set whose probability reaches top_p set to -inf (the most likely token always stays)."""
  logits = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
    drop_sorted = before >= top_p
    drop = jnp.zeros_like(drop_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, neg, logits)
  return logits


def choose(logits, key, temperature: float, top_k: int, top_p: float):
  """(the next token, its log-prob under softmax(logits / temperature), unfiltered: what a
  training forward at that temperature gives it; temperature 0 (greedy): the plain softmax)."""
  logits = logits.astype(jnp.float32)
  if temperature <= 0:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    tok = jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(
        jnp.int32)
  logp = jax.nn.log_softmax(logits / (temperature if temperature > 0 else 1.0), axis=-1)
  return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


_COMPILED: dict[tuple, tuple[ModelHandle, object]] = {}


def _compiled(handle: ModelHandle, **static):
  """One jitted program per model handle and sampling settings, kept for later calls (the
  handle holds dicts, so it cannot be a jit static argument itself)."""
  key = (id(handle), *sorted(static.items()))
  if key not in _COMPILED or _COMPILED[key][0] is not handle:
    _COMPILED[key] = (handle, jax.jit(functools.partial(_generate, handle=handle, **static)))
  return _COMPILED[key][1]


def _generate(params, tokens, positions, segments, stops, key, *, handle, max_new_tokens,
              temperature, top_k, top_p, compute_dtype):
  model = handle.bind(cast_floating(params, compute_dtype))
  b, p = tokens.shape
  cache = model.init_cache(b, p + max_new_tokens, compute_dtype)
  h, cache = model.hidden(tokens, positions, segments, Context(cache=cache, start=0))
  logits = model.logits(h[:, -1:])[:, 0]
  first, first_logp = choose(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p)
  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  logps = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(first_logp)
  done = jnp.isin(first, stops)
  next_pos = positions[:, -1] + 1

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, out, logps, cache, done, pos = carry
    last = out[:, i - 1][:, None]
    h, cache = model.hidden(last, pos[:, None], jnp.ones((b, 1), jnp.int32),
                            Context(cache=cache, start=p + i - 1))
    nxt, logp = choose(model.logits(h)[:, 0], jax.random.fold_in(key, i), temperature, top_k,
                       top_p)
    nxt, logp = jnp.where(done, 0, nxt), jnp.where(done, 0.0, logp)
    out, logps = out.at[:, i].set(nxt), logps.at[:, i].set(logp)
    return i + 1, out, logps, cache, done | jnp.isin(nxt, stops), pos + 1

  i, out, logps, _, _, _ = jax.lax.while_loop(
      cond, body, (jnp.int32(1), out, logps, cache, done, next_pos))
  return out, logps, i


def generate(handle: ModelHandle, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), seed: int = 0, compute_dtype=jnp.float32,
             max_len: int | None = None, with_logps: bool = False, keep_stop: bool = False):
  """New token ids after each prompt: at most `max_new_tokens`, ending before the first stop id
  (`keep_stop`: with it). Prompts are cut from the left to fit `max_len` (default: the model's
  max_seq_len) with the new tokens. `with_logps`: (token lists, float32 arrays of each token's
  log-prob under softmax(logits / temperature), `choose`)."""
  if max_new_tokens < 1:
    empty = [[] for _ in prompts]
    return (empty, [np.zeros(0, np.float32) for _ in prompts]) if with_logps else empty
  max_len = max_len or handle.cfg.max_seq_len
  room = max_len - max_new_tokens
  if room < 1:
    raise ValueError(f"{max_new_tokens} new tokens leave no room for a prompt in {max_len}")
  prompts = [list(q)[-room:] or [0] for q in prompts]
  p = max(len(q) for q in prompts)
  tokens = np.zeros((len(prompts), p), np.int32)
  segments = np.zeros_like(tokens)
  positions = np.zeros_like(tokens)
  for r, q in enumerate(prompts):
    tokens[r, p - len(q):] = q
    segments[r, p - len(q):] = 1
    positions[r, p - len(q):] = np.arange(len(q))
  first = handle.cfg.rope_original_max_len + 1 - p  # new tokens before LongRoPE's switch
  if handle.cfg.rope_scaling == "longrope" and 1 <= first < max_new_tokens:
    return _longrope_generate(handle, params, prompts, max_new_tokens, first, stop_ids,
                              with_logps, keep_stop, dict(
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                  compute_dtype=compute_dtype, max_len=max_len))
  run = _compiled(handle, max_new_tokens=max_new_tokens, temperature=float(temperature),
                  top_k=int(top_k), top_p=float(top_p), compute_dtype=jnp.dtype(compute_dtype))
  out, logps, n = run(params, tokens, positions, segments,
                      jnp.asarray(list(stop_ids) or [-1], jnp.int32),
                      jax.random.PRNGKey(fold_seed(seed)))
  out, logps = np.asarray(out)[:, :int(n)], np.asarray(logps)[:, :int(n)]
  return _until_stop(out.tolist(), logps, set(stop_ids), keep_stop, with_logps)


def _until_stop(rows, logps, stops: set, keep_stop: bool, with_logps: bool):
  """Each row (and its log-probs) cut before its first stop id (`keep_stop`: after it)."""
  result, result_logps = [], []
  for row, row_logps in zip(rows, logps):
    cut = next((j + keep_stop for j, tok in enumerate(row) if tok in stops), len(row))
    result.append(row[:cut])
    result_logps.append(row_logps[:cut])
  return (result, result_logps) if with_logps else result


def _longrope_generate(handle, params, prompts, max_new_tokens, first, stop_ids, with_logps,
                       keep_stop, kw):
  """Phi-3's rule (transformers' Phi3ForCausalLM.prepare_inputs_for_generation): when the
  sequence first passes the original length, the cache built with LongRoPE's short factors is
  dropped and the whole sequence runs again, with the long ones. Here: `first` new tokens, then
  the rest after prompts of prompt + those (the longest row's positions then pass the original
  length, so its prefill takes the long factors)."""
  stops = set(stop_ids)
  head, head_logps = generate(handle, params, prompts, first, stop_ids=stop_ids,
                              with_logps=True, keep_stop=True, **kw)
  live = [r for r, row in enumerate(head) if len(row) == first and not stops & set(row)]
  tails, tail_logps = {}, {}
  if live:
    more, more_logps = generate(handle, params, [list(prompts[r]) + head[r] for r in live],
                                max_new_tokens - first, stop_ids=stop_ids, with_logps=True,
                                keep_stop=True, **{**kw, "seed": kw["seed"] + 1})
    tails, tail_logps = dict(zip(live, more)), dict(zip(live, more_logps))
  rows = [row + tails.get(r, []) for r, row in enumerate(head)]
  logps = [np.concatenate([head_logps[r], tail_logps.get(r, np.zeros(0, np.float32))])
           for r in range(len(head))]
  return _until_stop(rows, logps, stops, keep_stop, with_logps)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def check_flags(f, max_seq_len: int | None = None) -> None:
  """The sampling flags against their ranges (before the model is read) and, given its
  `max_seq_len`, against the model: one line each, naming the flag."""
  if not math.isfinite(f.temperature) or f.temperature < 0:
    raise UserError(f"--temperature={f.temperature} must be >= 0 (0: greedy)")
  if not 0 < f.top_p <= 1:
    raise UserError(f"--top_p={f.top_p} must be in (0, 1] (1: no nucleus filtering)")
  if f.top_k < 0:
    raise UserError(f"--top_k={f.top_k} must be >= 0 (0: all tokens)")
  if f.max_new_tokens < 1:
    raise UserError(f"--max_new_tokens={f.max_new_tokens} must be positive")
  if max_seq_len is not None and f.max_new_tokens >= max_seq_len:
    raise UserError(f"--max_new_tokens={f.max_new_tokens} must be in [1, {max_seq_len - 1}]: the "
                    f"model has {max_seq_len} positions and the prompt needs one at least")


def chat_template(f, run_cfg, tokenizer):
  """The template `--chat` renders with: --template, else the run's data.template (a chat or
  preference run), else the one whose markers the Hugging Face folder's own chat_template uses
  (the project renders its named templates, not Jinja)."""
  if f.template:
    if f.template not in templates.TEMPLATES:
      raise UserError(f"--template={f.template} is not one of {', '.join(templates.TEMPLATES)}")
    return templates.TEMPLATES[f.template]
  if run_cfg is not None and run_cfg.data.format in ("chat", "preference"):
    return templates.TEMPLATES[run_cfg.data.template]
  source = getattr(tokenizer, "chat_template", "")
  for template in templates.TEMPLATES.values():
    # the turn markers (the last two specials); BOS is often written as {{ bos_token }}
    if source and template.specials and all(s in source for s in template.specials[-2:]):
      return template
  where = f"--workdir={f.workdir} trained on data.format={run_cfg.data.format}" if run_cfg \
      else f"--hf={f.hf} has no chat_template the project knows"
  raise UserError(f"--chat: {where}; give --template=one of {', '.join(templates.TEMPLATES)}")


def load_model(workdir: str | None, hf_dir: str | None, step: int | None = None,
               adapters: str | None = None):
  """(run config or None, ModelHandle, params, tokenizer) of exactly one of a training run's
  folder (its checkpoint at `step`, default the newest) and a Hugging Face folder, the latter
  with `adapters` (a folder `trainer.export --format=adapters` wrote) when given."""
  if bool(workdir) == bool(hf_dir):
    raise UserError("give exactly one of --workdir and --hf")
  if adapters and not hf_dir:
    raise UserError("--adapters goes with --hf=the base model they were trained on")
  if adapters:
    run_cfg, handle, params, tokenizer = load_model(None, hf_dir)
    return run_cfg, *with_adapters(handle, params, adapters), tokenizer
  if workdir:
    run_cfg, handle, params, _ = export.load_run(workdir, step)
    return run_cfg, handle, params, tokenizer_lib.load(workdir)
  try:
    if quant_model.read(hf_dir) is not None:  # trainer/quantize.py's integers and scales
      mcfg, quant, params = hf.load_quantized(hf_dir)
      return None, model_handle(mcfg, quant=quant), params, tokenizer_lib.load(hf_dir)
    mcfg, params = hf.load(hf_dir)
    return None, model_handle(mcfg), params, tokenizer_lib.load(hf_dir)
  except (OSError, ValueError) as e:
    raise UserError(f"--hf={hf_dir}: {e}") from None


def with_adapters(handle: ModelHandle, params, folder: str):
  """(handle, params) of a base model with the adapters of an own-format folder."""
  try:
    section, fields, adapters = saved.read(folder)
  except ValueError as e:
    raise UserError(f"--adapters={folder}: {e}") from None
  if handle.quant is not None:
    raise UserError(f"--adapters={folder}: --hf holds a quantized model, which takes no adapters")
  theirs = ModelConfig.from_dict(fields)
  for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff"):
    if getattr(theirs, field) != getattr(handle.cfg, field):
      raise UserError(f"--adapters={folder} belongs to a model with {field}="
                      f"{getattr(theirs, field)}; --hf's has {getattr(handle.cfg, field)}")
  try:
    peft = Peft.from_config(ml_collections.ConfigDict(section), handle.cfg)
  except (ValueError, AttributeError, KeyError) as e:
    raise UserError(f"--adapters={folder}: adapters.json: {e}") from None
  if peft is None or peft.method == "bitfit":
    raise UserError(f"--adapters={folder}: peft.method={section.get('method')} has no adapters")
  adapted = model_handle(handle.cfg, peft, handle.run)
  want = jax.tree.map(lambda x: x.shape, adapted.abstract_params()["peft"])
  got = jax.tree.map(lambda x: x.shape, adapters)
  if want != got:
    raise UserError(f"--adapters={folder}: its tensors do not fit adapters.json's description")
  return adapted, {**params, "peft": jax.tree.map(jnp.asarray, adapters)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    check_flags(f)
    run_cfg, handle, params, tokenizer = load_model(f.workdir, f.hf, f.step, f.adapters)
    check_flags(f, handle.cfg.max_seq_len)
    stops = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    if f.chat:
      template = chat_template(f, run_cfg, tokenizer)
      try:
        stops = [template.stop_id(tokenizer), *stops]
      except ValueError as e:
        raise UserError(f"--chat: {e}") from None
      prompt = templates.encode_chat(template, tokenizer, [{"role": "user", "content": f.prompt}],
                                     add_generation_prompt=True)[0].tolist()
    else:  # as the tokenizer's rules start a text (BOS or not); no EOS after a prompt
      prompt = tokenizer_lib.prompt_ids(tokenizer, f.prompt)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  t0 = time.perf_counter()
  ids = generate(handle, params, [prompt], f.max_new_tokens, temperature=f.temperature,
                 top_k=f.top_k, top_p=f.top_p, seed=f.seed, stop_ids=stops)[0]
  elapsed = time.perf_counter() - t0
  sys.stdout.write(tokenizer.decode(ids) + "\n")
  print(f"{len(prompt)} prompt tokens, {len(ids)} tokens in {elapsed:.2f}s "
        f"({len(ids) / elapsed:.1f} tokens/s, compile included)", file=sys.stderr)


def _define_flags():
  """Only when run as a program: the CLIs share flag names."""
  flags.DEFINE_string("workdir", None, "a training run's folder (latest checkpoint)")
  flags.DEFINE_string("hf", None, "a Hugging Face model folder")
  flags.DEFINE_string("adapters", None, "with --hf: an adapter folder trainer.export "
                      "--format=adapters wrote, trained on that base model")
  flags.DEFINE_string("prompt", "", "text to continue")
  flags.DEFINE_bool("chat", False, "the prompt is a user turn of the chat template, and the reply "
                    "ends at the template's end of turn")
  flags.DEFINE_string("template", None, "--chat: llama3 | chatml | gemma | plain (default: the "
                      "run's data.template, or the one the --hf folder's chat_template uses)")
  flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate at most")
  flags.DEFINE_float("temperature", 0.0, "0: greedy")
  flags.DEFINE_integer("top_k", 0, "sample among the k most likely tokens (0: all)")
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass, in (0, 1]")
  flags.DEFINE_integer("seed", 0, "sampling seed (any integer)")
  flags.DEFINE_integer("step", None, "--workdir: checkpoint step (default: the latest)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
