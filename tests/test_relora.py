"""ReLoRA (trainer/relora.py): the merge keeps the model's function, the moments are pruned by
magnitude, the schedule restarts with a warmup, and a run merges every K steps into a base
update of rank above r, trains only the adapters, and resumes bit for bit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
import small_run
from configs import base as base_config
from models import handle as handles
from models import hf
from models.config import ModelConfig
from models.peft import Peft
from trainer import optim, relora, train

CFG = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=3, d_ff=80,
                  max_seq_len=64, rope_theta=10000.0)


def section(**overrides):
  s = base_config.get_config().peft
  s.update(method="relora", rank=2, relora_every=5, relora_warmup=2, **overrides)
  return s


def test_merge_keeps_the_function_and_restarts_the_adapters():
  peft = Peft.from_config(section(), CFG)
  assert peft.method == "lora" and peft.restart_every == 5
  handle = handles.model_handle(CFG, peft)
  params = handles.init_params(handle, seed=0)
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))
  params["peft"] = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * 0.1,
                                params["peft"])  # B != 0: the adapters change the function
  tokens = np.random.default_rng(0).integers(0, 97, (2, 11))
  before = handle.bind(params)(tokens)
  after = relora.restart(peft, params, jax.random.PRNGKey(7))
  np.testing.assert_allclose(handle.bind(after)(tokens), before, atol=1e-5)
  a, b = params["peft"]["attn"]["q"]["lora_a"], params["peft"]["attn"]["q"]["lora_b"]
  w0 = params["layers"]["attn"]["q"].reshape(2, 48, -1)
  np.testing.assert_allclose(after["layers"]["attn"]["q"].reshape(2, 48, -1),
                             w0 + peft.scale * np.einsum("lir,lro->lio", a, b), atol=1e-6)
  assert not np.any(after["peft"]["attn"]["q"]["lora_b"])  # B starts at zero again
  assert np.any(after["peft"]["attn"]["q"]["lora_a"] != a)  # A drawn again


def test_moments_of_the_adapters_are_pruned_by_magnitude():
  peft = Peft.from_config(section(), CFG)
  handle = handles.model_handle(CFG, peft)
  params = handles.init_params(handle, seed=0)
  tc = base_config.get_config().train
  tx, _ = optim.make_optimizer(tc, peft.labels(params))
  grads = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(x.size).standard_normal(
      x.shape), x.dtype), params)
  _, state = tx.update(grads, tx.init(params), params)
  pruned = relora.prune_moments(state, 0.75)
  moments = {}
  jax.tree_util.tree_map_with_path(
      lambda path, x, y: moments.__setitem__(jax.tree_util.keystr(path), (x, y)), state, pruned)
  mus = {p: v for p, v in moments.items() if "'peft'" in p and ".mu" in p}
  assert mus
  for path, (mu, mu_pruned) in mus.items():
    nu, nu_pruned = moments[path.replace(".mu", ".nu")]
    kept = np.asarray(mu_pruned) != 0
    assert 0.2 <= kept.mean() <= 0.26, path  # a quarter survives: the largest |mu|
    assert np.abs(np.asarray(mu))[kept].min() >= np.abs(np.asarray(mu))[~kept].max(), path
    np.testing.assert_array_equal(np.asarray(mu_pruned)[kept], np.asarray(mu)[kept])
    # the same entries of nu: no first moment is left over a zero second moment
    np.testing.assert_array_equal(np.asarray(nu_pruned), np.where(kept, np.asarray(nu), 0))
  for path, (x, y) in moments.items():
    if "'peft'" not in path:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_jagged_schedule_restarts_with_a_warmup():
  lr = optim.jagged(lambda step: jnp.float32(1.0), every=10, warmup=4)
  got = [float(lr(jnp.int32(s))) for s in range(22)]
  assert got[:10] == [1.0] * 10  # the first stretch: the schedule as it is
  np.testing.assert_allclose(got[10:15], [0.0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(got[20:22], [0.0, 0.25])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("relora")
  hf_models.make("llama", str(root / "base"))
  hf_models.make_tokenizer("qwen2", str(root / "base"))
  return root


def run(folder, workdir, **train_overrides):
  c = small_run.config(steps=20, eval_every=0, checkpoint_every=10, sample_tokens=0,
                       log_every=1, lr=1e-2, warmup_steps=2, **train_overrides)
  c.model.init_from = f"hf:{folder / 'base'}"
  c.peft.update(method="relora", rank=2, relora_every=5, relora_warmup=2, targets="attn.q")
  return train.run(c, str(workdir))


def test_a_run_merges_into_a_high_rank_update_and_resumes_bit_for_bit(folder, tmp_path):
  out = run(folder, tmp_path / "whole")
  state = out["state"]
  assert int(state["relora"]) == 4  # after steps 5, 10, 15 and 20
  _, start = hf.load(str(folder / "base"))
  params = state["params"]
  update = np.asarray(params["layers"]["attn"]["q"]) - np.asarray(start["layers"]["attn"]["q"])
  for layer in update.reshape(update.shape[0], update.shape[1], -1):
    s = np.linalg.svd(layer, compute_uv=False)
    assert np.sum(s > 1e-3 * s[0]) > 2 * 2, s  # above 2 merges' worth of rank-2 updates
  # only the adapters (and, merged, attn.q) moved; Adam moments for the adapters alone
  np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(start["embed"]))
  np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["k"]),
                                np.asarray(start["layers"]["attn"]["k"]))
  adapters = sum(x.size for x in jax.tree.leaves(params["peft"]))
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
  assert 2 * adapters <= moments <= 2 * adapters + 16
  with open(tmp_path / "whole" / "metrics.jsonl") as f:
    lrs = {json.loads(l)["step"]: json.loads(l)["lr"] for l in f if '"lr"' in l}
  assert lrs[11] < lrs[12] < lrs[13]  # the warmup after the merge at step 10

  first = run(folder, tmp_path / "halves", stop_after_steps=10)
  assert first["step"] == 10
  second = run(folder, tmp_path / "halves", stop_after_steps=10)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               second["state"]["params"], params)
