"""The CPU mixture-of-experts demo: configs/tiny.py with every MLP an 8-expert top-2 MoE.

python -m trainer.main --config=configs/moe_tiny.py --workdir=/tmp/moe
python -m trainer.main --config=configs/moe_tiny.py --workdir=/tmp/moe_nobal \
    --config.model.router_batch_balance=0 --config.model.router_aux_loss_weight=0 \
    --config.model.router_bias_update_rate=0  # no balancing: watch moe_share_max drift
python -m trainer.main --config=configs/moe_tiny.py:smoke  # seconds: for tests

Each expert is 344 wide, half the tiny model's MLP, so that a token's two experts do the MLP's
work; the 8 experts hold 4x its MLP weights (10.3M parameters in all, 8.5M of them experts). 150
steps (half tiny's: a MoE step costs more on CPU). Load balancing, three parts (models/moe.py):
batch-balanced training routing (`router_batch_balance=3`: per-expert offsets solved on each
training batch in 3 rounds give every expert 1/8 of the pairs; evaluation and generation route
without them); the Switch balancing loss (weight 0.1: at 0.01 the least loaded expert of the
unbalanced routing still had under a third of its share after 110 steps) with a small router
z-loss (ST-MoE's 1e-3); and DeepSeek-V3's auxiliary-loss-free routing bias on the router logits,
moved 0.01 per step (rates 0.003-0.05, on the logits and on the probabilities, were tried: 0.01
on the logits came into the band soonest). The loss and the bias read the loads of the routing
without the offsets, so the router and the bias learn to balance evaluation's routing.

metrics.jsonl carries moe_share_max and moe_share_min, the most and least loaded expert's share
of the routed pairs times 8 (1 is uniform; the extremes over the 4 layers, one batch's 4096
pairs per layer per step: in training those of the balanced routing, at evaluation those of
the plain one), the two losses and moe_bias_max / moe_bias_min. benchmarks/moe_balance.py
trains as configured, without the batch balancing, with the balancing loss only and with no
balancing, logging every step; BENCHMARKS.md "Load balancing" has the figures. In short: as
configured every step's load is within 1.06x of uniform; with no balancing one expert takes
every token of a layer from about step 20; with the loss and the bias but no batch balancing
the load is not within 2x of uniform before step ~100. Why that last, measured: the untrained
model already routes 2.65 / 0.16 (max / min share), because the MoE inputs share a common part
(their token mean holds 14-18% of their energy at step 1, 80-95% by step 10, as the model
learns the unigram distribution) that the router turns into the same per-expert logit offset
for every token, and that part moves between steps by more than a batch's tokens differ about
it: in a prototype not kept, not even the offsets that balanced the previous batch exactly
kept the next within 2x in steps ~8-30. Router init std (0.002, 1/sqrt(d), 0.125), balancing
weights 0.3 and 1.0, router jitter 0.1, lr 1e-3, 80 warmup steps and 64 x 32 batches did not
remove that excursion (80-step runs).
"""

from configs import tiny


def get_config(arg=None):
  c = tiny.get_config("smoke" if arg == "smoke" else None)
  if arg not in (None, "smoke"):
    raise ValueError(f"configs/moe_tiny.py takes no argument or 'smoke', got {arg!r}")
  c.model.update(n_experts=8, experts_per_token=2, expert_d_ff=c.model.d_ff // 2,
                 router_aux_loss_weight=0.1, router_z_loss_weight=1e-3,
                 router_bias_update_rate=0.01, router_batch_balance=3)
  if arg != "smoke":
    c.train.update(steps=150, eval_every=50, checkpoint_every=50)
  return c
