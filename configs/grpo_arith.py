"""GRPO on the bundled arithmetic chats, from an SFT checkpoint, with the exact answer as reward.

    # 1. an SFT model part-way trained (configs/sft_chat.py's first 300 of 1500 steps)
    python -m trainer.main --config=configs/sft_chat.py --workdir=/tmp/sft \
        --config.train.stop_after_steps=300 --config.train.checkpoint_every=300
    python -m trainer.export --workdir=/tmp/sft --out=/tmp/sft_hf
    # 2. GRPO from it (the folder is the config's argument)
    python -m trainer.main --config=configs/grpo_arith.py:/tmp/sft_hf --workdir=/tmp/grpo

Each step samples 16 replies to each of 16 prompts of data/arith_chat/train.jsonl (temperature
1), rewards a reply 1 when it is exactly the expected answer, and takes one GRPO step (group
std-normalised advantages, clipped ratio, k3 KL to the SFT model with beta 0.04). Held-out exact
match (200 chats, greedy) is measured before training and every 50 steps; BENCHMARKS.md "GRPO
on the arithmetic chats" has the run.
"""

import os

from configs import sft_chat


def get_config(arg=None):
  c = sft_chat.get_config()
  if arg:
    if not os.path.isdir(arg):
      raise ValueError(f"configs/grpo_arith.py takes the SFT model's Hugging Face folder "
                       f"(trainer.export --out), got {arg!r}")
    c.model.init_from = f"hf:{arg}"
  c.train.update(objective="grpo", steps=300, batch_size=16, seq_len=192, lr=1e-4,
                 lr_schedule="constant", warmup_steps=10, log_every=10, eval_every=50,
                 eval_batches=2, eval_exact_match=200, checkpoint_every=50, clip_norm=1.0)
  c.rl.update(group_size=16, max_new_tokens=8, temperature=1.0, beta=0.04, loss_type="grpo")
  return c
