"""GRPO (trainer/objectives/grpo.py): the prompt stream, rollout rows whose recorded log-probs
equal the training forward's on the packed group rows, the loss on them equal to GrpoLoss on
the gathered completions, and a run that resumes bit-identically."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import small_run
from trainer import train
from trainer.objectives import Bound
from trainer.objectives.grpo import GRPO, read_prompts
from trainer.errors import UserError

CHATS = "data/arith_chat/train.jsonl"


def config(steps=3, **rl):
  c = small_run.config(steps=steps, log_every=1, eval_every=0, checkpoint_every=0,
                       sample_tokens=0, batch_size=2, seq_len=128, eval_batches=1)
  c.train.objective = "grpo"
  c.model.max_seq_len = 128
  c.data.update(source="files", format="chat", template="chatml", train_files=CHATS,
                eval_files="data/arith_chat/eval.jsonl", tokenizer_vocab_size=400)
  c.rl.update(group_size=3, max_new_tokens=8, **rl)
  c.mesh.data = 1
  return c


def run(c, workdir):
  return train.run(c, str(workdir), devices=jax.devices()[:1])


def test_prompt_stream_is_a_permutation_per_epoch():
  g = GRPO(CHATS, seed=5)
  g.state.update(ids=[[0]] * 10, rows=2)  # 10 prompts, 2 per step
  steps = [g.stream(s) for s in range(1, 11)]
  first, second = sum(steps[:5], []), sum(steps[5:], [])
  assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
  assert first != second  # a new order each epoch
  assert GRPO(CHATS, seed=5, state={"ids": [[0]] * 10, "rows": 2}).stream(7) == steps[6]


def test_bad_prompt_files_name_the_line(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                  '{"role": "assistant", "content": "yo"}]}\n{"messages": [{"role": "user"}]}\n')
  with pytest.raises(UserError, match=f"{path}:2"):
    read_prompts(str(path))


@pytest.fixture(scope="module")
def rollout_run(tmp_path_factory):
  """A 1-step grpo run (untrained model), then one more rollout from its state."""
  c = config(steps=1, beta=0.04)
  workdir = tmp_path_factory.mktemp("grpo")
  out = run(c, workdir)
  return c, out


def test_rollout_logps_equal_the_training_forward_on_group_rows(rollout_run):
  c, out = rollout_run
  plan = out["plan"]
  g = plan.objective
  state = out["state"]
  models = {s.name: Bound(s.handle, plan.spec.params(state, s.name), plan.compute_dtype)
            for s in plan.spec.slots}
  host, metrics = g.rollout(models, 2, plan.compute_dtype)
  b, k, L = host["gather"].shape
  assert (b, k) == (2, 3) and set(metrics) >= {"reward", "accuracy", "response_length"}
  mask = host["gather_mask"]
  # the gathered targets are the sampled tokens: each completion ends with its stop or is full
  targets = np.take_along_axis(host["targets"], host["gather"].reshape(b, -1), 1).reshape(b, k, L)
  n = mask.sum(-1).astype(int)
  last = np.take_along_axis(targets, np.maximum(n - 1, 0)[..., None], -1)[..., 0]
  assert np.all(n >= 1) and np.all((n == L) | (last == g.state["stop"]))
  batch = {key: jnp.asarray(v) for key, v in host.items()}
  lp, _ = g.token_logps(models["policy"], batch)
  got = np.take_along_axis(np.asarray(lp), host["gather"].reshape(b, -1), 1).reshape(b, k, L)
  np.testing.assert_allclose(got * mask, host["old_logps"] * mask, rtol=1e-5, atol=1e-5)
  # the objective's loss is GrpoLoss on the gathered completions (the ratio is 1 here)
  loss_sum, count, aux = g.loss(models, batch)
  ref = np.take_along_axis(np.asarray(g.token_logps(g.reference(models), batch)[0]),
                           host["gather"].reshape(b, -1), 1).reshape(b * k, L)
  want, _ = g.loss_fn(jnp.asarray(got.reshape(b * k, L)), jnp.asarray(host["old_logps"]).reshape(
      b * k, L), jnp.asarray(host["advantages"]).reshape(-1), jnp.asarray(mask).reshape(b * k, L),
      jnp.asarray(ref))
  np.testing.assert_allclose(float(loss_sum / count), float(want), rtol=1e-5, atol=1e-7)
  assert 0 <= float(aux["entropy"] / count)


def test_dynamic_sampling_redraws_prompts_until_every_group_has_a_signal(rollout_run):
  """DAPO: a group whose replies all score the same is set aside and later draws of prompts
  fill its place; with rl.max_draws=1 it stays in the batch, out of the loss."""
  c, out = rollout_run
  plan, state = out["plan"], out["state"]
  g = dataclasses.replace(plan.objective, dynamic_sampling=True, state=dict(plan.objective.state))
  models = {s.name: Bound(s.handle, plan.spec.params(state, s.name), plan.compute_dtype)
            for s in plan.spec.slots}
  step = 2
  blocked = g.stream(step)[0]  # this prompt's replies all score 0: no signal
  g.state["score"] = lambda messages, text, answer: (
      0.0 if messages == g.state["chats"][blocked][0] else float(sum(map(ord, text)) % 7))

  def prompts_of(host):
    return [next(i for i, ids in enumerate(g.state["ids"])
                 if np.array_equal(host["inputs"][r, :len(ids)], ids)) for r in range(2)]

  g.max_draws = 1
  host, metrics = g.rollout(models, step, plan.compute_dtype)
  assert metrics["draws"] == 1 and metrics["groups_kept"] == 0.5
  assert prompts_of(host) == g.stream(step)[::-1]  # the groups with a signal first
  assert host["gather_mask"][0].any() and not host["gather_mask"][1].any()

  g.max_draws = 5
  host, metrics = g.rollout(models, step, plan.compute_dtype)
  assert metrics["draws"] == 2 and metrics["groups_kept"] == 1.0
  got = prompts_of(host)
  assert got[0] == g.stream(step)[1] and got[1] == g.draw(step, 1)[0] != blocked
  assert np.all(np.abs(host["advantages"]).max(1) > 0)  # each group has a signal
  again, _ = g.rollout(models, step, plan.compute_dtype)
  for k in host:
    np.testing.assert_array_equal(again[k], host[k])


def test_bad_rl_settings_are_one_line(tmp_path):
  for key, value in (("group_size", 1), ("loss_type", "ppo"), ("level", "tokens")):
    c = config()
    c.rl[key] = value
    with pytest.raises(UserError, match=f"rl.{key}") as e:
      run(c, tmp_path / key)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_grpo_resumes_bit_identically(tmp_path):
  c = config(steps=4, beta=0.04)
  run(c, tmp_path / "whole")
  c2 = config(steps=4, beta=0.04)
  c2.train.stop_after_steps = 2
  run(c2, tmp_path / "split")
  run(config(steps=4, beta=0.04), tmp_path / "split")
  rows = lambda d: [{k: v for k, v in json.loads(l).items()
                     if k not in ("tokens_per_sec", "mfu")}
                    for l in open(tmp_path / d / "metrics.jsonl") if '"loss"' in l]
  whole, split = rows("whole"), rows("split")
  assert [r["step"] for r in split] == [1, 2, 3, 4]
  assert whole == split
