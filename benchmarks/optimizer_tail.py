"""What the train step spends after the backward pass, on a Mixtral-shaped parameter set (the
99.1M parameters of benchmarks/moe_throughput.py's model): the gradients' division by the token
count, the non-finite guard, clipping, AdamW and the update, against torch's AdamW.

Variants, each jitted with the parameters and moments donated, as trainer/step.py runs them:
  step       as trainer/step.py did it before 6f671d7: grads / count, all_finite(grads), the
             optimizer of trainer/optim.py (clip + AdamW), the update, all_finite(new
             parameters), and keep_if (old parameters and moments where the step was not finite)
  no_check   the same without all_finite(new parameters): the guard's ok is known before the
             update
  trainer    as trainer/step.py does it since: grads / count, ok from the gradients' norm and
             the learning rate being finite, clip + AdamW, keep_if
  fused      the division and the clip folded into one scalar on the raw gradients, ok from the
             raw gradients' norm being finite (a non-finite entry makes it so), AdamW without its
             own clip, keep_if with that ok
  adamw      AdamW and the update alone (no division, clip or guard): the floor
  torch      grads / count, clip_grad_norm_, torch.optim.AdamW(foreach=True)
Rounds alternate the variants; the figure is the median round's seconds per update.

python benchmarks/optimizer_tail.py [--rounds 5 --iters 3 --out benchmarks/results/optimizer_tail.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host import describe, host_info  # noqa: E402
from configs import base  # noqa: E402
from trainer import guard, optim  # noqa: E402

# benchmarks/moe_throughput.py's model: 4 layers, d 512, 8 experts of width 1792, vocab 8192
SHAPES = {"embed": (8192, 512), "head": (512, 8192), "w_gate": (4, 8, 512, 1792),
          "w_up": (4, 8, 512, 1792), "w_down": (4, 8, 1792, 512), "qkv": (4, 512, 768),
          "out": (4, 512, 512), "router": (4, 512, 8), "norms": (4, 2, 512)}
COUNT = 1024.0  # tokens in the batch (4 x 256)


def variants(tc):
  tx, schedule = optim.make_optimizer(tc)  # clip + AdamW, as the trainer builds it
  bare, _ = optim.make_optimizer(_no_clip(tc))  # the same AdamW without its clip

  def per_token(g, count):  # the step's gradients / count, as trainer/step.mean_gradients
    return jax.tree.map(lambda x: x / jnp.maximum(count, 1.0), g)

  def step(p, s, g, count):
    g = per_token(g, count)
    ok = guard.all_finite(g)
    u, s2 = tx.update(g, s, p)
    new = optax.apply_updates(p, u)
    ok = ok & guard.all_finite(new)
    return guard.keep_if(ok, (new, s2), (p, s))

  def no_check(p, s, g, count):
    g = per_token(g, count)
    ok = guard.all_finite(g)
    u, s2 = tx.update(g, s, p)
    return guard.keep_if(ok, (optax.apply_updates(p, u), s2), (p, s))

  def trainer(p, s, g, count):
    g = per_token(g, count)
    ok = guard.all_finite(optax.tree.norm(g)) & jnp.isfinite(schedule(s[-1][0].count))
    u, s2 = tx.update(g, s, p)
    return guard.keep_if(ok, (optax.apply_updates(p, u), s2), (p, s))

  def fused(p, s, g, count):
    denom = jnp.maximum(count, 1.0)
    raw = optax.tree.norm(g)
    norm = raw / denom
    scale = jnp.where(norm > tc.clip_norm, tc.clip_norm / norm, 1.0) / denom
    u, s2 = bare.update(jax.tree.map(lambda x: x * scale, g), s, p)
    return guard.keep_if(jnp.isfinite(raw), (optax.apply_updates(p, u), s2), (p, s))

  def adamw(p, s, g, count):
    u, s2 = bare.update(g, s, p)
    return optax.apply_updates(p, u), s2

  return {"step": (step, tx), "no_check": (no_check, tx), "trainer": (trainer, tx),
          "fused": (fused, bare), "adamw": (adamw, bare)}


def _no_clip(tc):
  tc = tc.copy_and_resolve_references()
  tc.clip_norm = 0.0
  return tc


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  host = host_info()
  print(describe(host), flush=True)
  tc = base.get_config().train
  rng = np.random.default_rng(0)
  p_np = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in SHAPES.items()}
  g_np = {k: rng.standard_normal(s, dtype=np.float32) for k, s in SHAPES.items()}
  n_params = sum(v.size for v in p_np.values())
  print(f"{n_params / 1e6:.1f}M parameters, clip {tc.clip_norm}, weight decay {tc.weight_decay}",
        flush=True)
  grads = jax.tree.map(jnp.asarray, g_np)
  count = jnp.float32(COUNT)
  runs, state = {}, {}
  for name, (fn, tx) in variants(tc).items():
    runs[name] = jax.jit(fn, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.asarray, p_np)
    state[name] = (params, tx.init(params))

  tparams = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in p_np.values()]
  for t, v in zip(tparams, g_np.values()):
    t.grad = torch.from_numpy(v.copy())
  topt = torch.optim.AdamW(tparams, lr=1e-4, betas=(tc.b1, tc.b2), eps=tc.eps,
                           weight_decay=tc.weight_decay, foreach=True)
  tgrads = [t.grad.clone() for t in tparams]

  def one(name):
    if name == "torch":
      for t, g in zip(tparams, tgrads):
        t.grad.copy_(g).div_(COUNT)
      torch.nn.utils.clip_grad_norm_(tparams, tc.clip_norm)
      topt.step()
      return
    state[name] = runs[name](*state[name], grads, count)
    jax.block_until_ready(state[name])

  names = [*runs, "torch"]
  for name in names:
    one(name)  # compile / first step
  seconds = {name: [] for name in names}
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      for _ in range(args.iters):
        one(name)
      seconds[name].append((time.perf_counter() - t0) / args.iters)
  medians = {name: statistics.median(ts) for name, ts in seconds.items()}
  for name in names:
    print(f"{name:9} {medians[name]:.3f} s per update ({medians[name] / medians['torch']:.2f}x "
          f"torch's)", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"host": host, "parameters": n_params, "rounds": args.rounds,
                 "iters": args.iters, "seconds": seconds, "median_s": medians}, f, indent=2)


if __name__ == "__main__":
  main()
