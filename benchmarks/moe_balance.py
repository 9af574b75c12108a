"""Does balancing keep a mixture of experts' load even? configs/moe_tiny.py trained four times on
the default corpus: as configured (batch-balanced training routing, `router_batch_balance`,
with the Switch balancing loss and the auxiliary-loss-free routing bias,
`router_bias_update_rate`), without the batch balancing (loss and bias), with the balancing
loss only, and with no balancing at all; the experts' load read from metrics.jsonl:
moe_share_max and moe_share_min, the most and least loaded expert's share of the routed (token,
expert) pairs times n_experts (1 is uniform; the extremes over the layers, per logged step:
every step by default, so that step 1, the routing of the freshly initialised model, is in the
figures), and at each evaluation the same shares of the evaluation routing (no batch
balancing there) with the eval loss. Also runs the configured recipe twice for a few steps and
compares their metrics bit for bit, so that the figures are those of a deterministic run (one
run per setting is then enough).

python benchmarks/moe_balance.py [--steps N --log_every 1 --repeat_steps 20
    --out benchmarks/results/moe_balance.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/moe_tiny.py"
BAND = (0.5, 2.0)  # within 2x of uniform
TIMING_KEYS = ("tokens_per_sec", "mfu")  # wall-clock figures: differ between identical runs


def train(workdir: str, *overrides: str) -> list[dict]:
  """The metrics.jsonl lines of a `trainer.main` run of CONFIG with `overrides`."""
  cmd = [sys.executable, "-m", "trainer.main", f"--config={CONFIG}", f"--workdir={workdir}",
         *overrides]
  print("$", " ".join(cmd[1:]), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def summary(lines: list[dict]) -> dict:
  """Loss and load figures of a run's training lines."""
  steps = [m for m in lines if "moe_share_max" in m]
  lo, hi = BAND
  outside = [m["step"] for m in steps if not lo <= m["moe_share_min"] <= m["moe_share_max"] <= hi]
  later = [m["step"] for m in steps if m["step"] > max(outside, default=0)]
  return {
      "logged_steps": len(steps), "loss_first": steps[0]["loss"], "loss_final": steps[-1]["loss"],
      "share_max_final": steps[-1]["moe_share_max"],
      "share_min_final": steps[-1]["moe_share_min"],
      "share_max_worst": max(m["moe_share_max"] for m in steps),
      "share_min_worst": min(m["moe_share_min"] for m in steps),
      "steps_outside_band": outside,
      "within_band_from_step": later[0] if later else None,
      "share_max_worst_second_half": max(m["moe_share_max"] for m in steps[len(steps) // 2:]),
      "share_min_worst_second_half": min(m["moe_share_min"] for m in steps[len(steps) // 2:]),
      "evals": [{k: m[k] for k in ("step", "eval_loss", "eval_moe_share_max",
                                   "eval_moe_share_min")} for m in lines if "eval_loss" in m],
      "trace": [{k: m[k] for k in ("step", "loss", "moe_share_max", "moe_share_min")}
                for m in steps]}


def same_run(a: list[dict], b: list[dict]) -> bool:
  strip = lambda lines: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]
  return strip(a) == strip(b)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=0, help="train.steps (0: the config's)")
  ap.add_argument("--log_every", type=int, default=1, help="train.log_every of the two runs")
  ap.add_argument("--repeat_steps", type=int, default=20,
                  help="steps of the twice-run repeatability check (0: skip it)")
  ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                "moe_balance.json"))
  args = ap.parse_args()
  steps = [f"--config.train.steps={args.steps}"] if args.steps else []
  steps += [f"--config.train.log_every={args.log_every}"]
  results = {"config": CONFIG, "band": BAND}
  with tempfile.TemporaryDirectory() as tmp:
    if args.repeat_steps:
      short = [f"--config.train.steps={args.repeat_steps}", "--config.train.log_every=5"]
      twice = [train(os.path.join(tmp, f"repeat{i}"), *short) for i in range(2)]
      results["bitwise_repeatable"] = same_run(*twice)
      results["repeat_steps"] = args.repeat_steps
      print(f"two {args.repeat_steps}-step runs alike bit for bit: "
            f"{results['bitwise_repeatable']}", flush=True)
    no_batch = "--config.model.router_batch_balance=0"
    no_bias = "--config.model.router_bias_update_rate=0"
    for name, extra in (("balanced", []), ("loss_and_bias", [no_batch]),
                        ("balance_loss_only", [no_batch, no_bias]),
                        ("no_balancing", [no_batch, no_bias,
                                          "--config.model.router_aux_loss_weight=0"])):
      s = summary(train(os.path.join(tmp, name), *steps, *extra))
      results[name] = {"overrides": steps + extra} | s
      print(f"{name}: loss {s['loss_first']:.3f} -> {s['loss_final']:.3f}; share max final "
            f"{s['share_max_final']:.2f}, worst {s['share_max_worst']:.2f}; share min final "
            f"{s['share_min_final']:.2f}, worst {s['share_min_worst']:.2f}; within "
            f"[{BAND[0]}, {BAND[1]}] from step {s['within_band_from_step']}; eval "
            + ", ".join(f"{e['step']}: {e['eval_loss']:.3f} ({e['eval_moe_share_max']:.2f} / "
                        f"{e['eval_moe_share_min']:.2f})" for e in s["evals"]), flush=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
