"""trainer/estimate.py: FLOPs by hand, memory against the compiler's own figure."""

import os
import subprocess
import sys

import jax
import pytest

from configs import medium, tiny
from trainer import estimate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flops_and_parameters_of_the_tiny_config_by_hand():
  cfg = tiny.get_config()
  est, _ = estimate.estimate(cfg, jax.devices())
  d, f, L, V, T = 256, 688, 4, 2048, 128
  per_layer = d * d + 2 * d * 128 + d * d + 3 * d * f + 2 * d  # q, k+v (2 KV heads of 64), o, mlp, norms
  assert est.params == L * per_layer + d + 2 * V * d
  matmul = L * per_layer + d + V * d  # the head is a matmul, the embedding lookup is not
  assert est.flops_per_token == 6 * matmul + 6 * L * T * d  # QK^T and PV: 4 T d, x3, causal / 2
  assert est.tokens == 300 * 16 * 128 and est.total_flops == est.flops_per_token * est.tokens


@pytest.mark.parametrize("recipe,mesh,remat", [
    (tiny, dict(data=8), "none"),
    (medium, dict(data=8), "none"),
    (medium, dict(data=1, fsdp=8, strategy="fsdp"), "none"),
    (medium, dict(data=1, fsdp=4, tensor=2, strategy="fsdp_tp"), "full"),
])
def test_memory_estimate_within_15_percent_of_the_compiled_step(recipe, mesh, remat):
  cfg = recipe.get_config()
  cfg.mesh.update(**mesh)
  cfg.model.remat = remat
  est, (pl, _, batch) = estimate.estimate(cfg, jax.devices()[:8])
  compiled = estimate.compiled_bytes(pl, batch)
  assert 0.85 < estimate.total_bytes(est) / compiled["total"] < 1.15, (est.bytes, compiled)
  # the state is exact: the step's arguments are the state and the batch
  state = sum(v for k, v in est.bytes.items() if "state" in k or "parameters" in k or
              k == "batch")
  assert state == compiled["arguments"]


@pytest.mark.parametrize("critic", ["policy", "lora"])
def test_memory_plan_of_ppo_models_within_15_percent(critic):
  """PPO's four models' slots (here three: the reward is a Python function) in the estimate:
  each model's parameters and the critic's optimizer state exactly, the total within 15%."""
  from configs import ppo_arith
  cfg = ppo_arith.get_config()
  cfg.rl.update(critic="policy", reward_model="", reward="exact")
  cfg.mesh.update(data=8)
  if critic == "lora":  # the reference is then the policy with its adapters off: no copy
    cfg.peft.update(method="lora", lora_rank=8)
  est, (pl, _, batch) = estimate.estimate(cfg, jax.devices()[:8])
  names = [s.name for s in pl.spec.slots]
  assert names == (["policy", "critic"] if critic == "lora" else
                   ["policy", "reference", "critic"])
  assert est.bytes["critic (trains): optimizer state"] > 0
  compiled = estimate.compiled_bytes(pl, batch)
  assert 0.85 < estimate.total_bytes(est) / compiled["total"] < 1.15, (est.bytes, compiled)
  state = sum(v for k, v in est.bytes.items() if "state" in k or "parameters" in k)
  # the state exactly; jit leaves out the rollout's columns the loss does not read (its weights,
  # its KL bookkeeping)
  assert state < compiled["arguments"] <= state + est.bytes["batch"]


MOE = dict(n_experts=8, experts_per_token=2)  # each expert half the dense MLP's width


@pytest.mark.parametrize("recipe,mesh,remat", [
    (tiny, dict(data=8), "none"),  # no expert parallelism: dropless still per device
    (tiny, dict(data=1, expert=8, strategy="ep"), "none"),
    (tiny, dict(data=1, fsdp=2, expert=2, tensor=2, strategy="fsdp_tp"), "full"),
    pytest.param(medium, dict(data=1, fsdp=2, expert=2, tensor=2, strategy="fsdp_tp"), "full",
                 marks=pytest.mark.slow),
])
def test_memory_estimate_of_a_mixture_of_experts_within_15_percent(recipe, mesh, remat):
  cfg = recipe.get_config()
  cfg.model.update(**MOE, expert_d_ff=cfg.model.d_ff // 2)
  cfg.mesh.update(**mesh)
  cfg.model.remat = remat
  est, (pl, mcfg, batch) = estimate.estimate(cfg, jax.devices()[:8])
  compiled = estimate.compiled_bytes(pl, batch)
  assert 0.85 < estimate.total_bytes(est) / compiled["total"] < 1.15, (est.bytes, compiled)
  state = sum(v for k, v in est.bytes.items() if "state" in k or "parameters" in k or
              k == "batch")
  assert state == compiled["arguments"]
  # the experts' weights are most of the model, and each device holds 1 / mesh.expert of them
  experts = sum(k == "moe" for k in mcfg.layer_kinds()) * 3 * mcfg.n_experts * \
      mcfg.d_model * mcfg.expert_d_ff * 4
  others = mcfg.num_params() * 4 - experts
  assert est.bytes["parameters"] <= others + experts / mesh.get("expert", 1)


def test_command_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "trainer.estimate", "--config=configs/tiny.py", "--devices=8",
       "--strategies=dp,zero2,fsdp", "--compile=false", "--peak_tflops=100", "--mfu=0.5"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "parameters: 3,950,848" in out and "time at 50% MFU of 100 TFLOP/s" in out
  rows = {l.split("|")[1].strip(): float(l.split("|")[-2]) for l in out.splitlines()
          if l.startswith("| ") and l.split("|")[1].strip() in ("dp", "zero2", "fsdp")}
  assert rows["dp"] > rows["zero2"] > rows["fsdp"]
  bad = subprocess.run([sys.executable, "-m", "trainer.estimate", "--config.mesh.data=3",
                        "--devices=8"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "mesh" in bad.stderr
