"""Rollout speed: our KV-cache sampler (trainer/generate.py, as GRPO calls it) against
transformers' `generate` on the same model, prompts and sampling settings, in one process,
alternating (median of `--repeats` each).

python benchmarks/rollout.py --hf=/tmp/sft_hf [--prompts=256] [--new=8] [--repeats=3]
    [--out=benchmarks/results/rollout.json]

`--hf`: a causal LM folder both can load (e.g. `trainer.export` of configs/sft_chat.py, as in
configs/grpo_arith.py). Prompts are the chats of data/arith_chat/train.jsonl rendered with the
chat template, as GRPO renders them; sampling at temperature 1, `--new` tokens at most, stopping
at the template's end of turn. Tokens/s counts the new tokens the replies hold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.host import host_info  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--hf", required=True)
  ap.add_argument("--prompts", type=int, default=256)
  ap.add_argument("--new", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="")
  args = ap.parse_args()

  import torch
  import transformers
  from models import hf
  from models import handle as handles
  from trainer import generate
  from trainer.data import templates, tokenizer as tokenizer_lib
  from trainer.objectives.grpo import read_prompts

  cfg, params = hf.load(args.hf)
  handle = handles.model_handle(cfg)
  tok = tokenizer_lib.load(args.hf)
  template = templates.get("chatml")
  chats = read_prompts("data/arith_chat/train.jsonl")[:args.prompts]
  prompts = [templates.encode_chat(template, tok, m, add_generation_prompt=True)[0].tolist()
             for m, _ in chats]
  stop = template.stop_id(tok)

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model = transformers.AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
  model.eval()
  p = max(len(q) for q in prompts)
  ids = torch.zeros((len(prompts), p), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for r, q in enumerate(prompts):  # left padding, as our sampler lays prompts out
    ids[r, p - len(q):] = torch.tensor(q)
    mask[r, p - len(q):] = 1

  def ours(seed):
    outs = generate.generate(handle, params, prompts, args.new, temperature=1.0, stop_ids=[stop],
                             seed=seed, keep_stop=True)
    return sum(len(o) for o in outs)

  def theirs(seed):
    torch.manual_seed(seed)
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, max_new_tokens=args.new, eos_token_id=stop,
                           pad_token_id=stop)
    new = out[:, p:].numpy()
    ended = np.cumsum(new == stop, axis=1) - (new == stop)  # tokens after the first stop
    return int((ended == 0).sum())

  ours(0)  # compile
  theirs(0)
  times = {"ours": [], "transformers": []}
  tokens = {"ours": [], "transformers": []}
  for i in range(args.repeats):
    for name, fn in (("ours", ours), ("transformers", theirs)):
      t = time.perf_counter()
      n = fn(i + 1)
      times[name].append(time.perf_counter() - t)
      tokens[name].append(n)
  rate = {k: statistics.median(n / t for n, t in zip(tokens[k], times[k])) for k in times}
  result = {"host": host_info(), "prompts": len(prompts), "new_tokens": args.new,
            "tokens_per_s": rate, "ratio": rate["ours"] / rate["transformers"], "times": times,
            "tokens": tokens,
            "command": "python benchmarks/rollout.py " + " ".join(sys.argv[1:])}
  print(json.dumps({k: result[k] for k in ("tokens_per_s", "ratio", "tokens")}, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
