"""Distillation (trainer/objectives/distill.py): the loss against the divergences written out in
numpy on each model's own logits, off-policy training that moves the student toward a frozen
teacher, a Hugging Face folder as teacher, on-policy rows of the student's samples, refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import small_run
from models import hf
from models.handle import cast_floating
from trainer import export, train
from trainer.errors import UserError
from trainer.objectives import Bound

CHATS = "data/arith_chat/train.jsonl"
EVAL = "data/arith_chat/eval.jsonl"


def chat_config(steps, objective="sft", **train_kw):
  c = small_run.config(steps=steps, log_every=1, eval_every=0, checkpoint_every=0,
                       sample_tokens=0, batch_size=2, seq_len=128, eval_batches=1, **train_kw)
  c.train.objective = objective
  c.model.max_seq_len = 128
  c.data.update(source="files", format="chat", template="chatml", train_files=CHATS,
                eval_files=EVAL, tokenizer_vocab_size=400)
  c.mesh.data = 1
  return c


def config(teacher, steps=2, **distill):
  c = chat_config(steps, "distill")
  c.data.tokenizer = f"{teacher}/tokenizer.model"
  c.distill.update(teacher=str(teacher), **distill)
  c.rl.update(group_size=2, max_new_tokens=6)
  return c


def run(c, workdir):
  return train.run(c, str(workdir), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A teacher's run folder: 30 SFT steps on the chats, at a high rate to be far from a fresh
  model."""
  workdir = tmp_path_factory.mktemp("teacher")
  run(chat_config(30, lr=3e-3), workdir)
  return workdir


def logits_alone(b: Bound, batch):
  model = b.handle.bind(cast_floating(b.params, b.compute_dtype))
  return np.asarray(model(batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)


def divergence(s_logits, t_logits, beta, temperature):
  """The generalized JSD per token, in float64 numpy: the KLs written out."""
  def log_softmax(x):
    x = x / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  s, t = log_softmax(s_logits), log_softmax(t_logits)
  kl = lambda p, q: (np.exp(p) * (p - q)).sum(-1)
  if beta == 0:
    return kl(t, s)
  if beta == 1:
    return kl(s, t)
  m = np.log(beta * np.exp(t) + (1 - beta) * np.exp(s))
  return beta * kl(t, m) + (1 - beta) * kl(s, m)


@pytest.mark.parametrize("loss,beta,temperature", [("forward_kl", 0.0, 1.0),
                                                    ("reverse_kl", 1.0, 2.0),
                                                    ("jsd", 0.3, 1.0)])
def test_loss_equals_the_divergence_of_each_model_alone(teacher, tmp_path, loss, beta,
                                                        temperature):
  c = config(teacher, steps=1, loss=loss, beta=0.3, temperature=temperature)
  out = run(c, tmp_path)
  pl, state = out["plan"], out["state"]
  models = {s.name: Bound(s.handle, pl.spec.params(state, s.name), pl.compute_dtype)
            for s in pl.spec.slots}
  assert set(models) == {"policy", "teacher"}
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 400, (2, 24)).astype(np.int32)
  batch = {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
           "positions": jnp.tile(jnp.arange(24), (2, 1)),
           "segment_ids": jnp.ones((2, 24), jnp.int32),
           "weights": jnp.asarray((rng.random((2, 24)) > 0.3).astype(np.float32))}
  loss_sum, count, aux = pl.objective.loss(models, batch)
  per_token = divergence(logits_alone(models["policy"], batch),
                         logits_alone(models["teacher"], batch), beta, temperature)
  w = np.asarray(batch["weights"])
  np.testing.assert_allclose(float(loss_sum / count), (per_token * w).sum() / w.sum(), rtol=1e-5)
  assert float(count) == w.sum() and "student_nll" in aux


def test_training_moves_the_student_toward_a_frozen_teacher(teacher, tmp_path):
  c = config(teacher, steps=12, loss="forward_kl")
  c.train.update(lr=3e-3, eval_every=0)
  out = run(c, tmp_path)
  import json
  losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")
            if "loss" in json.loads(line)]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
  _, _, teacher_params, _ = export.load_run(str(teacher))
  for a, b in zip(jax.tree.leaves(out["state"]["teacher"]), jax.tree.leaves(teacher_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_hugging_face_folder_teaches(teacher, tmp_path):
  _, handle, params, _ = export.load_run(str(teacher))
  folder = tmp_path / "hf"
  hf.save(str(folder), handle.cfg, params)
  (folder / "tokenizer.model").write_bytes((teacher / "tokenizer.model").read_bytes())
  c = config(teacher, steps=1)
  c.distill.teacher = f"hf:{folder}"
  out = run(c, tmp_path / "run")
  for a, b in zip(jax.tree.leaves(out["state"]["teacher"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_on_policy_rows_are_the_students_samples(teacher, tmp_path):
  c = config(teacher, steps=1, on_policy=True, loss="reverse_kl")
  out = run(c, tmp_path)
  pl, state = out["plan"], out["state"]
  g = pl.objective
  models = {s.name: Bound(s.handle, pl.spec.params(state, s.name), pl.compute_dtype)
            for s in pl.spec.slots}
  host, metrics = g.rollout(models, 2, pl.compute_dtype)
  assert set(metrics) >= {"accuracy", "response_length"}
  batch = {k: jnp.asarray(v) for k, v in host.items()}
  loss_sum, count, _ = g.loss(models, batch)
  b, k, L = host["gather"].shape
  chosen, total, n_all = g.stream(2), 0.0, 0
  for r in range(b):
    for i in range(k):
      n = int(host["gather_mask"][r, i].sum())
      completion = host["targets"][r, host["gather"][r, i, :n]]
      prompt = g.state["ids"][chosen[(r * k + i) // g.group]]
      seq = np.concatenate([prompt, completion]).astype(np.int32)
      alone = {"inputs": jnp.asarray(seq)[None], "positions": jnp.arange(len(seq))[None],
               "segment_ids": jnp.ones((1, len(seq)), jnp.int32)}
      at = np.arange(len(prompt) - 1, len(prompt) - 1 + n)
      s_lp = np.asarray(jax.nn.log_softmax(logits_alone(models["policy"], alone)[0][at]))
      np.testing.assert_allclose(s_lp[np.arange(n), completion], host["old_logps"][r, i, :n],
                                 rtol=1e-5, atol=1e-5)  # sampled by the student
      per = divergence(logits_alone(models["policy"], alone)[0][at],
                       logits_alone(models["teacher"], alone)[0][at], 1.0, 1.0)
      total, n_all = total + per.sum(), n_all + n
  np.testing.assert_allclose(float(loss_sum / count), total / n_all, rtol=1e-5)


def test_bad_distill_settings_are_one_line(teacher, tmp_path):
  cases = [({"teacher": ""}, "distill.teacher"), ({"teacher": str(tmp_path)}, "distill.teacher"),
           ({"loss": "kl"}, "distill.loss"), ({"beta": 2.0}, "distill.beta"),
           ({"temperature": 0.0}, "distill.temperature")]
  for i, (d, key) in enumerate(cases):
    c = config(teacher)
    c.distill.update(**d)
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as e:
      run(c, tmp_path / str(i))
    assert "\n" not in str(e.value)
  c = config(teacher)
  c.data.tokenizer = ""  # the student trains its own, smaller tokenizer
  c.data.tokenizer_vocab_size = 350
  with pytest.raises(UserError, match="distill.teacher.*vocabulary"):
    run(c, tmp_path / "vocab")
