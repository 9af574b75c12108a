"""Training throughput of a Mixtral-shaped mixture of experts: ours against transformers'
`MixtralForCausalLM` on torch, and our three dispatches (dropless, capacity, dense) against
each other, all in this one process, alternating in rounds.

The shape: 4 layers, d_model 512, 8 heads over 2 KV heads, 8 experts of width 1792 (Mixtral's
14336 / 4096 = 3.5 times d_model), top-2 with renormalised weights, vocab 8192 (Mixtral's 32000
would make the LM head a third of the step and dilute what this measures), sequence 256, batch
4 (1,024 tokens: 4-5 s a step on two shared cores), float32, AdamW with clipping at 1.0, the Switch
balancing loss at Mixtral's 0.02 on both sides (the peer: `output_router_logits=True`). Ours is
the step `trainer.train.plan` builds, exactly what `trainer.main` runs
(benchmarks/train_throughput.py's `compiled_step`), with the config's remat policy unless
`--remat`; the peer uses its default experts implementation (`grouped_mm` in transformers 5:
`torch.nn.functional.grouped_mm` over the expert-sorted rows, gate and up fused in one weight),
which the JSON records. Each round gives every side one untimed step, then `--steps` timed
ones; figures are medians over the rounds, and the JSON records the CPU model and ISA.

python benchmarks/moe_throughput.py [--rounds 3 --steps 2 --warm_steps 1
    --impls dropless,capacity,dense,dense_ffn --remat POLICY --out benchmarks/results/moe_throughput.json]
The recorded figures: --remat none --impls dropless,dropless@dots_no_batch,capacity,dense
(the peer keeps every activation too; the default dots_no_batch keeps the grouped FFN's named
outputs, gmm.EXPERT_FFN, so it times the same). Run it with nothing else on the machine: torch's
threads slow down far more than XLA's under contention, which once inflated our ratio 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host import host_info  # noqa: E402
from benchmarks.train_throughput import _timed, compiled_step, runner, tokens  # noqa: E402
from configs import base  # noqa: E402
from trainer import hugepages, metrics as metrics_lib  # noqa: E402
from trainer.validate import execution, model_config  # noqa: E402

AUX_WEIGHT = 0.02  # Mixtral's router_aux_loss_coef


def config(impl: str = "dropless", remat: str = ""):
  c = base.get_config()
  c.model.update(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=1792,
                 max_seq_len=256, rope_theta=1e6)
  c.model.update(n_experts=8, experts_per_token=2, expert_d_ff=1792,
                 router_aux_loss_weight=AUX_WEIGHT, moe_impl=impl, capacity_factor=1.25)
  if remat:
    c.model.remat = remat
  c.precision.compute_dtype = "float32"
  c.mesh.update(data=1)
  c.train.update(batch_size=4, seq_len=256, lr=1e-4, warmup_steps=0, lr_schedule="constant")
  return c


def ours(name: str, remat: str):
  """Our step for `name`: a dispatch (models/moe.py), or "dispatch@remat" with that remat
  policy instead of `remat` (or the config's); "dense_ffn": no experts, a dense MLP of width k x
  expert_d_ff in every layer, the same matmul FLOPs per token as the active experts (a bound
  on what any dispatch can reach: the routing and the 3x larger optimizer update are gone)."""
  impl, _, own_remat = name.partition("@")
  if impl == "dense_ffn":
    cfg = config("dropless", own_remat or remat)
    m = cfg.model
    m.update(d_ff=m.experts_per_token * m.expert_d_ff, n_experts=0, experts_per_token=0,
             router_aux_loss_weight=0.0)
    return compiled_step(cfg)
  return compiled_step(config(impl, own_remat or remat))


def peer():
  """(run(n) -> loss, first step seconds, experts implementation): transformers'
  MixtralForCausalLM of `config()`'s shape, on all host cores, as train_throughput's peer
  trains its Llama."""
  import torch
  from transformers import MixtralConfig, MixtralForCausalLM

  cfg = config()
  m = cfg.model
  torch.manual_seed(0)
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  hf = MixtralConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.expert_d_ff,
                     num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                     num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
                     rope_theta=m.rope_theta, num_local_experts=m.n_experts,
                     num_experts_per_tok=m.experts_per_token, router_aux_loss_coef=AUX_WEIGHT,
                     output_router_logits=True, tie_word_embeddings=False)
  hf._attn_implementation = "sdpa"
  model = MixtralForCausalLM(hf)
  model.train()
  experts_impl = model.config._experts_implementation
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  toks = torch.from_numpy(tokens(cfg).astype(np.int64))
  inputs, labels = toks[:, :-1], toks[:, 1:]

  def one():
    out = model(input_ids=inputs, output_router_logits=True)
    loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, m.vocab_size),
                                             labels.reshape(-1)) + AUX_WEIGHT * out.aux_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  return (*runner(one), experts_impl)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--warm_steps", type=int, default=1)
  ap.add_argument("--impls", default="dropless,capacity,dense",
                  help="our dispatches to time, each optionally @REMAT (a remat policy of "
                       "its own); the first is the one against the peer")
  ap.add_argument("--no_peer", action="store_true")
  ap.add_argument("--remat", default="", help="our model.remat instead of the config's")
  ap.add_argument("--out", default="")
  args = ap.parse_args()

  cfg = config(remat=args.remat)
  mc, ex = model_config(cfg, cfg.model.vocab_size), execution(cfg)
  step_tokens = cfg.train.batch_size * cfg.train.seq_len
  flops_per_token = mc.flops_per_token(cfg.train.seq_len)
  peak = metrics_lib.measured_matmul_flops()
  host = host_info()
  print(f"host: {host['cpu_model']} ({host['isa_summary']}), "
        f"{len(os.sched_getaffinity(0))} usable cores; measured f32 matmul peak "
        f"{peak / 1e12:.3f} TFLOP/s", flush=True)
  sides = {}
  setup = {}
  for impl in args.impls.split(","):
    sides[impl], setup[impl] = ours(impl, args.remat)
    print(f"ours {impl}: compiled in {setup[impl]:.1f} s", flush=True)
  experts_impl = None
  if not args.no_peer:
    sides["peer"], setup["peer"], experts_impl = peer()
    print(f"peer: MixtralForCausalLM, experts_implementation={experts_impl}, first step "
          f"{setup['peer']:.1f} s", flush=True)
  times = {k: [] for k in sides}
  for r in range(args.rounds):
    for name, run in sides.items():
      times[name].append(_timed(run, args.steps, args.warm_steps) / args.steps)
    print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
          flush=True)
  tps = {k: step_tokens / statistics.median(v) for k, v in times.items()}
  first = args.impls.split(",")[0]
  results = {
      "shape": {"n_layers": mc.n_layers, "d_model": mc.d_model, "n_heads": mc.n_heads,
                "n_kv_heads": mc.n_kv_heads, "n_experts": mc.n_experts,
                "experts_per_token": mc.experts_per_token, "expert_d_ff": mc.expert_d_ff,
                "vocab_size": mc.vocab_size, "seq_len": cfg.train.seq_len,
                "batch_size": cfg.train.batch_size, "dtype": "float32",
                "params": mc.num_params(), "active_params": mc.num_params(active=True)},
      "remat": ex.remat, "capacity_factor": ex.capacity_factor,
      "grouped_matmul": ex.grouped_matmul, "router_aux_loss_weight": AUX_WEIGHT,
      "host": host, "cpus": len(os.sched_getaffinity(0)), "jax": jax.__version__,
      "measured_matmul_tflops": peak / 1e12, "flops_per_token": flops_per_token,
      "peer": {"model": "transformers MixtralForCausalLM", "attn_implementation": "sdpa",
               "experts_implementation": experts_impl},
      "processes": "one", "rounds": args.rounds, "timed_steps_per_round": args.steps,
      "warm_steps_per_round": args.warm_steps,
      "step_seconds": times, "setup_seconds": setup,
      "tokens_per_sec": tps,
      "mfu": {k: v * flops_per_token / peak for k, v in tps.items()}}
  if "peer" in tps:
    results["ratio_ours_over_peer"] = tps[first] / tps["peer"]
  for impl in args.impls.split(","):
    if impl != first:
      results[f"ratio_{impl}_over_{first}"] = tps[impl] / tps[first]
  print(json.dumps({k: results[k] for k in results if k.startswith("ratio")}
                   | {"tokens_per_sec": tps}, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  hugepages.reexec()  # as trainer.main does
  main()
