"""Training objectives (`train.objective`) as pure functions of logits, values and batches.

  lm      every weighted token's NLL (pretraining; for chat data the template's mask makes it
          assistant tokens only).
  sft     the same on chat data, normalised per token (every assistant token counts once) or
          per sequence (each example's mean token loss counts once: `sft.normalize`).
  dpo     preference pairs (`dpo.loss`): sigmoid DPO with label smoothing (cDPO), IPO, and the
          reference-free SimPO and ORPO.
  reward  a scalar score per answer (the decoder's value head at its last token), Bradley-Terry
          pairwise loss.

Preference batches hold pairs in shared-prompt rows (trainer/data/pairs.py): pair k of a row has
segment ids 3k+1 (the prompt), 3k+2 (the chosen answer) and 3k+3 (the rejected one).
`pair_sums` turns any per-position quantity into per-pair (chosen, rejected) sums.

Every loss returns (sum, count, aux sums) so that microbatches and devices combine exactly: the
reported value is sum / count, and so is every aux metric.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

OBJECTIVES = ("lm", "sft", "dpo", "reward")
DPO_LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")  # no reference model
SFT_NORMALIZE = ("token", "sequence")


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


def sequence_sums(x_bt, w_bt, segment_ids_bt):
  """sft per sequence: (sum over segments of their weighted mean of x, number of segments with
  weight)."""
  n = segment_ids_bt.shape[1] + 1
  def row(x, w, seg):
    return (jax.ops.segment_sum(x * w, seg, num_segments=n)[1:],
            jax.ops.segment_sum(w, seg, num_segments=n)[1:])
  sums, counts = jax.vmap(row)(x_bt, w_bt, segment_ids_bt)
  has = counts > 0
  return jnp.sum(jnp.where(has, sums / jnp.where(has, counts, 1.0), 0.0)), jnp.sum(has)


def log1mexp(x):
  """log(1 - exp(x)) for x < 0, stable at both ends."""
  return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def preference_losses(kind: str, pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float,
                      label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
  """Per-pair (losses, chosen rewards, rejected rewards) from summed answer log-probs of the
  policy (pi) and reference (ref; ignored by the reference-free losses) and the answers' token
  counts n. As TRL: DPO sigmoid with label smoothing eps is
  -(1-eps) log s(beta z) - eps log s(-beta z), z the difference of log-ratios; IPO
  (z' - 1/(2 beta))^2 with z' from per-token averages; SimPO the smoothed sigmoid of
  beta (avg_c - avg_r) - gamma; ORPO -beta log s(log-odds(avg_c) - log-odds(avg_r)) (its NLL term
  is added by the caller). Rewards: beta (pi - ref), or beta avg for the reference-free ones."""
  smoothed = lambda z: (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * z)
                        - label_smoothing * jax.nn.log_sigmoid(-beta * z))
  if kind == "sigmoid":
    ratio_c, ratio_r = pi_c - ref_c, pi_r - ref_r
    return smoothed(ratio_c - ratio_r), beta * ratio_c, beta * ratio_r
  if kind == "ipo":
    ratio_c, ratio_r = pi_c - ref_c, pi_r - ref_r
    z = ratio_c / jnp.maximum(n_c, 1.0) - ratio_r / jnp.maximum(n_r, 1.0)
    return (z - 1.0 / (2.0 * beta)) ** 2, beta * ratio_c, beta * ratio_r
  avg_c, avg_r = pi_c / jnp.maximum(n_c, 1.0), pi_r / jnp.maximum(n_r, 1.0)
  if kind == "simpo":
    return smoothed(avg_c - avg_r - simpo_gamma / beta), beta * avg_c, beta * avg_r
  if kind == "orpo":
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    return -beta * jax.nn.log_sigmoid(log_odds), beta * avg_c, beta * avg_r
  raise ValueError(f"dpo.loss={kind!r} is not one of {', '.join(DPO_LOSSES)}")


def pair_metrics(losses, reward_c, reward_r, valid):
  """(loss sum, pair count, aux sums): rewards, accuracy and margin over the valid pairs."""
  v = valid.astype(jnp.float32)
  aux = {"rewards_chosen": jnp.sum(reward_c * v), "rewards_rejected": jnp.sum(reward_r * v),
         "accuracy": jnp.sum((reward_c > reward_r) * v),
         "margin": jnp.sum((reward_c - reward_r) * v)}
  return jnp.sum(jnp.where(valid, losses, 0.0)), jnp.sum(v), aux


def bradley_terry(score_c, score_r):
  """Reward-model loss per pair: -log sigmoid(score_chosen - score_rejected)."""
  return -jax.nn.log_sigmoid(score_c - score_r)


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the loss function computes (from the run config: `Spec.from_config`)."""
  objective: str = "lm"
  sft_normalize: str = "token"
  dpo_loss: str = "sigmoid"
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  precompute_ref: bool = False

  @classmethod
  def from_config(cls, cfg) -> "Spec":
    d = cfg.dpo
    return cls(cfg.train.objective, cfg.sft.normalize, d.loss, d.beta, d.label_smoothing,
               d.simpo_gamma, d.precompute_ref)

  @property
  def needs_reference(self) -> bool:
    """A reference model's log-probs in every step (dpo without precomputation)."""
    return (self.objective == "dpo" and self.dpo_loss not in REFERENCE_FREE
            and not self.precompute_ref)
