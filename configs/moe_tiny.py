"""The CPU mixture-of-experts demo: configs/tiny.py with every MLP an 8-expert top-2 MoE.

python -m trainer.main --config=configs/moe_tiny.py --workdir=/tmp/moe
python -m trainer.main --config=configs/moe_tiny.py --workdir=/tmp/moe_nobal \
    --config.model.router_aux_loss_weight=0   # no balancing: watch moe_share_max drift
python -m trainer.main --config=configs/moe_tiny.py:smoke  # seconds: for tests

Each expert is 344 wide, half the tiny model's MLP, so that a token's two experts do the MLP's
work; the 8 experts hold 4x its MLP weights (10.3M parameters in all, 8.5M of them experts). 150
steps (half tiny's: a MoE step costs more on CPU). The Switch balancing loss brings every
expert's share of the routed pairs back near 1 / 8 (weight 0.1: at 0.01 the least loaded expert
still had under a third of its share after 110 steps; at 0.1 all are within 2x of uniform from
step 70 on, after the first steps' imbalance: benchmarks/results/moe_balance.json), and a small router z-loss (ST-MoE's 1e-3) keeps
the router's logits from growing. metrics.jsonl
carries moe_share_max and moe_share_min, the most and least loaded expert's share times 8
(1 is uniform), and the two losses; benchmarks/moe_balance.py trains with and without the
balancing loss and compares them.
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
