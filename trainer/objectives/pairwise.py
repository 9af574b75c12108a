"""Preference rows (trainer/data/pairs.py) hold pairs in shared-prompt rows: pair k of a row has
segment ids 3k+1 (the prompt), 3k+2 (the chosen answer) and 3k+3 (the rejected one).
`pair_sums` turns any per-position quantity into per-pair (chosen, rejected) sums."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_pairs(seq_len: int) -> int:
  """Pairs a row can hold: each takes at least 4 positions (two branches of 2)."""
  return seq_len // 4 + 1


def pair_sums(x_bt, segment_ids_bt, k: int):
  """(chosen, rejected), each (batch, k): the sums of x over each pair's chosen and rejected
  segments."""
  def row(x, seg):
    sums = jax.ops.segment_sum(x, seg, num_segments=3 * k + 1)[1:].reshape(k, 3)
    return sums[:, 1], sums[:, 2]
  return jax.vmap(row)(x_bt, segment_ids_bt)


def last_positions(segment_ids_bt):
  """1.0 at the last position of each segment (where a segment's value is read), else 0."""
  nxt = jnp.concatenate([segment_ids_bt[:, 1:], jnp.full_like(segment_ids_bt[:, :1], -1)], 1)
  return ((segment_ids_bt != nxt) & (segment_ids_bt > 0)).astype(jnp.float32)


def pair_metrics(losses, reward_c, reward_r, valid):
  """(loss sum, pair count, aux sums): rewards, accuracy and margin over the valid pairs."""
  v = valid.astype(jnp.float32)
  aux = {"rewards_chosen": jnp.sum(reward_c * v), "rewards_rejected": jnp.sum(reward_r * v),
         "accuracy": jnp.sum((reward_c > reward_r) * v),
         "margin": jnp.sum((reward_c - reward_r) * v)}
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(v), aux
