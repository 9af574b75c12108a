"""The CPU demo: a ~3.5M-parameter Llama-style model on the Python standard library's source.

python -m trainer.main --config=configs/tiny.py --workdir=/tmp/run
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.model.update(vocab_size=0, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=688,
                 max_seq_len=1024, rope_theta=10000.0)
  c.data.tokenizer_vocab_size = 2048
  c.data.max_chars = 3_000_000
  c.train.update(steps=300, batch_size=16, seq_len=128, lr=2e-3, warmup_steps=30,
                 log_every=10, eval_every=100, eval_batches=4, checkpoint_every=100)
  return c
