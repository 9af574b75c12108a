"""lm: every weighted token's NLL (pretraining; for chat data the template's mask makes it the
assistant tokens only)."""

from __future__ import annotations

import jax.numpy as jnp

from trainer import losses
from trainer.objectives.base import Objective


class LM(Objective):
  name = "lm"

  def loss(self, models, batch):
    model, hidden = models["policy"].forward(batch)
    nll = losses.token_nll(model.logits(hidden), batch["targets"])
    return self.reduce(nll, batch)

  def reduce(self, nll, batch):
    """(sum, count, aux sums) of token losses: each weighted token counts once."""
    w = batch["weights"]
    return jnp.sum(nll * w), jnp.sum(w), {}
