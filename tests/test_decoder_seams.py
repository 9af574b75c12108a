"""The decoder's seams: an FFN registered in models/ffn.py that returns aux values has them
reduced over the layers (summed; `_max` keys by max) and handed out of the layer scan by
`forward`, checked against the plain-jnp reference; the dense MLP gives none; `hidden` is
unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from configs import base as base_config
from models import Context, Decoder, ModelConfig, ffn, layers
from models.config import Execution
from models.handle import model_handle
from models.peft import Peft

SMALL = dict(vocab_size=97, d_model=48, n_layers=3, n_heads=6, n_kv_heads=3, d_ff=80,
             max_seq_len=64, rope_theta=10000.0)


class ToyFFN(layers.MLP):
  """The dense MLP, plus two aux values of its input: a weighted loss and a metric."""

  def __call__(self, x_btd, deltas=None):
    x = x_btd.astype(jnp.float32)
    return super().__call__(x_btd, deltas), {"toy_loss": 0.01 * jnp.sum(x * x),
                                             "toy_max": jnp.max(x)}


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setitem(ffn.FFNS, "mlp", ToyFFN)


def build(**overrides):
  cfg = ModelConfig(**{**SMALL, **overrides})
  params = nnx.to_pure_dict(nnx.split(Decoder(cfg, nnx.Rngs(0)))[1])
  return cfg, params


def reference_aux(params, cfg, tok):
  """(logits, aux) of tests/reference.py with the toy's sums taken on each layer's MLP input."""
  seen = []
  logits = reference.forward(params, cfg, tok, on_mlp_input=seen.append)
  aux = {"toy_loss": sum(0.01 * jnp.sum(h * h) for h in seen),
         "toy_max": jnp.max(jnp.stack([jnp.max(h) for h in seen]))}
  return logits, aux


TOKENS = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, 13), 0, 97))


@pytest.mark.parametrize("remat", ["none", "dots_no_batch"])
def test_a_registered_ffn_hands_its_aux_out_reduced_over_layers(toy, remat):
  cfg, params = build()
  handle = model_handle(cfg, run=Execution(remat=remat))
  model = handle.bind(params)
  assert isinstance(model.layers.mlp, ToyFFN)
  h, aux = model.forward(TOKENS)
  want_logits, want = reference_aux(params, cfg, TOKENS)
  assert sorted(aux) == ["toy_loss", "toy_max"]
  assert all(v.dtype == jnp.float32 and v.shape == () for v in aux.values())
  np.testing.assert_allclose(model.logits(h), want_logits, atol=1e-5, rtol=1e-5)
  for k in want:
    np.testing.assert_allclose(aux[k], want[k], rtol=1e-5)
  np.testing.assert_array_equal(model.hidden(TOKENS), h)  # hidden: the same, without aux

  # the aux loss is differentiable through the (rematerialised) scan
  ours = lambda p: handle.bind(p).forward(TOKENS)[1]["toy_loss"]
  plain = lambda p: reference_aux(p, cfg, TOKENS)[1]["toy_loss"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.grad(ours)(params), jax.grad(plain)(params))


def test_the_dense_mlp_has_no_aux_and_forward_needs_no_cache():
  cfg, params = build()
  model = model_handle(cfg).bind(params)
  h, aux = model.forward(TOKENS)
  assert aux == {}
  np.testing.assert_array_equal(h, model.hidden(TOKENS, ctx=Context()))
  with pytest.raises(ValueError, match="without a KV cache"):
    model.forward(TOKENS, ctx=Context(cache=model.init_cache(2, 16)))


def test_peft_model_forward_gives_the_aux_of_the_merged_weights(toy):
  """LoRA, adapters folded layer by layer in the scan: the toy's sums equal those of the plain
  model with the adapters merged into its weights."""
  cfg, params = build()
  section = base_config.get_config().peft
  section.update(method="lora", rank=4)
  peft = Peft.from_config(section, cfg)
  handle = model_handle(cfg, peft)
  key = jax.random.PRNGKey(3)
  adapted = handle.peft.init(params, key)
  adapted = {**adapted[0], "peft": jax.tree.map(lambda x: x + 0.05, adapted[1])}
  h, aux = handle.bind(adapted).forward(TOKENS)
  want_h, want = model_handle(cfg).bind(peft.merge(adapted)).forward(TOKENS)
  assert sorted(aux) == ["toy_loss", "toy_max"]
  np.testing.assert_allclose(h, want_h, atol=1e-5, rtol=1e-5)
  for k in want:
    np.testing.assert_allclose(aux[k], want[k], rtol=1e-5)
  assert abs(float(aux["toy_loss"]) - float(
      model_handle(cfg).bind(params).forward(TOKENS)[1]["toy_loss"])) > 1e-6  # adapters count


def test_aux_reaches_the_loss_and_metrics_jsonl(toy, tmp_path):
  """Through the trainer: the train step's loss is the objective's plus the `_loss` aux, the
  aux values are logged in metrics.jsonl as themselves, and the eval loss leaves the aux out."""
  import json

  import small_run
  from trainer import losses, step as step_lib, train

  cfg, params = build()
  handle = model_handle(cfg)
  batch = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:],
           "weights": np.ones((2, 12), np.float32),
           "positions": np.broadcast_to(np.arange(12), (2, 12)).astype(np.int32),
           "segment_ids": np.ones((2, 12), np.int32)}
  logits, want = reference_aux(params, cfg, batch["inputs"])
  nll = float(jnp.mean(losses.token_nll(logits, batch["targets"])))
  loss_fn = step_lib.make_loss_fn(handle, jnp.float32)
  total, count, aux = loss_fn(params, batch, jax.random.PRNGKey(0))  # a training step's loss
  np.testing.assert_allclose(float(total / count), nll + float(want["toy_loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(aux["toy_max"] / count), float(want["toy_max"]), rtol=1e-5)
  total, count, _ = loss_fn(params, batch)  # eval: the objective's loss alone
  np.testing.assert_allclose(float(total / count), nll, rtol=1e-5)

  c = small_run.config(steps=2, log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0)
  train.run(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f if '"toy_loss"' in line]
  assert [m["step"] for m in logged] == [1, 2]
  assert all(m["toy_loss"] > 0 and np.isfinite(m["toy_max"]) for m in logged)
