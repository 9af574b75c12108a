"""Preference rows (shared prompt), the DPO step's reference handling, reward-model export to
transformers, and the objectives end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_models
import small_run
from models import Context, hf
from models.config import Execution
from models import handle as handles
from trainer import losses, step as step_lib
from trainer.objectives import Bound, dpo, pairwise
from trainer.data import pairs

PROMPTS = [[5, 9, 2, 7], [3], [8, 1, 4]]
CHOSEN = [[11, 12, 13], [20, 21], [30]]
REJECTED = [[14, 15], [22, 23, 24, 25], [31, 32]]


def pair_rows(seq_len=40):
  ps = [pairs.Pair(np.asarray(p), np.asarray(c), np.ones(len(c)), np.asarray(r), np.ones(len(r)))
        for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
  row = pairs.assemble([(i, 0, len(x)) for i, x in enumerate(ps)], ps, None, seq_len)
  return {k: v[None] for k, v in row.items()}


def alone_logps(model, prompt, answer):
  """Summed log-probs of `answer` after `prompt`, the sequence run on its own."""
  seq = np.asarray(prompt + answer)[None]
  logits = np.asarray(model(seq[:, :-1]))
  nll = np.asarray(losses.token_nll(jnp.asarray(logits), jnp.asarray(seq[:, 1:])))[0]
  return -nll[len(prompt) - 1:].sum(), logits[0, -1]


# xla's shared-prompt mask is also checked by tests/test_rl_rows.py (groups of 4) in the default
# suite; this case runs with `pytest -m slow`
@pytest.mark.parametrize("impl", [pytest.param("xla", marks=pytest.mark.slow), "pallas"])
def test_shared_prompt_rows_give_each_answer_its_own_sequence(tmp_path, impl):
  """Three pairs packed in one row, each answer seeing its prompt and not the other answer:
  the answers' summed log-probs equal those of prompt + answer run alone."""
  hf_models.make("llama", str(tmp_path / "base"))
  cfg, params = hf.load(str(tmp_path / "base"))
  handle = handles.model_handle(cfg, run=Execution(attention_impl=impl))
  model = handle.bind(params)
  batch = pair_rows()
  chosen, rejected = dpo.answer_logps(Bound(handle, params, jnp.float32), batch)
  for k, (p, c, r) in enumerate(zip(PROMPTS, CHOSEN, REJECTED)):
    np.testing.assert_allclose(chosen[0, k], alone_logps(model, p, c)[0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(rejected[0, k], alone_logps(model, p, r)[0], rtol=2e-5, atol=2e-5)
  assert np.all(np.asarray(chosen[0, 3:]) == 0)  # no more pairs in the row


def test_dpo_reference_at_the_start_gives_log_2_and_peft_switches_adapters_off(tmp_path):
  from models.peft import Peft
  from test_peft import peft_section
  hf_models.make("llama", str(tmp_path / "base"))
  cfg, params = hf.load(str(tmp_path / "base"))
  batch = pair_rows()
  spec = dpo.DPO("sigmoid", beta=0.1)
  full = step_lib.make_loss_fn(handles.model_handle(cfg), jnp.float32, objective=spec)
  total, count, aux = full(params, batch, None, params)  # reference = policy
  assert int(count) == 3
  np.testing.assert_allclose(float(total) / 3, np.log(2.0), rtol=1e-6)
  assert float(aux["margin"]) == 0.0
  # LoRA: the reference is the base model (adapters off), not a second copy
  peft = Peft.from_config(peft_section(method="lora", rank=4), cfg)
  handle = handles.model_handle(cfg, peft)
  lora = handles.init_params(handle, seed=0, base=jax.tree.map(jnp.copy, params))
  lora["peft"] = jax.tree.map(lambda x: x + 0.05, lora["peft"])
  total, count, aux = step_lib.make_loss_fn(handle, jnp.float32, objective=spec)(lora, batch)
  pi_c, pi_r = dpo.answer_logps(Bound(handle, lora, jnp.float32), batch)
  ref_c, ref_r = dpo.answer_logps(Bound(handles.model_handle(cfg), params, jnp.float32),
                                batch)
  delta = (pi_c - ref_c) - (pi_r - ref_r)
  want = np.log1p(np.exp(-0.1 * np.asarray(delta[0, :3])))
  np.testing.assert_allclose(float(total), want.sum(), rtol=1e-5)
  assert abs(float(delta[0, :3].sum())) > 1e-3  # the adapters changed the policy
  # the same with the reference log-probs precomputed into the batch
  pre = dict(batch)
  pre["reference"] = np.zeros_like(batch["reference"])
  seg = batch["segment_ids"][0]
  for k in range(3):
    pre["reference"][0, np.argmax(seg == 3 * k + 2)] = ref_c[0, k]
    pre["reference"][0, np.argmax(seg == 3 * k + 3)] = ref_r[0, k]
  spec_pre = dataclasses.replace(spec, precompute_ref=True)
  got = step_lib.make_loss_fn(handle, jnp.float32, objective=spec_pre)(lora, pre)
  np.testing.assert_allclose(float(got[0]), float(total), rtol=1e-6)


def test_reward_model_export_scores_in_transformers(tmp_path):
  """A value-head model written by hf.save loads as LlamaForSequenceClassification and scores
  prompt + answer as our reward model scores the answer's last position in a pair row."""
  hf_models.make("llama", str(tmp_path / "base"))
  cfg, params = hf.load(str(tmp_path / "base"), value_head=True)  # a fresh score head
  assert cfg.value_head and params["score"].shape == (cfg.d_model, 1) and "head" not in params
  handle = handles.model_handle(cfg)
  hf.save(str(tmp_path / "rm"), cfg, params)
  theirs = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / "rm"), attn_implementation="eager").eval()
  batch = pair_rows()
  model = handle.bind(params)
  h = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"],
                   Context(shared_prompt=2))
  scores = pairwise.pair_sums(model.values(h) * pairwise.last_positions(
      jnp.asarray(batch["segment_ids"])), batch["segment_ids"], 4)
  for k, (p, c, r) in enumerate(zip(PROMPTS, CHOSEN, REJECTED)):
    for answer, ours in ((c, scores[0][0, k]), (r, scores[1][0, k])):
      with torch.no_grad():
        want = theirs(torch.tensor([p + answer])).logits[0, 0].item()
      assert abs(float(ours) - want) <= 1e-4, (float(ours), want)
  back_cfg, back = hf.load(str(tmp_path / "rm"))  # and back: a reward model again
  assert back_cfg.value_head
  np.testing.assert_allclose(back["score"], params["score"], atol=1e-7)


def run_objective(tmp_path, objective, steps, **updates):
  from trainer import train
  c = small_run.config(steps=steps, eval_every=0, checkpoint_every=0, sample_tokens=0,
                       log_every=1, lr=3e-3, warmup_steps=2, seq_len=64, batch_size=8)
  c.train.objective = objective
  with open("data/arith_pref/train.jsonl") as f, open(tmp_path / "few.jsonl", "w") as out:
    out.writelines(f.readlines()[:32])  # a few pairs, seen again and again: the loss must fall
  c.data.update(source="files", format="preference", template="chatml",
                train_files=str(tmp_path / "few.jsonl"), eval_files="data/arith_pref/eval.jsonl",
                tokenizer_vocab_size=400)
  for section, values in updates.items():
    c[section].update(**values)
  out = train.run(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f]
  return out, rows


# the other losses' values are checked against TRL in tests/test_objectives.py; their end-to-end
# runs are in `pytest -m slow`, which .ci/run runs after the default suite
@pytest.mark.parametrize("loss,precompute", [
    ("sigmoid", False), ("sigmoid", True),
    *[pytest.param(loss, False, marks=pytest.mark.slow) for loss in ("ipo", "simpo", "orpo")]])
def test_dpo_losses_train_end_to_end(tmp_path, loss, precompute):
  out, rows = run_objective(tmp_path, "dpo", 16, dpo=dict(loss=loss, precompute_ref=precompute))
  train = [r for r in rows if "accuracy" in r]
  assert len(train) == 16 and all(np.isfinite(r["loss"]) for r in train)
  assert np.mean([r["loss"] for r in train[-4:]]) < np.mean([r["loss"] for r in train[:4]])
  if loss == "sigmoid":
    np.testing.assert_allclose(train[0]["loss"], np.log(2.0), rtol=1e-4)  # policy = reference
    assert ("reference" in out["state"]) != precompute  # a frozen copy only when needed
  assert "eval_accuracy" in rows[-1]


def test_reward_objective_trains_and_exports(tmp_path):
  import subprocess
  import sys
  out, rows = run_objective(tmp_path, "reward", 16)
  train = [r for r in rows if "accuracy" in r]
  assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]])
  proc = subprocess.run([sys.executable, "-m", "trainer.export", f"--workdir={tmp_path / 'run'}",
                         f"--out={tmp_path / 'hf'}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["architectures"] == ["LlamaForSequenceClassification"]
