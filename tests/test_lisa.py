"""LISA is a view inside the one train step (trainer/lisa.py, trainer/step.py), so it works with
what that step does: the DPO and reward objectives with their aux metrics, and float16 loss
scaling with the non-finite guard. Each was refused before LISA joined the step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel
import small_run
from test_preference import pair_rows
from trainer import train
from trainer.validate import check_config, model_config


def plan(objective="lm", compute="float32"):
  c = small_run.config(lr=1e-2, warmup_steps=0)
  c.peft.update(method="lisa", lisa_activated_layers=1, lisa_step_interval=100)
  c.train.objective = objective
  c.precision.compute_dtype = compute
  c.precision.loss_scale = 8.0  # (one that does not overflow this model's float16 gradients)
  if objective in ("dpo", "reward"):
    c.data.format = "preference"
  c.model.value_head = objective == "reward"
  check_config(c)  # no refusal
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=1, expert=1),
                            jax.devices()[:1])
  return train.plan(c, model_config(c, 64), mesh)


def lm_batch():
  toks = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (8, 33), 0, 64))
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((8, 32), np.float32),
          "positions": np.broadcast_to(np.arange(32), (8, 32)).astype(np.int32),
          "segment_ids": np.ones((8, 32), np.int32)}


def changed_layers(before, after):
  q0, q1 = np.asarray(before["layers"]["attn"]["q"]), np.asarray(after["layers"]["attn"]["q"])
  return [i for i in range(q0.shape[0]) if not np.array_equal(q0[i], q1[i])]


def step(pl, state, batch):
  with parallel.activate(pl.mesh, pl.rules):
    return pl.train_step(state, train.to_global(batch, pl.batch_sharding))


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_lisa_trains_preference_objectives_with_their_aux_metrics(objective):
  pl = plan(objective)
  state = pl.init_state(0)
  start = jax.device_get(state)
  batch = {k: np.repeat(v, 8, axis=0) for k, v in pair_rows(32).items()}
  new, metrics = step(pl, state, batch)
  assert {"accuracy", "margin", "rewards_chosen", "rewards_rejected"} <= set(metrics)
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0
  if objective == "dpo":  # the reference is the starting policy: log 2 at the first step
    np.testing.assert_allclose(float(metrics["loss"]), np.log(2.0), rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new["reference"]), start["params"])
  else:  # the score head sits outside the layers: it trains at every step
    assert not np.array_equal(np.asarray(new["params"]["score"]), start["params"]["score"])
  assert changed_layers(start["params"], jax.device_get(new["params"])) == \
      np.asarray(new["lisa_layers"]).tolist()


def test_lisa_with_float16_scales_the_loss_and_skips_an_overflow():
  pl = plan(compute="float16")
  state = pl.init_state(0)
  assert float(state["guard"]["scale"]) == pl.spec.loss_scale
  start = jax.device_get(state)
  new, metrics = step(pl, state, lm_batch())
  assert int(metrics["skipped"]) == 0 and float(metrics["loss_scale"]) == pl.spec.loss_scale
  assert changed_layers(start["params"], jax.device_get(new["params"])) == \
      np.asarray(new["lisa_layers"]).tolist()
  # a scale that overflows float16's gradients: the step changes nothing and halves the scale
  before = jax.device_get(new)
  new["guard"]["scale"] = jnp.asarray(1e30, jnp.float32)
  after, metrics = step(pl, new, lm_batch())
  assert int(metrics["skipped"]) == 1
  np.testing.assert_allclose(float(after["guard"]["scale"]), 5e29, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after["params"]), before["params"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after["opt_state"]),
               before["opt_state"])
