"""A GRPO train step (rollout + update) of ours against TRL's `GRPOTrainer` on torch CPU, same
model, prompts and shapes, in one process, alternating (median step time of each).

python benchmarks/grpo_step.py --hf=/tmp/sft_hf [--steps=8] [--repeats=2]
    [--out=benchmarks/results/grpo_step.json]

`--hf`: a causal LM folder both load (configs/grpo_arith.py's SFT model). Both take GRPO steps as
configs/grpo_arith.py sets them: 16 prompts of data/arith_chat/train.jsonl x 16 replies of at
most 8 tokens (temperature 1, stop at the end of turn), exact-answer reward, group std-normalised
advantages, beta 0.04 (a frozen reference forward each step), lr 1e-4, float32, one update per
rollout. TRL gets each prompt as the chat template's text (its tokenizer maps the template's
special tokens to the same ids) and samples with transformers' `generate`. A run's step time is
the median over its steps after the first (compilation, warm-up); each side runs `--repeats`
times, alternating, and the figure is the median of those.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host import host_info  # noqa: E402

PROMPTS, GROUP, NEW = 16, 16, 8


def ours(hf_dir: str, steps: int) -> float:
  """Median seconds per GRPO step of configs/grpo_arith.py (after the first)."""
  import jax
  from configs import grpo_arith
  from trainer import train

  c = grpo_arith.get_config(hf_dir)
  c.train.update(steps=steps, log_every=1, eval_every=0, eval_exact_match=0,
                 checkpoint_every=0, eval_batches=1)
  times = []
  with tempfile.TemporaryDirectory() as workdir:
    train.run(c, workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        m = json.loads(line)
        if m.get("tokens_per_sec"):  # positions per second since the last log (one step)
          times.append(c.train.batch_size * c.train.seq_len / m["tokens_per_sec"])
  return statistics.median(times)


def trl(hf_dir: str, steps: int) -> float:
  import datasets
  import torch
  import transformers
  import trl as trl_lib
  from trainer.data import templates, tokenizer as tokenizer_lib
  from trainer.objectives.grpo import read_prompts

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  ours_tok = tokenizer_lib.load(hf_dir)
  template = templates.get("chatml")
  chats = read_prompts("data/arith_chat/train.jsonl")[:PROMPTS * steps]
  rows = []
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  for messages, answer in chats:
    ids = templates.encode_chat(template, ours_tok, messages, add_generation_prompt=True)[0]
    text = ours_tok.decode(ids.tolist())
    rows.append({"prompt": text, "answer": answer, "n": len(ids)})
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  stop = template.stop_id(ours_tok)

  def exact(prompts, completions, answer, **kwargs):
    return [float(c.split(tok.convert_ids_to_tokens(stop))[0].strip() == a.strip())
            for c, a in zip(completions, answer)]

  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  model.generation_config.eos_token_id = stop
  times = []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.t)

  with tempfile.TemporaryDirectory() as out:
    cfg = trl_lib.GRPOConfig(
        output_dir=out, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
        max_completion_length=NEW, temperature=1.0, beta=0.04, learning_rate=1e-4,
        lr_scheduler_type="constant", max_steps=steps, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, max_grad_norm=1.0, seed=0,
        gradient_accumulation_steps=1, num_iterations=1, loss_type="grpo",
        shuffle_dataset=False, disable_tqdm=True)
    trainer = trl_lib.GRPOTrainer(model=model, reward_funcs=exact, args=cfg,
                                  train_dataset=datasets.Dataset.from_list(rows),
                                  processing_class=tok, callbacks=[Timer()])
    trainer.train()
  return statistics.median(times[1:])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--hf", required=True)
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  runs = {"ours": [], "trl": []}
  for _ in range(args.repeats):
    runs["ours"].append(ours(args.hf, args.steps))
    runs["trl"].append(trl(args.hf, args.steps))
    print(f"ours {runs['ours'][-1]:.3f} s/step, TRL {runs['trl'][-1]:.3f} s/step", flush=True)
  o, t = statistics.median(runs["ours"]), statistics.median(runs["trl"])
  result = {"host": host_info(), "hf": args.hf, "prompts": PROMPTS, "group": GROUP,
            "max_new_tokens": NEW, "steps": args.steps, "runs": runs,
            "ours_s_per_step": o, "trl_s_per_step": t, "speedup": t / o}
  print(f"GRPO step: ours {o:.3f} s, TRL GRPOTrainer {t:.3f} s: {t / o:.2f}x")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
