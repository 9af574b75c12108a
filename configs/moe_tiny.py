"""The CPU mixture-of-experts demo: configs/tiny.py with every MLP an 8-expert top-2 MoE.

python -m trainer.main --config=configs/moe_tiny.py --workdir=/tmp/moe
python -m trainer.main --config=configs/moe_tiny.py --workdir=/tmp/moe_nobal \
    --config.model.router_aux_loss_weight=0 --config.model.router_bias_update_rate=0
    # no balancing: watch moe_share_max drift
python -m trainer.main --config=configs/moe_tiny.py:smoke  # seconds: for tests

Each expert is 344 wide, half the tiny model's MLP, so that a token's two experts do the MLP's
work; the 8 experts hold 4x its MLP weights (10.3M parameters in all, 8.5M of them experts). 150
steps (half tiny's: a MoE step costs more on CPU). Load balancing: the Switch balancing loss
(weight 0.1: at 0.01 the least loaded expert still had under a third of its share after 110
steps), a small router z-loss (ST-MoE's 1e-3, keeps the router's logits from growing) and
DeepSeek-V3's auxiliary-loss-free routing bias on the router logits (models/moe.py), moved 0.01
per step (rates 0.003-0.05, on the logits and on the probabilities, were tried: 0.01 on the
logits came into the band soonest).

metrics.jsonl carries moe_share_max and moe_share_min, the most and least loaded expert's share
of the routed pairs times 8 (1 is uniform; the extremes over the 4 layers, one batch's 4096
pairs per layer per step), the two losses and moe_bias_max / moe_bias_min.
benchmarks/moe_balance.py trains as configured, with the balancing loss only and with no
balancing, logging every step; BENCHMARKS.md "Load balancing" has the figures. In short: without
balancing one expert takes every token of a layer from about step 20; with it the load comes
back near uniform, but not within 2x of uniform in the first ~100 steps. Why, measured: the
untrained model already routes 2.65 / 0.16 (max / min share), because the MoE inputs share a
common part (their token mean holds 14-18% of their energy at step 1, 80-95% by step 10, as the
model learns the unigram distribution) that the router turns into the same per-expert logit
offset for every token (the same inputs with the mean removed route within 0.80-1.15). In steps
8-16 those offsets shift by 0.03-0.04 per step while a token's logits spread only 0.09-0.13
about them: a bias rate fast enough to follow moves most tokens at once, a slower one lags
(with the routers frozen the steps 1-54 were out of band still). Router init std (0.002,
1/sqrt(d), 0.125), balancing weights 0.3 and 1.0 and router jitter 0.1 did not remove the early
excursion either (80-step runs); a bias starting at zero cannot change step 1.
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
