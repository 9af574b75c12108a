"""Preference losses against TRL's own loss code (torch CPU), values and gradients; SFT's
per-sequence normalisation and pair sums against plain numpy."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer

from trainer.objectives import dpo, pairwise, sft

RNG = np.random.default_rng(0)
N_C = RNG.integers(1, 12, 16).astype(np.float32)  # answer lengths
N_R = RNG.integers(1, 12, 16).astype(np.float32)
PI_C = -RNG.uniform(0.2, 3.0, 16).astype(np.float32) * N_C  # summed log-probs
PI_R = -RNG.uniform(0.2, 3.0, 16).astype(np.float32) * N_R
REF_C = PI_C + RNG.normal(0, 1, 16).astype(np.float32)
REF_R = PI_R + RNG.normal(0, 1, 16).astype(np.float32)


def trl(kind, beta, smoothing, gamma):
  """TRL's loss of the mean over pairs and its gradient with respect to (pi_c, pi_r). DPO's
  sigmoid and IPO are CPO's losses applied to log-ratios (TRL's DPOTrainer computes the same
  expressions inline: -log s(beta delta), and IPO on per-token averages); cDPO's smoothing is
  CPO's."""
  pi_c, pi_r = (torch.tensor(x, requires_grad=True) for x in (PI_C, PI_R))
  ns = types.SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=smoothing, simpo_gamma=gamma,
                             accelerator=types.SimpleNamespace(device="cpu"))
  ref_c, ref_r, n_c, n_r = (torch.tensor(x) for x in (REF_C, REF_R, N_C, N_R))
  if kind == "sigmoid":
    ns.loss_type = "sigmoid"
    losses = CPOTrainer.cpo_loss(ns, pi_c - ref_c, pi_r - ref_r)[0]
  elif kind == "ipo":
    ns.loss_type = "ipo"
    losses = CPOTrainer.cpo_loss(ns, (pi_c - ref_c) / n_c, (pi_r - ref_r) / n_r)[0]
  elif kind == "simpo":
    ns.loss_type = "simpo"
    losses = CPOTrainer.cpo_loss(ns, pi_c / n_c, pi_r / n_r)[0]
  else:
    losses = -ORPOTrainer.odds_ratio_loss(ns, pi_c / n_c, pi_r / n_r)[0]  # TRL subtracts it
  loss = losses.mean()
  loss.backward()
  return float(loss), pi_c.grad.numpy(), pi_r.grad.numpy()


@pytest.mark.parametrize("kind,beta,smoothing,gamma", [
    ("sigmoid", 0.1, 0.0, 0.0), ("sigmoid", 0.5, 0.2, 0.0), ("ipo", 0.1, 0.0, 0.0),
    ("simpo", 2.0, 0.0, 0.5), ("simpo", 2.5, 0.1, 1.0), ("orpo", 0.1, 0.0, 0.0)])
def test_preference_losses_and_gradients_equal_trl(kind, beta, smoothing, gamma):
  def ours(pi_c, pi_r):
    losses, _, _ = dpo.preference_losses(kind, pi_c, pi_r, REF_C, REF_R, N_C, N_R, beta,
                                                smoothing, gamma)
    return losses.mean()
  value, (g_c, g_r) = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(PI_C),
                                                               jnp.asarray(PI_R))
  want, want_c, want_r = trl(kind, beta, smoothing, gamma)
  assert abs(float(value) - want) <= 1e-5 * max(1.0, abs(want)), (float(value), want)
  np.testing.assert_allclose(g_c, want_c, atol=1e-5)
  np.testing.assert_allclose(g_r, want_r, atol=1e-5)
  assert np.abs(want_c).max() > 1e-4  # a gradient worth comparing


def test_dpo_without_smoothing_is_minus_log_sigmoid_of_the_margin():
  losses, reward_c, reward_r = dpo.preference_losses(
      "sigmoid", PI_C, PI_R, REF_C, REF_R, N_C, N_R, beta=0.1)
  delta = (PI_C - REF_C) - (PI_R - REF_R)
  np.testing.assert_allclose(losses, np.log1p(np.exp(-0.1 * delta)), rtol=1e-6)
  np.testing.assert_allclose(reward_c - reward_r, 0.1 * delta, rtol=1e-5, atol=1e-6)


def test_pair_sums_and_sequence_means_against_numpy():
  seg = np.array([[1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 0], [1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
  x = RNG.normal(size=seg.shape).astype(np.float32)
  chosen, rejected = pairwise.pair_sums(jnp.asarray(x), jnp.asarray(seg), 4)
  for b in range(2):
    for k in range(4):
      np.testing.assert_allclose(chosen[b, k], x[b][seg[b] == 3 * k + 2].sum(), atol=1e-6)
      np.testing.assert_allclose(rejected[b, k], x[b][seg[b] == 3 * k + 3].sum(), atol=1e-6)
  w = (RNG.random(seg.shape) < 0.7).astype(np.float32)
  total, count = sft.sequence_sums(jnp.asarray(x), jnp.asarray(w), jnp.asarray(seg))
  means = [x[b][(seg[b] == s)].dot(w[b][seg[b] == s]) / w[b][seg[b] == s].sum()
           for b in range(2) for s in range(1, 7) if w[b][seg[b] == s].sum() > 0]
  np.testing.assert_allclose(float(total), sum(means), rtol=1e-5)
  assert int(count) == len(means)
  last = np.asarray(pairwise.last_positions(jnp.asarray(seg)))
  np.testing.assert_array_equal(last[1], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def test_sft_normalisation_per_token_and_per_sequence(tmp_path):
  """The loss function's two SFT normalisations on a packed row of examples of different
  lengths, against the per-token losses recomputed by hand."""
  import hf_models
  from models import hf
  from models import handle as handles
  from trainer import losses, step as step_lib
  hf_models.make("llama", str(tmp_path / "base"))
  cfg, params = hf.load(str(tmp_path / "base"))
  handle = handles.model_handle(cfg)
  seg = np.array([[1] * 3 + [2] * 9 + [3] * 4 + [0] * 2])
  pos = np.concatenate([np.arange(3), np.arange(9), np.arange(4), [0, 0]])[None]
  w = np.array([[0, 1, 1] + [0] * 4 + [1] * 5 + [0, 1, 1, 1] + [0, 0]], np.float32)
  batch = {"inputs": RNG.integers(0, 97, seg.shape), "targets": RNG.integers(0, 97, seg.shape),
           "weights": w, "positions": pos, "segment_ids": seg}
  model = handle.bind(params)
  nll = np.asarray(losses.token_nll(model.logits(model.hidden(
      batch["inputs"], batch["positions"], batch["segment_ids"])), batch["targets"]))[0]
  per_token = step_lib.make_loss_fn(handle, jnp.float32, objective=sft.SFT("token"))
  per_seq = step_lib.make_loss_fn(handle, jnp.float32, objective=sft.SFT("sequence"))
  total, count, _ = per_token(params, batch)
  np.testing.assert_allclose(float(total) / float(count), (nll * w[0]).sum() / w.sum(), rtol=1e-5)
  total, count, _ = per_seq(params, batch)
  means = [(nll * w[0])[seg[0] == s].sum() / w[0][seg[0] == s].sum() for s in (1, 2, 3)]
  assert int(count) == 3
  np.testing.assert_allclose(float(total) / 3, np.mean(means), rtol=1e-5)
