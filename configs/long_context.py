"""Extend a trained model's context 4x: its rope rescaled (YaRN by default, or position
interpolation) and ring attention over the sequence axis, trained on rows 4x as long.

The base: configs/tiny.py trained at 128 tokens a row, written as a Hugging Face folder:

python -m trainer.main --config=configs/tiny.py --workdir=/tmp/base --config.train.steps=3000 \
    --config.train.eval_every=500 --config.train.checkpoint_every=500
python -m trainer.export --workdir=/tmp/base --out=/tmp/base_hf

Then the extension, on 4 devices (here simulated CPUs; on GPUs or TPUs the real ones), and the
perplexity by position before and after (BENCHMARKS.md):

XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m trainer.main \\
    --config=configs/long_context.py --workdir=/tmp/long_yarn
python benchmarks/long_context_table.py --base=/tmp/base_hf --runs=/tmp/long_yarn

configs/long_context.py:linear extends by position interpolation instead, and
configs/long_context.py:none trains on the long rows with the rope as it was (the control).
"""

from configs import tiny


def get_config(arg=None):
  c = tiny.get_config()
  method = arg or "yarn"
  if method not in ("yarn", "linear", "none"):
    raise ValueError(f"configs/long_context.py takes yarn (default), linear or none, got {arg!r}")
  # the folder's shape and weights; the rope below replaces its own, and the model's positions
  # grow to rope_original_max_len x rope_factor (trainer/validate.py CONTEXT)
  c.model.update(init_from="hf:/tmp/base_hf", rope_scaling=method, rope_factor=4.0,
                 rope_original_max_len=128, attention_impl="ring")
  c.mesh.update(data=1, sequence=-1)  # every device holds a quarter of each row's tokens
  c.train.update(steps=200, batch_size=4, seq_len=512, lr=3e-4, warmup_steps=20,
                 eval_every=100, eval_batches=4, checkpoint_every=100, sample_tokens=0)
  return c
