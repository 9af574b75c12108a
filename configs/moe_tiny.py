"""The CPU mixture-of-experts demo: configs/tiny.py with every MLP an 8-expert top-2 MoE.

python -m trainer.main --config=configs/moe_tiny.py --workdir=/tmp/moe
python -m trainer.main --config=configs/moe_tiny.py --workdir=/tmp/moe_nobal \
    --config.model.router_aux_loss_weight=0   # no balancing: watch moe_share_max drift
python -m trainer.main --config=configs/moe_tiny.py:smoke  # seconds: for tests

Each expert is 344 wide, half the tiny model's MLP, so that a token's two experts do the MLP's
work; the 8 experts hold 4x its MLP weights (10.3M parameters in all, 8.5M of them experts). 150
steps (half tiny's: a MoE step costs more on CPU). The Switch balancing loss (weight 0.1: at 0.01
the least loaded expert still had under a third of its share after 110 steps) and a small router
z-loss (ST-MoE's 1e-3, keeps the router's logits from growing). metrics.jsonl carries
moe_share_max and moe_share_min, the most and least loaded expert's share of the routed pairs
times 8 (1 is uniform; the extremes over the 4 layers, one batch's 4096 pairs per layer per step)
and the two losses; benchmarks/moe_balance.py trains with and without the balancing loss, logging
every step (benchmarks/results/moe_balance.json):
  with it: max 1.45, min 0.62 at step 150; no expert above 1.73 from step 70 on, but the least
    loaded dips to 0.30-0.49 on 7 of the steps 70-150 (last at 135); steps 1-55: up to 3.61 / 0.00.
  without: from step 20 to 150 the min is 0.00 and the max 3.87-4.00 (4: one expert gets every
    token), 4.00 / 0.00 at step 150.
Why the first ~60 steps are out of band, measured (not a metric artefact: sampling noise on 4096
pairs is about 0.04): already at step 1 the untrained model routes 2.65 / 0.16, because the MoE
inputs of layers 2-4 share a common part (their mean over tokens holds 14-18% of their energy)
that the random router turns into a per-expert offset favouring the same experts for every token
(the same inputs with the mean removed route within 0.80-1.15). Then, as the model learns the
unigram distribution, that common part grows to 80-95% of the energy by step 10 and the routing
follows it to about two experts per layer, until the representation spreads out again. No
router-side setting removed this in 80-step runs (worst max over steps 1-80, 3.61 as configured):
router init std 0.002 / 0.0625 (1/sqrt(d)) / 0.125: 3.95 / 3.80 / 3.97;
balancing weight 0.3 / 1.0: 3.73 / 3.96; router jitter 0.1: 3.67. The init scale cannot help at
step 1 (top-k does not depend on the router's scale, so neither does which experts the common
offset favours), and the router's init stays normal(0, init_std), like the other weights.
"""

from configs import tiny


def get_config(arg=None):
  c = tiny.get_config("smoke" if arg == "smoke" else None)
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/moe_tiny.py takes no argument or 'smoke', got {arg!r}")
  c.model.update(n_experts=8, experts_per_token=2, expert_d_ff=c.model.d_ff // 2,
                 router_aux_loss_weight=0.1, router_z_loss_weight=1e-3)
  if arg != "smoke":
    c.train.update(steps=150, eval_every=50, checkpoint_every=50)
  return c
