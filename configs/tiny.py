"""The CPU demo: a 4M-parameter Llama-style model on the Python standard library's source.

python -m trainer.main --config=configs/tiny.py --workdir=/tmp/run
python -m trainer.main --config=configs/tiny.py:smoke  # ~60k parameters, seconds: for tests
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
  if arg == "smoke":
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    c.data.update(max_chars=300_000, tokenizer_vocab_size=512)
    c.train.update(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5, log_every=5,
                   eval_every=20, eval_batches=2, checkpoint_every=20, sample_tokens=8)
  elif arg:
    raise ValueError(f"configs/tiny.py takes no argument or 'smoke', got {arg!r}")
  return c
