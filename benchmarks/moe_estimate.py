"""The estimator's per-device memory of mixture-of-experts runs against the compiler's, on 8
simulated CPU devices: the configs trainer/memory.py's MoE coefficients were fit to.

python benchmarks/moe_estimate.py   # one line per config: estimate / compiled, MiB
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs import medium, tiny  # noqa: E402
from trainer import estimate  # noqa: E402

CASES = [  # (recipe, mesh, remat, model overrides)
    (tiny, dict(data=8), "none", {}),
    (tiny, dict(data=1, expert=8, strategy="ep"), "none", {}),
    (tiny, dict(data=1, fsdp=2, expert=2, tensor=2, strategy="fsdp_tp"), "full", {}),
    (tiny, dict(data=1, fsdp=2, expert=4), "none", dict(moe_impl="capacity")),
    (medium, dict(data=2, expert=4), "none", {}),
    (tiny, dict(data=4, expert=2), "dots", {}),
    (medium, dict(data=1, fsdp=4, expert=2, strategy="fsdp"), "full", {}),
]


def main():
  print("recipe | mesh | remat | impl | compiled MiB | estimate / compiled")
  for recipe, mesh, remat, extra in CASES:
    cfg = recipe.get_config()
    cfg.model.update(n_experts=8, experts_per_token=2, expert_d_ff=cfg.model.d_ff // 2, **extra)
    cfg.mesh.update(**mesh)
    cfg.model.remat = remat
    est, (pl, _, batch) = estimate.estimate(cfg, jax.devices()[:8])
    compiled = estimate.compiled_bytes(pl, batch)["total"]
    print(f"{recipe.__name__.split('.')[-1]} | {mesh} | {remat} | {cfg.model.moe_impl} | "
          f"{compiled / 2**20:.1f} | {estimate.total_bytes(est) / compiled:.3f}", flush=True)


if __name__ == "__main__":
  main()
