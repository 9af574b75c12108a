"""Qwen2 7B: biases on q/k/v, a large vocabulary, rope theta 1e6."""

from configs import base


def get_config(arg=None):
  del arg
  c = base.get_config()
  c.model.update(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                 d_ff=18944, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
                 remat="full")
  c.train.update(seq_len=8192, batch_size=256, warmup_steps=2000, steps=100_000)
  c.precision.compute_dtype = "bfloat16"
  c.mesh.update(data=1, fsdp=-1, strategy="fsdp")
  return c
