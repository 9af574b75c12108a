"""The train step: gradient accumulation, mixed precision, compile-once, optimizer details."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import ModelConfig
import parallel
from models import handle as handles
from trainer import losses, optim, step as step_lib, train as train_lib

import small_run

CFG = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=32, rope_theta=10000.0)


def batch(n, t=16, seed=0):
  toks = np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (n, t + 1), 0, CFG.vocab_size))
  b = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
       "weights": np.ones((n, t), np.float32) * (np.arange(t) % 3 != 0),  # uneven: the normaliser
       "positions": np.broadcast_to(np.arange(t), (n, t)), "segment_ids": np.ones((n, t), np.int32)}
  return {k: jnp.asarray(v) for k, v in b.items()}


def fresh(compute="float32", accum=1, **train):
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                            jax.devices()[:1])
  pl = train_lib.plan(small_run.config(**train), CFG, mesh)
  fn = step_lib.make_train_step(pl.spec, pl.objective, jnp.dtype(compute), accum)
  return pl.init_state(0), fn


def test_two_microbatches_of_two_equal_one_batch_of_four():
  b = batch(4)
  s1, f1 = fresh(accum=1)
  s2, f2 = fresh(accum=2)
  out1, m1 = jax.jit(f1)(s1, b)
  out2, m2 = jax.jit(f2)(s2, b)
  np.testing.assert_allclose(m1["loss"], m2["loss"], atol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out1["params"],
               out2["params"])
  # and the accumulated loss is the token-weighted mean over the whole batch
  logits = handles.model_handle(CFG).bind(s1["params"])(b["inputs"])
  total, count = jax.jit(lambda l: losses.lm_loss(l, b["targets"], b["weights"]))(logits)
  np.testing.assert_allclose(m1["loss"], total / count, rtol=1e-6)


def test_train_step_compiles_once_over_many_steps():
  traces = []
  state, fn = fresh()

  def counted(state, b):
    traces.append(1)
    return fn(state, b)

  step = jax.jit(counted, donate_argnums=0)
  losses = []
  for i in range(6):
    state, m = step(state, batch(4, seed=i % 2))
    losses.append(float(m["loss"]))
  assert len(traces) == 1
  assert int(state["step"]) == 6
  assert losses[4] < losses[0]  # same batch (seed 0) seen again: the model learned it


def test_bf16_compute_keeps_float32_master_weights_and_tracks_f32():
  b = batch(4)
  s32, f32 = fresh("float32")
  s16, f16 = fresh("bfloat16")
  o32, m32 = jax.jit(f32)(s32, b)
  o16, m16 = jax.jit(f16)(s16, b)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(o16["params"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(o16["opt_state"])
             if hasattr(x, "dtype") and x.ndim > 0)
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
  assert float(m16["loss"]) != float(m32["loss"])  # it really ran in bf16


def test_weight_decay_skips_norms_and_biases():
  params = handles.model_handle(ModelConfig(**{**CFG.__dict__, "qkv_bias": True})).abstract_params()
  mask = optim.decay_mask(params)
  assert mask["layers"]["attn"]["q"] and mask["embed"] and mask["head"]
  assert not mask["layers"]["attn"]["q_bias"]
  assert not mask["layers"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
  tc = small_run.config(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, lr_schedule=kind).train
  s = optim.schedule(tc)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
  end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[kind]
  np.testing.assert_allclose(float(s(100)), end, rtol=1e-5)
