"""The CPU mixture-of-experts demo: configs/tiny.py with every MLP an 8-expert top-2 MoE.

python -m trainer.main --config=configs/moe_tiny.py --workdir=/tmp/moe
python -m trainer.main --config=configs/moe_tiny.py --workdir=/tmp/moe_nobal \
    --config.model.router_aux_loss_weight=0 --config.model.router_bias_update_rate=0
    # no balancing: watch moe_share_max drift
python -m trainer.main --config=configs/moe_tiny.py:smoke  # seconds: for tests

Each expert is 344 wide, half the tiny model's MLP, so that a token's two experts do the MLP's
work; the 8 experts hold 4x its MLP weights (10.3M parameters in all, 8.5M of them experts). 150
steps (half tiny's: a MoE step costs more on CPU). The Switch balancing loss (weight 0.1: at 0.01
the least loaded expert still had under a third of its share after 110 steps), a small router
z-loss (ST-MoE's 1e-3, keeps the router's logits from growing) and DeepSeek-V3's
auxiliary-loss-free routing bias (models/moe.py) on the router logits, moved 0.01 per step.

The routing bias, measured in 150-step runs pinned to one core (log_every=1; shares as below):
  rate 0.01 on the logits, with the loss (as configured): loss 7.866 -> 3.851 (eval 4.596);
    within [0.5, 2] from step 92 on (steps 92-150: max <= 1.57, min >= 0.50), 73 of 150 steps
    outside (1-68, 70, 78, 86, 88, 91); worst 3.84 / 0.00 (steps 11-30); 1.41 / 0.69 at step 150.
    b stayed within -0.17 .. 0.31.
  the same without it (the balancing loss only): 74 steps outside, last at 135, 1.45 / 0.62 at
    step 150, loss -> 3.899.
  other rates on the logits: 0.02 in band from step 110 (71 steps outside), 0.03 from step 122
    (74); 0.003 was at 3.68 / 0.00 at step 20 (stopped at 47). Added to the probabilities
    instead of the logits: 0.01 in band from step 149; 0.05 out of band in all of steps 1-77
    (stopped there). Without the balancing loss, rate 0.01: 3.99 / 0.00 by step 15. So no rate
    keeps the load within 2x of uniform while the representation collapses (steps ~5-60,
    below); 0.01 helps after that (in band from step 92 rather than 136).
  Why, measured on one batch per layer: in steps 8-16 the logits' common per-expert offsets
    (+-0.1-0.2) shift by 0.03-0.04 per step while a token's logits spread only 0.09-0.13 about
    them; a rate that keeps up moves most tokens at once, a smaller one lags. It is the inputs
    that drift, not the router's training: with the routers frozen (not trained) and rate 0.01
    the steps 1-54 were all out of band still. Step 1 cannot be in band with any bias that starts
    at zero (the routing of step 1 comes before the first update).

metrics.jsonl carries moe_share_max and moe_share_min, the most and least loaded expert's share
of the routed pairs times 8 (1 is uniform; the extremes over the 4 layers, one batch's 4096
pairs per layer per step), the two losses and moe_bias_max / moe_bias_min (b's extremes);
benchmarks/moe_balance.py trains as configured, with the balancing loss only and with no
balancing, logging every step (benchmarks/results/moe_balance.json; the
figures below, of the run before the routing bias, are of the balancing-loss-only run):
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
                 router_aux_loss_weight=0.1, router_z_loss_weight=1e-3,
                 router_bias_update_rate=0.01)
  if arg != "smoke":
    c.train.update(steps=150, eval_every=50, checkpoint_every=50)
  return c
