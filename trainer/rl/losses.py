"""The math of online RL and distillation on per-token arrays: advantages, the GRPO family's
and PPO's losses, KL estimators and controllers, and the distillation divergences.

Shapes: `_bt` arrays are (completions, completion tokens), `mask_bt` 1.0 on a completion's
real tokens and 0.0 on its padding; `_b` arrays one value per completion. Log-probs are the
sampled tokens' under the current policy (`logps`), the policy that sampled them (`old_logps`)
and the frozen reference (`ref_logps`). Every loss returns (scalar loss, metrics) with float32
metrics. tests/test_rl_losses.py checks them against TRL's own code (GRPO's loss types and
GKD's generalized JSD) and against plain loops (GAE, PPO's clipped losses).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")


def group_advantages(rewards_b, group: int, scale: str = "group", eps: float = 1e-4):
  """GRPO's advantages: each completion's reward less the mean of its group (the `group`
  completions of one prompt, consecutive), divided by the group's standard deviation
  (`group`, as GRPO; unbiased, + eps), the batch's (`batch`) or not at all (`none`: Dr. GRPO)."""
  r = rewards_b.reshape(-1, group)
  adv = r - r.mean(axis=1, keepdims=True)
  if scale == "group":
    adv = adv / (r.std(axis=1, ddof=1, keepdims=True) + eps)
  elif scale == "batch":
    adv = adv / (rewards_b.std(ddof=1) + eps)
  elif scale != "none":
    raise ValueError(f"scale={scale!r} is not one of {', '.join(SCALES)}")
  return adv.reshape(-1)


def nonzero_variance_groups(rewards_b, group: int):
  """DAPO's dynamic sampling: for each group, whether its rewards differ (a group whose
  completions all scored the same gives every one advantage 0 and no gradient)."""
  r = rewards_b.reshape(-1, group)
  return jnp.any(r != r[:, :1], axis=1)


def k3_kl(logps_bt, ref_logps_bt):
  """Schulman's k3 estimator of KL(policy || reference) per token: exp(d) - d - 1 with
  d = ref - policy (non-negative, unbiased for samples from the policy)."""
  d = ref_logps_bt - logps_bt
  return jnp.exp(d) - d - 1


def masked_mean(x, mask, axis=None):
  return (x * mask).sum(axis) / jnp.maximum(mask.sum(axis), 1.0)


@dataclasses.dataclass(frozen=True)
class GrpoLoss:
  """The GRPO family's policy loss. `loss_type`: how token losses become the loss: `grpo` (mean
  over each completion's tokens, then over completions), `bnpo` (mean over all tokens),
  `dr_grpo` (sum over all tokens / (completions x max_len): Dr. GRPO), `dapo` (sum over all
  tokens / the batch's token count: DAPO's token-level loss). `level`: the importance ratio per
  token, or per sequence (the mean log-ratio of the completion, exponentiated: GSPO). The ratio
  is clipped to [1 - eps_low, 1 + eps_high] (DAPO's clip-higher: eps_high > eps_low); `beta`
  weighs the k3 KL to the reference, added per token."""
  loss_type: str = "grpo"
  level: str = "token"
  eps_low: float = 0.2
  eps_high: float = 0.2
  beta: float = 0.0
  max_len: int = 0  # dr_grpo: the completions' maximum length (0: the arrays' width)

  def __post_init__(self):
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"loss_type={self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if self.level not in LEVELS:
      raise ValueError(f"level={self.level!r} is not one of {', '.join(LEVELS)}")

  def __call__(self, logps_bt, old_logps_bt, advantages_b, mask_bt, ref_logps_bt=None,
               n_tokens=None):
    """(loss, metrics) of one batch, as TRL computes it. `n_tokens`: dapo's normaliser
    (default: the mask's sum)."""
    loss_sum, count, sums = self.sums(logps_bt, old_logps_bt, advantages_b, mask_bt, ref_logps_bt)
    if self.loss_type == "dapo" and n_tokens is not None:
      count = n_tokens
    return loss_sum / jnp.maximum(count, 1.0), {k: v / jnp.maximum(c, 1.0)
                                                for k, (v, c) in sums.items()}

  def sums(self, logps_bt, old_logps_bt, advantages_b, mask_bt, ref_logps_bt=None):
    """(loss sum, count, {metric: (sum, count)}): the loss is sum / count, so that microbatches
    add up to the whole batch's loss: `grpo` sums each completion's token mean over the
    completions, `dr_grpo` its token sum / max_len, both counting completions; `bnpo` and
    `dapo` sum over tokens and count tokens."""
    mask = mask_bt.astype(jnp.float32)
    adv = advantages_b[:, None]
    log_ratio = logps_bt - old_logps_bt
    if self.level == "sequence":
      log_ratio = masked_mean(log_ratio, mask, axis=-1)[:, None]
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1 - self.eps_low, 1 + self.eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {}
    if self.beta:
      kl = k3_kl(logps_bt, ref_logps_bt)
      per_token = per_token + self.beta * kl
      metrics["kl"] = ((kl * mask).sum(), mask.sum())
    per_token = jnp.broadcast_to(per_token, mask.shape) * mask
    completions = (mask.sum(-1) > 0).sum().astype(jnp.float32)
    if self.loss_type == "grpo":
      loss_sum, count = (per_token.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).sum(), completions
    elif self.loss_type == "dr_grpo":
      loss_sum, count = per_token.sum() / (self.max_len or mask.shape[1]), completions
    else:  # bnpo, dapo
      loss_sum, count = per_token.sum(), mask.sum()
    low = (ratio < 1 - self.eps_low) & (adv < 0)
    high = (ratio > 1 + self.eps_high) & (adv > 0)
    region = jnp.broadcast_to(low | high, mask.shape).astype(jnp.float32)
    if self.level == "token":
      metrics["clip_fraction"] = ((region * mask).sum(), mask.sum())
    else:
      metrics["clip_fraction"] = (region[:, 0].sum(), mask.shape[0] * jnp.ones(()))
    return loss_sum, count, metrics


def overlong_penalty(lengths_b, max_len: int, buffer: int, factor: float = 1.0):
  """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then falling linearly
  to -factor at max_len (and below it past max_len)."""
  over = lengths_b - (max_len - buffer)
  return -factor * jnp.clip(over / buffer, 0.0, None)


# ----------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------


def ppo_rewards(logps_bt, ref_logps_bt, mask_bt, scores_b, kl_coef: float):
  """PPO's per-token rewards: -kl_coef x (log-prob - reference log-prob) on each real token (the
  k1 estimate of the KL), the sequence's score added at its last real token: (rewards, kl)."""
  logps_bt, ref_logps_bt, mask_bt = map(jnp.asarray, (logps_bt, ref_logps_bt, mask_bt))
  kl = (logps_bt - ref_logps_bt) * mask_bt
  rewards = -kl_coef * kl
  ends = jnp.maximum(mask_bt.sum(1).astype(jnp.int32) - 1, 0)
  rewards = rewards.at[jnp.arange(rewards.shape[0]), ends].add(scores_b)
  return rewards, kl


def gae(rewards_bt, values_bt, mask_bt, gamma: float, lam: float):
  """Generalised advantage estimation over each completion's tokens: (advantages, returns),
  A_t = delta_t + gamma * lam * A_{t+1}, delta_t = r_t + gamma * V_{t+1} - V_t, with V and A
  zero past a completion's last real token; returns = A + V."""
  mask = mask_bt.astype(values_bt.dtype)
  values = values_bt * mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
  deltas = (rewards_bt + gamma * next_values * next_mask - values) * mask

  def back(carry, xs):
    delta, m = xs
    a = delta + gamma * lam * carry * m
    return a, a

  _, adv = jax.lax.scan(back, jnp.zeros(values.shape[0], values.dtype),
                        (deltas.T[::-1], next_mask.T[::-1]))
  adv = adv[::-1].T * mask
  return adv, (adv + values) * mask


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  """x standardised over its real entries: (x - mean) / sqrt(var + eps), the variance with
  Bessel's correction (as TRL's PPO whitens advantages); `shift_mean` False adds the mean back."""
  mean = masked_mean(x, mask)
  n = mask.sum()
  var = masked_mean((x - mean) ** 2, mask) * n / jnp.maximum(n - 1, 1.0)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  return out if shift_mean else out + mean


def ppo_policy_loss(logps_bt, old_logps_bt, advantages_bt, mask_bt, clip: float = 0.2):
  """PPO's clipped surrogate, the mean over real tokens: (loss, metrics)."""
  ratio = jnp.exp(logps_bt - old_logps_bt)
  loss = -jnp.minimum(ratio * advantages_bt,
                      jnp.clip(ratio, 1 - clip, 1 + clip) * advantages_bt)
  clipped = (jnp.abs(ratio - 1) > clip).astype(jnp.float32)
  approx_kl = 0.5 * (logps_bt - old_logps_bt) ** 2
  return masked_mean(loss, mask_bt), {"clip_fraction": masked_mean(clipped, mask_bt),
                                      "approx_kl": masked_mean(approx_kl, mask_bt)}


def ppo_value_loss(values_bt, old_values_bt, returns_bt, mask_bt, clip: float = 0.2):
  """The critic's clipped value loss: 0.5 x the larger of the squared errors of the new value
  and of the value clipped to old +- clip, the mean over real tokens: (loss, metrics)."""
  clipped = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip, clip)
  err = jnp.maximum((values_bt - returns_bt) ** 2, (clipped - returns_bt) ** 2)
  frac = ((values_bt - returns_bt) ** 2 < (clipped - returns_bt) ** 2).astype(jnp.float32)
  return 0.5 * masked_mean(err, mask_bt), {"value_clip_fraction": masked_mean(frac, mask_bt)}


def entropy(logits_btv):
  """Per-token entropy of the softmax of float32 logits."""
  logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  return -(jnp.exp(logp) * logp).sum(-1)


@dataclasses.dataclass(frozen=True)
class KlController:
  """PPO's KL coefficient: fixed, or adaptive (Ziegler et al. 2019): after each step with
  observed KL `kl` over `n` samples, coef x= 1 + clip(kl / target - 1, -0.2, 0.2) x n / horizon."""
  coef: float
  target: float = 0.0  # 0: fixed
  horizon: int = 10000

  def update(self, coef, kl, n):
    if not self.target:
      return coef
    error = jnp.clip(kl / self.target - 1, -0.2, 0.2)
    return coef * (1 + error * n / self.horizon)


# ----------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------


def generalized_jsd_per_token(student_btv, teacher_btv, beta: float = 0.5,
                              temperature: float = 1.0):
  """The generalized Jensen-Shannon divergence of GKD (arXiv 2306.13649) per token:
  beta KL(teacher || M) + (1 - beta) KL(student || M), M = beta teacher + (1 - beta) student,
  on softmax(logits / temperature). beta = 0 is the forward KL(teacher || student), beta = 1
  the reverse KL(student || teacher)."""
  s = jax.nn.log_softmax(student_btv.astype(jnp.float32) / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_btv.astype(jnp.float32) / temperature, axis=-1)
  kl = lambda p, q: (jnp.exp(p) * (p - q)).sum(-1)  # KL(p || q) of log-probs
  if beta == 0:
    return kl(t, s)
  if beta == 1:
    return kl(s, t)
  m = jnp.logaddexp(s + jnp.log1p(-beta), t + jnp.log(beta))
  return beta * kl(t, m) + (1 - beta) * kl(s, m)


def generalized_jsd(student_btv, teacher_btv, mask_bt, beta: float = 0.5,
                    temperature: float = 1.0):
  """`generalized_jsd_per_token` averaged over the real tokens."""
  return masked_mean(generalized_jsd_per_token(student_btv, teacher_btv, beta, temperature),
                     mask_bt.astype(jnp.float32))
