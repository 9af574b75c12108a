"""trainer/rl/losses.py against TRL's own code (GRPOTrainer._compute_loss for the GRPO family's
loss types, GKD's generalized_jsd_loss), values and gradients, and against plain loops (group
advantages, GAE, PPO's clipped losses: TRL 1.x no longer ships a PPOTrainer)."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from trainer.rl import losses

B, T, V = 6, 7, 11


def data(seed=0):
  rng = np.random.default_rng(seed)
  logps = rng.normal(-1.5, 0.4, (B, T)).astype(np.float32)
  old = (logps + rng.normal(0, 0.25, (B, T))).astype(np.float32)  # some ratios past the clip
  ref = (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32)
  adv = rng.normal(0, 1, B).astype(np.float32)
  lengths = np.array([7, 3, 5, 1, 6, 4])
  mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
  return logps, old, ref, adv, mask


def trl_grpo_loss(loss_type, level, eps_low, eps_high, beta, logps, old, ref, adv, mask):
  """(loss, d loss / d logps) from GRPOTrainer._compute_loss, its model forward replaced by the
  given per-token log-probs and the trainer's state stubbed to one process, no accumulation."""
  from trl.trainer.grpo_trainer import GRPOTrainer
  t = GRPOTrainer.__new__(GRPOTrainer)
  lp = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
  t._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp), None)
  t.top_entropy_quantile, t.off_policy_mask_threshold = 1.0, None
  t.importance_sampling_level, t.loss_type, t.beta = level, loss_type, beta
  t.epsilon_low, t.epsilon_high = eps_low, eps_high
  t.args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
  t.use_vllm, t.aux_loss_enabled, t._entropy_bonus_enabled = False, False, False
  t.model = types.SimpleNamespace(training=True)
  t.current_gradient_accumulation_steps, t.max_completion_length = 1, T
  t.accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x,
                                        gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction: x)
  t._metrics = collections.defaultdict(lambda: collections.defaultdict(list))
  completion = torch.zeros((B, T), dtype=torch.long)
  inputs = {"prompt_ids": torch.zeros((B, 2), dtype=torch.long),
            "prompt_mask": torch.ones((B, 2), dtype=torch.long), "completion_ids": completion,
            "completion_mask": torch.tensor(mask, dtype=torch.float64),
            "advantages": torch.tensor(adv, dtype=torch.float64),
            "old_per_token_logps": torch.tensor(old, dtype=torch.float64),
            "ref_per_token_logps": torch.tensor(ref, dtype=torch.float64),
            "num_items_in_batch": torch.tensor(float(mask.sum()), dtype=torch.float64)}
  loss = t._compute_loss(None, inputs)
  loss.backward()
  return float(loss.detach()), lp.grad.numpy()


@pytest.mark.parametrize("loss_type,level,eps_high,beta", [
    ("grpo", "token", 0.2, 0.0), ("grpo", "token", 0.2, 0.04), ("bnpo", "token", 0.2, 0.0),
    ("dr_grpo", "token", 0.2, 0.04), ("dapo", "token", 0.28, 0.0),  # clip-higher
    ("grpo", "sequence", 0.2, 0.0),  # GSPO
    ("grpo", "sequence", 0.28, 0.04)])
def test_grpo_losses_equal_trl(loss_type, level, eps_high, beta):
  logps, old, ref, adv, mask = data()
  want, want_grad = trl_grpo_loss(loss_type, level, 0.2, eps_high, beta, logps, old, ref, adv,
                                  mask)
  fn = losses.GrpoLoss(loss_type, level, eps_low=0.2, eps_high=eps_high, beta=beta)
  (got, metrics), grad = jax.value_and_grad(
      lambda lp: fn(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), jnp.asarray(ref)),
      has_aux=True)(jnp.asarray(logps))
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)
  assert 0 < float(metrics["clip_fraction"]) < 1  # the data reaches past the clip range


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_trl_gkd(beta, temperature):
  from trl.experimental.gkd.gkd_trainer import GKDTrainer
  rng = np.random.default_rng(1)
  student = rng.normal(0, 2, (B, T, V)).astype(np.float32)
  teacher = rng.normal(0, 2, (B, T, V)).astype(np.float32)
  _, _, _, _, mask = data()
  s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
  labels = torch.where(torch.tensor(mask) > 0, 1, -100)
  want = GKDTrainer.generalized_jsd_loss(s, torch.tensor(teacher, dtype=torch.float64), labels,
                                         beta=beta, temperature=temperature)
  want.backward()
  got, grad = jax.value_and_grad(lambda x: losses.generalized_jsd(
      x, jnp.asarray(teacher), jnp.asarray(mask), beta, temperature))(jnp.asarray(student))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grad), s.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_group_advantages_and_dynamic_sampling():
  rewards = np.array([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5], np.float32)
  adv = np.asarray(losses.group_advantages(jnp.asarray(rewards), 4))
  first = rewards[:4]
  np.testing.assert_allclose(adv[:4], (first - first.mean()) / (first.std(ddof=1) + 1e-4),
                             rtol=1e-6)
  np.testing.assert_array_equal(adv[4:], 0.0)  # no variance: no signal
  np.testing.assert_allclose(np.asarray(losses.group_advantages(jnp.asarray(rewards), 4, "none")),
                             rewards - np.repeat([0.75, 0.5], 4), rtol=1e-6)
  assert np.asarray(losses.nonzero_variance_groups(jnp.asarray(rewards), 4)).tolist() == [True,
                                                                                         False]
  with pytest.raises(ValueError, match="scale"):
    losses.group_advantages(jnp.asarray(rewards), 4, "rank")


def test_gae_equals_the_recursion_written_out():
  rng = np.random.default_rng(2)
  _, _, _, _, mask = data()
  rewards = rng.normal(0, 1, (B, T)).astype(np.float32) * mask
  values = rng.normal(0, 1, (B, T)).astype(np.float32)
  gamma, lam = 0.97, 0.9
  adv, ret = losses.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  for b in range(B):
    n = int(mask[b].sum())
    a_next = 0.0
    want = np.zeros(T)
    for t in reversed(range(n)):
      v_next = values[b, t + 1] if t + 1 < n else 0.0
      delta = rewards[b, t] + gamma * v_next - values[b, t]
      a_next = delta + gamma * lam * a_next
      want[t] = a_next
    np.testing.assert_allclose(np.asarray(adv)[b], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret)[b, :n], want[:n] + values[b, :n], rtol=1e-5,
                               atol=1e-6)
    assert np.all(np.asarray(ret)[b, n:] == 0)


def test_ppo_clipped_losses_equal_their_formulas():
  logps, old, _, _, mask = data(3)
  rng = np.random.default_rng(3)
  adv = rng.normal(0, 1, (B, T)).astype(np.float32)
  ratio = np.exp(logps - old)
  want = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
  got, m = losses.ppo_policy_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv),
                                  jnp.asarray(mask), 0.2)
  np.testing.assert_allclose(float(got), (want * mask).sum() / mask.sum(), rtol=1e-5)
  assert 0 < float(m["clip_fraction"]) < 1
  values, old_values, returns = (rng.normal(0, 1, (B, T)).astype(np.float32) for _ in range(3))
  clipped = old_values + np.clip(values - old_values, -0.2, 0.2)
  want_v = 0.5 * np.maximum((values - returns) ** 2, (clipped - returns) ** 2)
  got_v, _ = losses.ppo_value_loss(jnp.asarray(values), jnp.asarray(old_values),
                                   jnp.asarray(returns), jnp.asarray(mask), 0.2)
  np.testing.assert_allclose(float(got_v), (want_v * mask).sum() / mask.sum(), rtol=1e-5)


def test_kl_pieces():
  logps, _, ref, _, mask = data(4)
  d = ref - logps
  np.testing.assert_allclose(np.asarray(losses.k3_kl(jnp.asarray(logps), jnp.asarray(ref))),
                             np.exp(d) - d - 1, rtol=1e-5, atol=1e-6)
  ctl = losses.KlController(0.1, target=6.0, horizon=100)
  assert float(ctl.update(0.1, 12.0, 10)) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
  assert float(ctl.update(0.1, 3.0, 10)) == pytest.approx(0.1 * (1 - 0.2 * 0.1))  # clipped
  assert losses.KlController(0.1).update(0.1, 50.0, 10) == 0.1  # fixed
  np.testing.assert_allclose(np.asarray(losses.overlong_penalty(jnp.array([10, 18, 20]), 20, 4)),
                             [0.0, -0.5, -1.0])
