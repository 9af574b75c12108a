"""A run config small enough for tests: a ~100k-parameter model on a slice of the default corpus."""

from configs import tiny


def config(**train):
  c = tiny.get_config()
  c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
  c.data.update(max_chars=300_000, tokenizer_vocab_size=512)
  c.train.update(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5, log_every=5,
                 eval_every=20, eval_batches=2, checkpoint_every=20, sample_tokens=8)
  c.train.update(**train)
  return c
