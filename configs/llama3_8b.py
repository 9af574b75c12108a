"""Llama 3 8B (and 3.1 8B with `:3.1`): the real shape, for FSDP on accelerators."""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.model.update(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 d_ff=14336, max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5, remat="full")
  if arg == "3.1":
    c.model.update(max_seq_len=131072, rope_scaling="llama3", rope_factor=8.0,
                   rope_original_max_len=8192, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
  c.train.update(seq_len=8192, batch_size=256, lr=3e-4, warmup_steps=2000, steps=100_000)
  c.precision.compute_dtype = "bfloat16"
  c.mesh.update(data=1, fsdp=-1, strategy="fsdp")
  return c
