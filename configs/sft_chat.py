"""Supervised fine-tuning on a jsonl chat file: loss on assistant turns only.

The default data is the generated task set in data/arith_chat (repeating and reversing random
words, adding two numbers; checkable answers); held-out exact-match accuracy is measured before
training and at every eval (0.0 -> 0.925 in 8 to 9 minutes on a 2-core Zen 3 CPU, BENCHMARKS.md).

python -m trainer.main --config=configs/sft_chat.py --workdir=/tmp/sft
python -m trainer.main --config=configs/sft_chat.py --config.data.train_files=my.jsonl \
    --config.data.template=llama3 --config.data.tokenizer=path/to/tokenizer.json
"""

import os

from configs import base

_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                     "arith_chat")


def get_config(arg=None):
  del arg
  c = base.get_config()
  c.model.update(vocab_size=0, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=512,
                 max_seq_len=256, rope_theta=10000.0)
  c.data.update(source="files", format="chat", template="chatml", packing="greedy",
                truncation="truncate", train_files=os.path.join(_DATA, "train.jsonl"),
                eval_files=os.path.join(_DATA, "eval.jsonl"), tokenizer_vocab_size=400)
  c.train.update(objective="sft", steps=1500, batch_size=32, seq_len=64, lr=1e-3,
                 warmup_steps=50, log_every=20, eval_every=500, eval_batches=2, checkpoint_every=500,
                 eval_exact_match=200, sample_tokens=0, weight_decay=0.0)
  return c
