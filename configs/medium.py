"""A 32M-parameter Llama shape on the Python standard library's source: the shape of
benchmarks/train_throughput.py and of the estimator's check (tests/test_estimate.py).

python -m trainer.main --config=configs/medium.py --workdir=/tmp/medium
python -m trainer.estimate --config=configs/medium.py --devices=8
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.model.update(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1536,
                 max_seq_len=512, rope_theta=10000.0)
  c.data.tokenizer_vocab_size = 8192
  c.data.max_chars = 20_000_000
  c.train.update(steps=2000, batch_size=8, seq_len=512, lr=1e-3, warmup_steps=100,
                 log_every=10, eval_every=500, eval_batches=4, checkpoint_every=500)
  if arg:
    raise ValueError(f"configs/medium.py takes no argument, got {arg!r}")
  return c
