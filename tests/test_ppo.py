"""PPO with four models (trainer/objectives/ppo.py): the state's slots, a rollout's scores,
rewards, advantages and returns against each completion run alone through the plain models with
GAE and whitening written out in numpy, the loss, the adaptive KL coefficient, PEFT's reference,
refusals, and a bit-identical resume between two steps of one rollout."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import small_run
from models.handle import cast_floating
from trainer import export, train
from trainer.errors import UserError
from trainer.objectives import Bound
from trainer.seeds import fold_seed

CHATS = "data/arith_chat/train.jsonl"
PAIRS = "data/arith_pref"


def reward_config(steps=3):
  c = small_run.config(steps=steps, log_every=1, eval_every=0, checkpoint_every=0,
                       sample_tokens=0, batch_size=2, seq_len=128, eval_batches=1)
  c.train.objective = "reward"
  c.model.max_seq_len = 128
  c.data.update(source="files", format="preference", template="chatml",
                train_files=f"{PAIRS}/train.jsonl", eval_files=f"{PAIRS}/eval.jsonl",
                tokenizer_vocab_size=400)
  c.mesh.data = 1
  return c


def config(rm, steps=2, **rl):
  c = small_run.config(steps=steps, log_every=1, eval_every=0, checkpoint_every=0,
                       sample_tokens=0, batch_size=2, seq_len=128, eval_batches=1)
  c.train.objective = "ppo"
  c.model.max_seq_len = 128
  c.data.update(source="files", format="chat", template="chatml", train_files=CHATS,
                eval_files="data/arith_chat/eval.jsonl", tokenizer=f"{rm}/tokenizer.model")
  c.rl.update(group_size=2, max_new_tokens=6, reward_model=str(rm), iterations=2, **rl)
  c.mesh.data = 1
  return c


def run(c, workdir):
  return train.run(c, str(workdir), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
  """A reward model's run folder (3 steps on the preference pairs)."""
  workdir = tmp_path_factory.mktemp("rm")
  run(reward_config(), workdir)
  return workdir


@pytest.fixture(scope="module")
def ppo_run(rm, tmp_path_factory):
  c = config(rm, steps=2, vf_coef=0.3, entropy_coef=0.01)
  workdir = tmp_path_factory.mktemp("ppo")
  return c, run(c, workdir), workdir


def bound(pl, state):
  return {s.name: Bound(s.handle, pl.spec.params(state, s.name), pl.compute_dtype)
          for s in pl.spec.slots}


def alone(b: Bound, tokens):
  """(log-softmax, values or None) of one sequence on its own row: the plain model."""
  model = b.handle.bind(cast_floating(b.params, b.compute_dtype))
  x = jnp.asarray(tokens)[None]
  h = model.hidden(x, jnp.arange(len(tokens))[None], jnp.ones_like(x))
  if b.handle.cfg.value_head:
    return None, np.asarray(model.values(h))[0]
  return np.asarray(jax.nn.log_softmax(model.logits(h), -1))[0], None


def test_four_models_in_the_state(rm, ppo_run):
  c, out, _ = ppo_run
  pl, state = out["plan"], out["state"]
  slots = {s.name: s for s in pl.spec.slots}
  assert set(slots) == {"policy", "reference", "critic", "reward"}
  assert slots["policy"].trains and slots["critic"].trains
  assert not slots["reference"].trains and not slots["reward"].trains
  assert "opt_state" in state["critic"]  # the critic's own optimizer
  _, _, rm_params, _ = export.load_run(str(rm))
  same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(state["reward"], rm_params)  # frozen
  assert not same(state["critic"]["params"], rm_params)  # started there and trained
  start = pl.init_state(fold_seed(c.train.seed))
  assert same(start["critic"]["params"], rm_params)
  assert same(state["reference"], start["params"]) and not same(state["params"], start["params"])


def test_rollout_equals_each_completion_alone(ppo_run):
  c, out, _ = ppo_run
  pl, state = out["plan"], out["state"]
  g, models = pl.objective, bound(pl, state)
  host, metrics = g.rollout(models, 3, pl.compute_dtype)
  rows, k, L = host["gather"].shape
  chosen = g.stream(3)
  coef, gamma, lam = g.kl.coef, g.gamma, g.lam
  seen = []  # per completion: (row, index, length, policy and reference log-probs, values, score)
  for r in range(rows):
    for i in range(k):
      n = int(host["gather_mask"][r, i].sum())
      completion = host["targets"][r, host["gather"][r, i, :n]]
      prompt = g.state["ids"][chosen[(r * k + i) // g.group]]
      seq = np.concatenate([prompt, completion])
      p = len(prompt)
      lp_pol, _ = alone(models["policy"], seq)
      lp_ref, _ = alone(models["reference"], seq)
      _, values = alone(models["critic"], seq)
      stopped = completion[-1] == g.state["stop"]  # then read as a finished turn
      tail = g.state["suffix"] if stopped else []
      _, score = alone(models["reward"], np.concatenate([seq, tail]).astype(np.int32))
      at = np.arange(p - 1, p - 1 + n)  # positions whose next token is the completion's
      scaled = lambda lp: np.asarray(jax.nn.log_softmax(
          jnp.asarray(lp) / g.temperature, -1))[at, completion]
      seen.append((r, i, n, scaled(lp_pol), scaled(lp_ref), values[at], score[-1]))
  # rl.normalize_reward: the first rollout's scores standardise scores and the critic's values
  assert g.normalize_reward and g.critic == "reward"
  raw = np.array([x[-1] for x in seen])
  mean, std = raw.mean(), raw.std()
  np.testing.assert_allclose(host["score_norm"], np.tile([mean, std], (rows, 1)), rtol=1e-5)
  all_adv, checks = [], []
  for r, i, n, lp_pol, lp_ref, values, score in seen:
    values = (values - mean) / std
    np.testing.assert_allclose(host["old_logps"][r, i, :n], lp_pol, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host["old_values"][r, i, :n], values, rtol=1e-5, atol=1e-5)
    rewards = -coef * (host["old_logps"][r, i, :n] - lp_ref)
    rewards[-1] += (score - mean) / std  # the reward model reads the last token
    adv, last = np.zeros(n), 0.0
    for t in reversed(range(n)):
      v_next = values[t + 1] if t + 1 < n else 0.0
      delta = rewards[t] + gamma * v_next - values[t]
      last = delta + gamma * lam * last
      adv[t] = last
    np.testing.assert_allclose(host["returns"][r, i, :n], adv + values, rtol=1e-4, atol=1e-5)
    all_adv.append(adv)
    checks.append((r, i, n))
  flat = np.concatenate(all_adv)
  whitened = (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8)
  got = np.concatenate([host["advantages"][r, i, :n] for r, i, n in checks])
  np.testing.assert_allclose(got, whitened, rtol=1e-4, atol=1e-4)
  assert np.all(host["advantages"] * (1 - host["gather_mask"]) == 0)
  assert set(metrics) >= {"reward", "kl", "kl_coef", "value", "response_length", "accuracy"}

  # the loss: at the rollout's own parameters the ratio is 1 and the values are the old ones,
  # so it is -mean(advantage) + vf_coef x 0.5 mean((V - R)^2) - entropy_coef x entropy
  batch = {key: jnp.asarray(v) for key, v in host.items()}
  loss_sum, count, aux = g.loss(models, batch)
  mask = host["gather_mask"]
  mean = lambda x: float((x * mask).sum() / mask.sum())
  vf = 0.5 * mean((host["old_values"] - host["returns"]) ** 2)
  np.testing.assert_allclose(float(aux["value_loss"] / count), vf, rtol=1e-5)
  np.testing.assert_allclose(float(aux["policy_loss"] / count), -mean(host["advantages"]),
                             atol=1e-6)
  want = -mean(host["advantages"]) + g.vf_coef * vf - g.entropy_coef * float(
      aux["entropy"] / count)
  np.testing.assert_allclose(float(loss_sum / count), want, rtol=1e-5, atol=1e-6)
  assert float(count) == mask.sum()


def test_adaptive_kl_coefficient_and_score_norm_carry_over_from_the_last_rollout(ppo_run):
  _, out, _ = ppo_run
  pl, state = out["plan"], out["state"]
  g = pl.objective
  previous = {"kl_coef": np.full((2, 1), 0.2, np.float32), "kl": np.full((2, 1), 9.0, np.float32),
              "score_norm": np.tile(np.float32([1.5, 2.0]), (2, 1))}
  saved = g.kl
  try:
    g.kl = type(saved)(0.05, target=6.0, horizon=40)
    _, metrics = g.rollout(bound(pl, state), 3, pl.compute_dtype, previous)
  finally:
    g.kl = saved
  n = 2 * g.group  # completions of the previous rollout
  assert metrics["kl_coef"] == pytest.approx(0.2 * (1 + min(9.0 / 6.0 - 1, 0.2) * n / 40))
  # later rollouts standardise the reward model's scores by the first one's mean and std
  assert metrics["reward"] == pytest.approx((metrics["reward_model_score"] - 1.5) / 2.0, rel=1e-5)


def test_lora_actor_uses_its_adapters_off_as_reference(rm, tmp_path):
  c = config(rm, steps=1)
  c.peft.update(method="lora", lora_rank=4)
  out = run(c, tmp_path)
  names = [s.name for s in out["plan"].spec.slots]
  assert names == ["policy", "critic", "reward"]  # no copy of the policy
  assert np.isfinite(out["loss"])


def test_python_reward_and_a_critic_from_the_policy(rm, tmp_path):
  c = config(rm, steps=1, reward="exact", critic="policy")
  c.rl.reward_model = ""
  pl = train.plan(c, train.model_config(c, 400), train.parallel.make_mesh(
      train.check_mesh(c, 1), jax.devices()[:1]))
  assert [s.name for s in pl.spec.slots] == ["policy", "reference", "critic"]
  start = pl.init_state(3)
  policy, critic = start["params"], start["critic"]["params"]
  assert "score" in critic and "head" not in critic and not np.any(np.asarray(critic["score"]))
  np.testing.assert_array_equal(np.asarray(critic["embed"]), np.asarray(policy["embed"]))
  out = run(c, tmp_path)
  assert np.isfinite(out["loss"])


def test_bad_ppo_settings_are_one_line(rm, ppo_run, tmp_path):
  cases = [({"critic": "reward", "reward_model": ""}, "rl.critic"),
           ({"reward_model": str(tmp_path / "none")}, "rl.reward_model"),
           ({"gamma": 0.0}, "rl.gamma"), ({"critic": "value"}, "rl.critic"),
           ({"iterations": 0}, "rl.iterations"), ({"kl_coef": -1.0}, "rl.kl_coef")]
  for i, (rl, key) in enumerate(cases):
    c = config(rm)
    c.rl.update(**rl)
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
      run(c, tmp_path / str(i))
    assert "\n" not in str(e.value)
  # a run that is not a reward model's; a reward model with another tokenizer
  c = config(rm)
  c.rl.reward_model = str(ppo_run[2])
  with pytest.raises(UserError, match="not a reward model"):
    run(c, tmp_path / "a")
  c = config(rm)
  c.data.tokenizer = ""  # the policy trains its own tokenizer on the chats
  c.data.tokenizer_vocab_size = 400
  with pytest.raises(UserError, match="another tokenizer"):
    run(c, tmp_path / "b")


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_ppo_resumes_bit_identically_between_two_steps_of_a_rollout(rm, tmp_path):
  def cfg():
    return config(rm, steps=4, kl_target=1.0, kl_horizon=20)  # the adaptive coefficient moves
  whole = run(cfg(), tmp_path / "whole")
  c = cfg()
  c.train.stop_after_steps = 3  # mid-rollout (2 steps per rollout)
  run(c, tmp_path / "split")
  split = run(cfg(), tmp_path / "split")
  for a, b in zip(jax.tree.leaves(whole["state"]), jax.tree.leaves(split["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  losses = lambda w: [json.loads(line).get("loss") for line in open(w / "metrics.jsonl")]
  assert [x for x in losses(tmp_path / "whole") if x is not None][-1] == \
      [x for x in losses(tmp_path / "split") if x is not None][-1]
