"""Mistral 7B v0.1: Llama shape with a 4096-token sliding attention window."""

from configs import base


def get_config(arg=None):
  del arg
  c = base.get_config()
  c.model.update(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 d_ff=14336, max_seq_len=32768, rope_theta=10000.0, sliding_window=4096,
                 remat="full")
  c.train.update(seq_len=8192, batch_size=256, warmup_steps=2000, steps=100_000)
  c.precision.compute_dtype = "bfloat16"
  c.mesh.update(data=1, fsdp=-1, strategy="fsdp")
  return c
