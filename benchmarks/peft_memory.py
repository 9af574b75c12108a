"""Train-state memory per fine-tuning method: parameters, optimizer state, and the compiler's
temporary memory of one train step.

Shape (issue 10's benchmark): 8 layers, d=512, 8 heads / 2 KV heads, ffn 1536, vocab 8192,
float32 parameters, batch 8 x 512, one CPU device. Bytes come from the abstract train state
(exact) and `memory_analysis()` of the compiled step.

python benchmarks/peft_memory.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import parallel  # noqa: E402
from configs import base  # noqa: E402
from trainer import train  # noqa: E402
from trainer.validate import model_config  # noqa: E402

SHAPE = dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1536,
             max_seq_len=512, rope_theta=10000.0)
METHODS = {
    "full fine-tuning": {},
    "LoRA r=16, all linear": dict(method="lora", rank=16, alpha=32.0),
    "QLoRA r=16 (NF4 base)": dict(method="lora", rank=16, alpha=32.0, base_quant="nf4"),
    "DoRA r=16": dict(method="dora", rank=16, alpha=32.0),
    "IA3": dict(method="ia3"),
    "LISA, 2 of 8 layers at a time": dict(method="lisa", lisa_activated_layers=2),
}


def nbytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main():
  mesh = parallel.make_mesh(dict(data=1), jax.devices()[:1])
  print("| method | parameters | optimizer state | step temporaries (compiler) |")
  print("| --- | --- | --- | --- |")
  for name, section in METHODS.items():
    c = base.get_config()
    c.model.update(**SHAPE)
    c.train.update(batch_size=8, seq_len=512)
    c.mesh.update(data=1)
    c.peft.update(**section)
    pl = train.plan(c, model_config(c, SHAPE["vocab_size"]), mesh)
    state = pl.abstract_state
    batch = {k: jax.ShapeDtypeStruct((8, 512), jnp.float32 if k == "weights" else jnp.int32,
                                     sharding=pl.batch_sharding) for k in train.BATCH_KEYS}
    with parallel.activate(mesh, pl.rules):
      temp = pl.train_step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    mib = lambda b: f"{b / 2**20:.1f} MiB"
    print(f"| {name} | {mib(nbytes(state['params']))} | {mib(nbytes(state['opt_state']))} | "
          f"{mib(temp)} |", flush=True)


if __name__ == "__main__":
  main()
