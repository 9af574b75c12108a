"""Loss functions. Each returns a sum and a count so that microbatches and devices combine
exactly: the mean over a batch is sum(sums) / sum(counts), whatever the split."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """Negative log-likelihood of each target token, float32 (batch, length).

  The target logit is picked by a masked sum over the vocabulary rather than a gather: with the
  vocabulary split over devices (tensor parallelism) both this and the log-sum-exp reduce
  locally and then across devices, and the full logits are never gathered on one device.
  """
  logits = logits_btv.astype(jnp.float32)
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  target_logit = jnp.sum(jnp.where(vocab_ids == targets_bt[..., None], logits, 0.0), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - target_logit


def lm_loss(logits_btv, targets_bt, weights_bt) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token NLL, sum of weights)."""
  nll = token_nll(logits_btv, targets_bt)
  return jnp.sum(nll * weights_bt), jnp.sum(weights_bt)
