"""Direct preference optimisation on generated pairs with checkable answers.

The default data is data/arith_pref (right against plausible wrong answers to repeating and
reversing words and adding numbers; trainer/data/synthetic.py). Held-out preference accuracy,
the share of pairs whose implicit reward beta * (log-ratio to the reference) is higher for the
right answer, is `eval_accuracy` (BENCHMARKS.md has the figures).

python -m trainer.main --config=configs/dpo.py --workdir=/tmp/dpo
python -m trainer.main --config=configs/dpo.py --config.dpo.loss=ipo   # or simpo, orpo
python -m trainer.main --config=configs/dpo.py:HF_DIR --config.peft.method=lora  # from a model

The usual pipeline, SFT on data/arith_chat (same generator, no wrong answers) and then DPO from
it, reaches held-out preference accuracy 0.92 at its last step in 7 min 39 s on an idle
2-core CPU, against 0.685 for 1000 steps from scratch:

python -m trainer.main --config=configs/sft_chat.py --workdir=/tmp/sft --config.train.steps=800 \
  && python -m trainer.export --workdir=/tmp/sft --out=/tmp/sft_hf \
  && python -m trainer.main --config=configs/dpo.py:/tmp/sft_hf --workdir=/tmp/dpo_sft
"""

import os

from configs import base

_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                     "arith_pref")


def get_config(arg=None):
  c = base.get_config()
  c.model.update(vocab_size=0, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=512,
                 max_seq_len=256, rope_theta=10000.0)
  if arg:  # a Hugging Face model folder to start from (its tokenizer too)
    c.model.init_from = f"hf:{arg}"
  c.data.update(source="files", format="preference", template="chatml", packing="greedy",
                train_files=os.path.join(_DATA, "train.jsonl"),
                eval_files=os.path.join(_DATA, "eval.jsonl"), tokenizer_vocab_size=400)
  c.train.update(objective="dpo", steps=1000, batch_size=16, seq_len=128, lr=2e-3,
                 warmup_steps=20, log_every=20, eval_every=250, eval_batches=4,
                 checkpoint_every=250, sample_tokens=0, weight_decay=0.0)
  c.dpo.update(loss="sigmoid", beta=0.1)
  if arg:  # from a fine-tuned model: a few hundred steps at a gentler rate, a firmer KL anchor
    # (beta 0.1 and lr 1e-3 peaked at 0.77 by step 150 and fell to 0.735 by step 300)
    c.train.update(steps=300, lr=5e-4, eval_every=50)
    c.dpo.update(beta=0.25)
  return c
