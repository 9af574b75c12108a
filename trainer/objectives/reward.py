"""reward: a scalar score per answer (the decoder's value head at its answer's last token),
trained with the Bradley-Terry pairwise loss."""

from __future__ import annotations

import jax

from trainer.data import pairs as pair_rows
from trainer.objectives import pairwise
from trainer.objectives.base import Objective


def bradley_terry(score_c, score_r):
  """Reward-model loss per pair: -log sigmoid(score_chosen - score_rejected)."""
  return -jax.nn.log_sigmoid(score_c - score_r)


class Reward(Objective):
  name = "reward"
  pairs = True

  def annotate(self, batch):
    return {**batch, "last": pairwise.last_positions(batch["segment_ids"])}

  def loss(self, models, batch):
    seg, last = batch["segment_ids"], batch["last"]
    n_pairs = pairwise.max_pairs(batch["inputs"].shape[1])
    model, hidden = models["policy"].forward(batch, shared_prompt=pair_rows.ANSWERS)
    scores = pairwise.pair_sums(model.values(hidden) * last, seg, n_pairs)
    present = pairwise.pair_sums(last, seg, n_pairs)
    valid = (present[0] > 0) & (present[1] > 0)
    return pairwise.pair_metrics(bradley_terry(*scores), *scores, valid)
