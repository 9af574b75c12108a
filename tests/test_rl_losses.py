"""trainer/rl/losses.py against TRL's own code, values and gradients: GRPOTrainer._compute_loss
for the GRPO family's loss types and GKD's generalized_jsd_loss (the installed TRL), and the
rewards, GAE, whitening and clipped losses of PPOTrainer.train (TRL 0.20, the last release with
a PPOTrainer, read from its wheel); and against plain loops (group advantages, GAE)."""

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


# -- PPO against TRL's PPOTrainer (last shipped in TRL 0.20; read from its wheel, run here) -----

TRL_PPO = "trl==0.20.0"


@pytest.fixture(scope="module")
def trl_ppo(tmp_path_factory):
  """The source of TRL 0.20's ppo_trainer.py and core.py, from the wheel in
  $JAXTRAIN_CACHE (default ~/.cache/jaxtrain), downloaded there from PyPI if absent."""
  import glob
  import os
  import subprocess
  import sys
  import zipfile
  cache = os.environ.get("JAXTRAIN_CACHE", os.path.expanduser("~/.cache/jaxtrain"))
  pattern = os.path.join(cache, "trl-0.20.0-py3-none-any.whl")
  if not glob.glob(pattern):
    tmp = tmp_path_factory.mktemp("trl")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d",
                        str(tmp), TRL_PPO], capture_output=True, text=True, timeout=300)
    wheels = glob.glob(str(tmp / "trl-*.whl"))
    if r.returncode or not wheels:
      pytest.skip(f"{TRL_PPO}'s wheel is not in {cache} and pip could not download it "
                  f"(run: pip download --no-deps -d {cache} {TRL_PPO})")
    os.makedirs(cache, exist_ok=True)
    os.replace(wheels[0], pattern)  # atomic: parallel workers may download it at once
  with zipfile.ZipFile(pattern) as z:
    return (z.read("trl/trainer/ppo_trainer.py").decode(), z.read("trl/core.py").decode())


def trl_fragment(source: str, first: str, last: str) -> str:
  """The lines of `source` from the one that starts with `first` through the statement that
  starts with `last`, dedented: a piece of PPOTrainer.train to run on our inputs."""
  import textwrap
  lines = source.splitlines()
  start = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
  end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(last))
  while lines[end].count("(") > lines[end].count(")") or lines[end].rstrip().endswith(","):
    end += 1  # a statement that goes on over several lines
  return textwrap.dedent("\n".join(lines[start:end + 1]))


def trl_functions(source: str, *names: str) -> dict:
  """The named top-level functions of a TRL module, compiled on their own."""
  import ast
  import typing
  tree = ast.parse(source)
  keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
  assert {n.name for n in keep} == set(names)
  space = {"torch": torch, "Optional": typing.Optional}
  exec(compile(ast.Module(keep, []), "trl/core.py", "exec"), space)
  return space


@pytest.mark.parametrize("gamma,lam,whiten_rewards", [(1.0, 0.95, False), (0.9, 0.8, True)])
def test_ppo_rewards_gae_and_losses_equal_trl_ppo_trainer(trl_ppo, gamma, lam, whiten_rewards):
  """TRL's own lines from PPOTrainer.train (the rewards, GAE, whitening, clipped policy and
  value losses) run on the same rollout as trainer/rl/losses.py: values and gradients equal.
  TRL lays a reply out padded, with its score and a value one position past the reply's last
  token (its `padding_mask_p1`); our functions take the mask, so they are given TRL's."""
  ppo_src, core_src = trl_ppo
  rng = np.random.default_rng(7)
  Bq, W, ctx = 5, 8, 3
  args = types.SimpleNamespace(kl_estimator="k1", kl_coef=0.07, whiten_rewards=whiten_rewards,
                               gamma=gamma, lam=lam, cliprange=0.2, cliprange_value=0.2,
                               vf_coef=0.1)
  seq = np.array([7, 2, 5, 0, 6])  # the index of each reply's last token
  space = dict(trl_functions(core_src, "masked_mean", "masked_var", "masked_whiten"),
               args=args, INVALID_LOGPROB=1.0,
               responses=torch.zeros(Bq, W, dtype=torch.long),
               sequence_lengths=torch.tensor(seq),
               logprobs=torch.tensor(rng.normal(-1.5, 0.4, (Bq, W)), dtype=torch.float32),
               ref_logprobs=torch.tensor(rng.normal(-1.5, 0.4, (Bq, W)), dtype=torch.float32),
               values=torch.tensor(rng.normal(0, 1, (Bq, W)), dtype=torch.float32),
               scores=torch.tensor(rng.normal(0, 1, Bq), dtype=torch.float32))
  keep = {k: space[k].clone() for k in ("logprobs", "ref_logprobs", "values", "scores")}
  exec(trl_fragment(ppo_src, "response_idxs = torch.arange",
                    "advantages = torch.masked_fill(advantages, padding_mask, 0)"), space)
  valid = ~space["padding_mask"].numpy()  # the reply's tokens
  valid_p1 = ~space["padding_mask_p1"].numpy()  # and one more: where TRL puts the score
  valid_f, valid_p1_f = valid.astype(np.float32), valid_p1.astype(np.float32)
  invalid = lambda x: np.where(valid, x, 1.0).astype(np.float32)  # TRL's INVALID_LOGPROB
  rewards, kl = losses.ppo_rewards(jnp.asarray(invalid(keep["logprobs"].numpy())),
                                   jnp.asarray(invalid(keep["ref_logprobs"].numpy())),
                                   jnp.asarray(valid_p1_f), jnp.asarray(keep["scores"].numpy()),
                                   args.kl_coef)
  np.testing.assert_allclose(np.asarray(kl), space["kl"].numpy() * valid_p1, atol=1e-7)
  if whiten_rewards:
    rewards = losses.masked_whiten(rewards, jnp.asarray(valid_p1_f), shift_mean=False)
    rewards = rewards * valid_p1_f
  np.testing.assert_allclose(np.asarray(rewards), space["rewards"].numpy(), rtol=1e-5, atol=1e-6)
  adv, ret = losses.gae(rewards, jnp.asarray(keep["values"].numpy()), jnp.asarray(valid_p1_f),
                        gamma, lam)
  np.testing.assert_allclose(np.asarray(ret), space["returns"].numpy(), rtol=1e-5, atol=1e-5)
  adv = losses.masked_whiten(adv, jnp.asarray(valid_f)) * valid_f
  np.testing.assert_allclose(np.asarray(adv), space["advantages"].numpy(), rtol=1e-5, atol=1e-5)

  # one micro-batch of the update: TRL's loss lines and their gradients
  new = torch.tensor(rng.normal(-1.5, 0.4, (Bq, W)), dtype=torch.float32)
  new = torch.where(torch.rand(Bq, W, generator=torch.Generator().manual_seed(0)) < 0.3,
                    space["logprobs"] + 0.5, new).requires_grad_()  # some ratios past the clip
  vpred_temp = torch.tensor(rng.normal(0, 1, (Bq, ctx - 1 + W + 1, 1)), dtype=torch.float32)
  vpred_temp.requires_grad_()
  inds = np.arange(Bq)
  space.update(new_logprobs=new, vpred_temp=vpred_temp, context_length=ctx,
               micro_batch_inds=inds, mb_advantage=space["advantages"][inds],
               mb_logprobs=space["logprobs"][inds], mb_return=space["returns"][inds],
               mb_values=space["values"][inds])
  exec(trl_fragment(ppo_src, "new_logprobs = torch.masked_fill(",
                    "loss = pg_loss + args.vf_coef * vf_loss"), space)
  space["loss"].backward()

  def ours(new_logps, vpred):
    pg, _ = losses.ppo_policy_loss(new_logps, jnp.asarray(space["logprobs"].numpy()),
                                   jnp.asarray(space["advantages"].numpy()),
                                   jnp.asarray(valid_f), args.cliprange)
    vf, vm = losses.ppo_value_loss(vpred, jnp.asarray(space["values"].numpy()),
                                   jnp.asarray(space["returns"].numpy()),
                                   jnp.asarray(valid_p1_f), args.cliprange_value)
    return pg + args.vf_coef * vf, (pg, vf, vm["value_clip_fraction"])

  vpred = vpred_temp.detach().numpy()[:, ctx - 1:-1, 0]
  (loss, (pg, vf, vclip)), (g_new, g_v) = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(
      jnp.asarray(new.detach().numpy()), jnp.asarray(vpred))
  assert 0 < float(space["vf_clipfrac"]) < 1
  np.testing.assert_allclose(float(pg), float(space["pg_loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(vf), float(space["vf_loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(vclip), float(space["vf_clipfrac"]), rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(space["loss"]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_new), new.grad.numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(g_v), vpred_temp.grad.numpy()[:, ctx - 1:-1, 0],
                             rtol=1e-5, atol=1e-7)
