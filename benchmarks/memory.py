"""Per-device memory of the train state under each parallelism strategy, from the compiler.

Each strategy's train step is compiled for 8 (simulated) devices and
`compiled.memory_analysis()` read: the arguments are the train state (parameters + optimizer
state) and the batch, the temporaries hold gradients and activations. Beside it, the ZeRO paper's
formula for the state: with float32 master weights, float32 gradients and Adam's two float32
moments, 16 bytes per parameter (the paper's 2 + 2 + 12 in mixed precision also adds to 16),
of which ZeRO-1 shards the 8 bytes of moments, ZeRO-2 also the 4 of gradients, ZeRO-3 all 16.

XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/memory.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import parallel  # noqa: E402
from trainer import train  # noqa: E402
from trainer.validate import model_config  # noqa: E402

# name -> mesh settings (8 devices)
CASES = {
    "dp8": dict(data=8, strategy="dp"),
    "zero1 dp8": dict(data=8, strategy="zero1"),
    "zero2 dp8": dict(data=8, strategy="zero2"),
    "fsdp8": dict(data=1, fsdp=8, strategy="fsdp"),
    "fsdp4 x tp2": dict(data=1, fsdp=4, tensor=2, strategy="fsdp_tp"),
    "dp2 x fsdp2 x tp2": dict(data=2, fsdp=2, tensor=2, strategy="fsdp_tp"),
}
# bytes per parameter of (state argument: params + Adam moments, gradients), given N devices
FORMULA = {
    "dp": lambda n: (4 + 8, 4), "zero1": lambda n: (4 + 8 / n, 4),
    "zero2": lambda n: (4 + 8 / n, 4 / n), "fsdp": lambda n: (12 / n, 4 / n),
}


def measure(cfg, name: str, mesh_settings: dict, vocab_size: int) -> dict:
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.update(**mesh_settings)
  mcfg = model_config(cfg, vocab_size)
  mesh = parallel.make_mesh(dict(cfg.mesh), jax.devices()[:8])
  pl = train.plan(cfg, mcfg, mesh)
  batch = train.abstract_batch(cfg, pl.batch_sharding, pl.objective)
  with parallel.activate(mesh, pl.rules):
    compiled = pl.train_step.lower(pl.abstract_state, batch).compile()
  mem = compiled.memory_analysis()
  n_params = mcfg.num_params()
  state_total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pl.abstract_state))
  batch_per_device = sum(x.size * x.dtype.itemsize for x in batch.values()) / (
      mesh.shape["data"] * mesh.shape["fsdp"])
  base = cfg.mesh.strategy.split("_")[0]
  # ZeRO-1/2 shard over all data-parallel devices; FSDP over `fsdp`, tensor parallelism over
  # `tensor` on top (norm scales, a rounding error here, are not split by `tensor`).
  n = (mesh.shape["data"] * mesh.shape["fsdp"] if base in ("dp", "zero1", "zero2")
       else mesh.shape["fsdp"] * mesh.shape["tensor"])
  formula_state, formula_grads = FORMULA[base](n)
  return {
      "name": name, "params": n_params,
      "state_bytes_unsharded": state_total,
      "state_bytes_per_device": mem.argument_size_in_bytes - batch_per_device,
      "temp_bytes_per_device": mem.temp_size_in_bytes,
      "formula_state_bytes": formula_state * n_params,
      "formula_grad_bytes": formula_grads * n_params,
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  from configs import tiny
  cfg = tiny.get_config()
  # the throughput benchmark's shape
  cfg.model.update(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1536, max_seq_len=512)
  cfg.train.update(batch_size=8, seq_len=512)
  rows = [measure(cfg, name, m, vocab_size=8192) for name, m in CASES.items()]
  mib = 2**20
  print(f"{rows[0]['params'] / 1e6:.1f}M parameters; MiB per device")
  print("| strategy | state (params + Adam), compiled | ZeRO formula | state / unsharded | "
        "temporaries (grads + activations) | formula grads |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['name']} | {r['state_bytes_per_device'] / mib:.1f} | "
          f"{r['formula_state_bytes'] / mib:.1f} | "
          f"{r['state_bytes_per_device'] / r['state_bytes_unsharded']:.3f} | "
          f"{r['temp_bytes_per_device'] / mib:.1f} | {r['formula_grad_bytes'] / mib:.1f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
