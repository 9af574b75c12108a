"""PPO on the bundled arithmetic chats with four models: the actor and the frozen reference
start from an SFT checkpoint; the reward model is one the project trained (train.objective=reward)
on preference pairs of the actor's own samples, judged by the exact-answer checker; the critic
starts from the reward model.

    # 1. the policy: an SFT model part-way trained (step 200 of configs/sft_chat.py), exported
    python -m trainer.main --config=configs/sft_chat.py --workdir=/tmp/sft200 \
        --config.train.stop_after_steps=200 --config.train.checkpoint_every=200
    python -m trainer.export --workdir=/tmp/sft200 --out=/tmp/sft200_hf
    # 2. the reward model's backbone: the same run trained on to its end (step 1500)
    cp -r /tmp/sft200 /tmp/sft_long
    python -m trainer.main --config=configs/sft_chat.py --workdir=/tmp/sft_long
    python -m trainer.export --workdir=/tmp/sft_long --out=/tmp/sft_long_hf
    # 3. pairs from the policy's samples (8 per prompt; the checker picks chosen and rejected)
    python -m trainer.sample_pairs --hf=/tmp/sft200_hf --template=chatml \
        --prompts=data/arith_chat/train.jsonl --out=/tmp/pairs200 --samples=8
    # 4. the reward model: Bradley-Terry on those pairs
    python -m trainer.main --config=configs/reward.py:/tmp/sft_long_hf --workdir=/tmp/rm200 \
        --config.data.train_files=/tmp/pairs200/train.jsonl \
        --config.data.eval_files=/tmp/pairs200/eval.jsonl --config.train.steps=500
    # 5. PPO (the argument: the policy's folder and the reward model's run folder)
    python -m trainer.main --config=configs/ppo_arith.py:/tmp/sft200_hf,/tmp/rm200 \
        --workdir=/tmp/ppo

The reward is the reward model's score alone, standardised by the first rollout's mean and
standard deviation (`rl.normalize_reward`), so that the KL coefficient (0.3 per token) and the
value clip (0.2) mean the same whatever scale the reward model's training gave its scores; the
exact-answer check is logged as `accuracy` (and held-out exact match, greedy, every 50 steps) to
see whether what the reward model learnt is what we want. Each step samples 16 replies to each
of 16 prompts. BENCHMARKS.md "PPO on the arithmetic chats" has the run, the same from the
step-300 SFT model (less to gain: +0.13), and the runs that failed (a reward model on the
synthetic pairs of data/arith_pref was exploited: reward up, accuracy down; raw scores with a
KL coefficient of 0.05 drifted: reward up, accuracy flat).
"""

import os

from configs import sft_chat


def get_config(arg=None):
  c = sft_chat.get_config()
  if arg:
    parts = arg.split(",")
    if len(parts) != 2 or not all(os.path.isdir(p) for p in parts):
      raise ValueError("configs/ppo_arith.py takes SFT_HF_DIR,REWARD_RUN_DIR (trainer.export's "
                       f"--out and a train.objective=reward run's --workdir), got {arg!r}")
    c.model.init_from = f"hf:{parts[0]}"
    c.rl.reward_model = parts[1]
  c.train.update(objective="ppo", steps=300, batch_size=16, seq_len=192, lr=1e-4,
                 lr_schedule="cosine", warmup_steps=10, log_every=10, eval_every=50,
                 eval_batches=2, eval_exact_match=200, checkpoint_every=50, clip_norm=1.0)
  c.rl.update(group_size=16, max_new_tokens=8, temperature=1.0, iterations=2, kl_coef=0.3,
              critic="reward", critic_lr=1e-4, vf_coef=0.1, gamma=1.0, lam=0.95)
  if not arg:  # no reward model given: the exact-answer reward, a critic from the policy
    c.rl.critic = "policy"
  return c
