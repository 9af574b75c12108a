"""Preference pairs from a model's own samples, judged by a reward function: the data a reward
model for RLHF learns from when the judge is a checker rather than a person.

    python -m trainer.sample_pairs --hf=/tmp/sft_hf --prompts=data/arith_chat/train.jsonl \\
        --out=/tmp/pairs --samples=8

For each chat of --prompts (its last message the expected answer) the model samples --samples
replies (the project's KV-cache sampler, the chat template's end of turn as stop); each reply
and the expected answer are scored by --reward (trainer/objectives/grpo.py: `exact` or
module:function). A prompt with a reply scoring below the best gives one pair: chosen the best
(a sample, or the expected answer when no sample reaches its score), rejected one of the
lowest-scoring replies. --out gets train.jsonl and eval.jsonl (every 20th pair), records of
{prompt: messages, chosen, rejected} that `data.format=preference` reads.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

from trainer import generate as generate_lib
from trainer.data import templates
from trainer.errors import UserError
from trainer.objectives.grpo import read_prompts, reward_function


def pairs_of(chats, replies, scores, expected_scores, seed: int) -> list[dict]:
  """One record per chat whose replies do not all score the best (see the module docstring);
  `replies[i]` the texts sampled for chat i, `scores[i]` theirs."""
  rng = np.random.default_rng(seed)
  out = []
  for (messages, answer), texts, s, best_expected in zip(chats, replies, scores,
                                                         expected_scores):
    s = np.asarray(s)
    chosen = answer if best_expected > s.max() else texts[int(np.argmax(s))]
    top = max(best_expected, s.max())
    low = np.flatnonzero(s == s.min())
    if s.min() >= top:
      continue
    out.append({"prompt": messages, "chosen": chosen, "rejected": texts[int(rng.choice(low))]})
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    if f.samples < 2:
      raise UserError(f"--samples={f.samples}: a pair needs at least 2 replies to choose from")
    if f.temperature <= 0:
      raise UserError(f"--temperature={f.temperature} must be > 0: greedy replies are all one")
    chats = read_prompts(f.prompts)
    score = reward_function(f.reward)
    run_cfg, handle, params, tokenizer = generate_lib.load_model(f.workdir, f.hf)
    template = generate_lib.chat_template(f, run_cfg, tokenizer)
    stop = template.stop_id(tokenizer)
    os.makedirs(f.out, exist_ok=True)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  ids = [templates.encode_chat(template, tokenizer, m, add_generation_prompt=True)[0].tolist()
         for m, _ in chats]
  replies, scores, t0 = [], [], time.perf_counter()
  for start in range(0, len(chats), f.batch):
    chunk = ids[start:start + f.batch]
    outs = generate_lib.generate(handle, params, [p for p in chunk for _ in range(f.samples)],
                                 f.max_new_tokens, temperature=f.temperature,
                                 stop_ids=[stop], seed=f.seed + start)
    for i in range(len(chunk)):
      texts = [tokenizer.decode([t for t in o if t != stop])
               for o in outs[i * f.samples:(i + 1) * f.samples]]
      messages, answer = chats[start + i]
      replies.append(texts)
      scores.append([float(score(messages, t, answer)) for t in texts])
    print(f"sampled {min(start + f.batch, len(chats))} of {len(chats)} prompts "
          f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
  expected = [float(score(m, a, a)) for m, a in chats]
  records = pairs_of(chats, replies, scores, expected, f.seed)
  with open(os.path.join(f.out, "train.jsonl"), "w") as tr, \
      open(os.path.join(f.out, "eval.jsonl"), "w") as ev:
    for i, r in enumerate(records):
      (ev if i % 20 == 19 else tr).write(json.dumps(r) + "\n")
  mean = float(np.mean([np.mean(s) for s in scores]))
  print(f"{len(records)} pairs from {len(chats)} prompts (mean reply score {mean:.3f}) in "
        f"{f.out}", file=sys.stderr)


def _define_flags():
  flags.DEFINE_string("workdir", None, "a training run's folder (latest checkpoint)")
  flags.DEFINE_string("hf", None, "a Hugging Face model folder")
  flags.DEFINE_string("prompts", None, "jsonl of chats, the last message the expected answer")
  flags.DEFINE_string("out", None, "folder for train.jsonl and eval.jsonl")
  flags.DEFINE_integer("samples", 8, "replies sampled per prompt")
  flags.DEFINE_integer("max_new_tokens", 8, "longest reply")
  flags.DEFINE_float("temperature", 1.0, "sampling temperature")
  flags.DEFINE_string("reward", "exact", "exact | module:function (prompt, reply, answer)")
  flags.DEFINE_string("template", None, "chat template (default: the run's or the folder's)")
  flags.DEFINE_integer("batch", 256, "prompts sampled at once")
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.mark_flags_as_required(["prompts", "out"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
