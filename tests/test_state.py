"""The train state from a spec of named models (trainer/state.py): two trainable models with
optimizers of their own and a frozen one, placed on an 8-device mesh; one step of
trainer/step.py updates both trainable ones as a plain jax.grad + optax reference does, leaves the
frozen one alone, and the state round-trips through a checkpoint."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import parallel
from models import ModelConfig
from models import handle as handles
from trainer import checkpoint as ckpt_lib, losses, state as state_lib, step as step_lib
from trainer.objectives import Bound, Objective

POLICY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                     max_seq_len=32, rope_theta=10000.0)
CRITIC = dataclasses.replace(POLICY, n_layers=1, d_ff=48, value_head=True)


class PolicyAndCritic(Objective):
  """The policy's token NLL plus the critic's squared error against the frozen reference's
  token log-probs (a stand-in for the shape of PPO's losses: three models, two of them learning)."""

  def loss(self, models, batch):
    model, hidden = models["policy"].forward(batch)
    nll = losses.token_nll(model.logits(hidden), batch["targets"])
    critic, h = models["critic"].forward(batch)
    reference, h_ref = models["reference"].forward(batch)
    target = jax.lax.stop_gradient(-losses.token_nll(reference.logits(h_ref), batch["targets"]))
    err = (critic.values(h) - target) ** 2
    w = batch["weights"]
    return jnp.sum((nll + err) * w), jnp.sum(w), {"critic_error": jnp.sum(err * w)}


def slot(name, cfg, mesh, tx=None, copy_of=None):
  handle = handles.model_handle(cfg)
  strategy = parallel.strategy("fsdp")
  shardings = handles.param_shardings(handle, mesh, strategy.params)
  return state_lib.Slot(name, handle, handles.stored_abstract(handle, jnp.float32), shardings,
                        tx=tx, schedule=None if tx is None else (lambda step: 0.01),
                        moment_shardings=shardings, grad_shardings=shardings, copy_of=copy_of)


def batch(mesh):
  toks = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (8, 17), 0, POLICY.vocab_size))
  b = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
       "weights": np.ones((8, 16), np.float32) * (np.arange(16) % 4 != 0),
       "positions": np.broadcast_to(np.arange(16), (8, 16)).astype(np.int32),
       "segment_ids": np.ones((8, 16), np.int32)}
  sharding = parallel.sharding(("batch", "length"), mesh, parallel.strategy("fsdp").activations)
  return {k: jax.device_put(v, sharding) for k, v in b.items()}


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_two_trainable_models_and_a_frozen_one_on_eight_devices(tmp_path):
  mesh = parallel.make_mesh(dict(data=2, fsdp=4, tensor=1, sequence=1, expert=1))
  policy_tx, critic_tx = optax.adamw(0.01, weight_decay=0.1), optax.sgd(0.5, momentum=0.9)
  spec = state_lib.StateSpec((slot("policy", POLICY, mesh, policy_tx),
                              slot("critic", CRITIC, mesh, critic_tx),
                              slot("reference", POLICY, mesh, copy_of="policy")), mesh)
  p0 = handles.init_params(spec.slot("policy").handle, 0, spec.slot("policy").shardings)
  c0 = handles.init_params(spec.slot("critic").handle, 1, spec.slot("critic").shardings)
  start = jax.device_get({"policy": p0, "critic": c0})
  state = spec.init({"policy": p0, "critic": c0}, seed=0)

  # the layout: the first model at the top level, the others by name; each where the spec says
  assert set(state) == {"step", "rng", "guard", "params", "opt_state", "critic", "reference"}
  assert set(state["critic"]) == {"params", "opt_state"}
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest_fail(x, s),
               state, spec.shardings())
  embed = state["params"]["embed"]
  assert len(embed.addressable_shards) == 8 and embed.addressable_shards[0].data.shape[0] < 64 \
      or embed.addressable_shards[0].data.shape[1] < 32  # split over the mesh, not replicated

  b = batch(mesh)
  step = jax.jit(step_lib.make_train_step(spec, PolicyAndCritic(), jnp.float32, 1),
                 in_shardings=(spec.shardings(), None), out_shardings=(spec.shardings(), None),
                 donate_argnums=0)
  with parallel.activate(mesh, parallel.strategy("fsdp").activations):
    new, metrics = step(state, b)

  # the reference: plain jax.grad of the same loss over the two trainable models, each optimizer
  # applied by hand
  host = jax.device_get(b)
  hp, hc = spec.slot("policy").handle, spec.slot("critic").handle

  def plain_loss(trainable):
    models = {"policy": Bound(hp, trainable["policy"], jnp.float32),
              "critic": Bound(hc, trainable["critic"], jnp.float32),
              "reference": Bound(hp, start["policy"], jnp.float32)}
    total, count, _ = PolicyAndCritic().loss(models, host)
    return total / count

  loss, grads = jax.value_and_grad(plain_loss)(start)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  for name, tx, got in (("policy", policy_tx, new["params"]),
                        ("critic", critic_tx, new["critic"]["params"])):
    updates, _ = tx.update(grads[name], tx.init(start[name]), start[name])
    want = optax.apply_updates(start[name], updates)
    # (atol: Adam's first step divides each gradient by its own size, so the reduction order of
    # a near-zero gradient shows at ~3e-6 of a 0.01 step)
    jax.tree.map(lambda a, w: np.testing.assert_allclose(np.asarray(a), w, rtol=1e-4, atol=1e-5),
                 got, want)
    assert not np.array_equal(np.asarray(got["embed"]), start[name]["embed"])  # it learned
  np.testing.assert_allclose(float(metrics["grad_norm_critic"]),
                             float(optax.tree.norm(grads["critic"])), rtol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new["reference"]), start["policy"])
  assert int(new["step"]) == 1 and "critic_error" in metrics

  # a checkpoint holds exactly the spec's tree, and gives it back where the spec places it
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
  checkpointer.save(1, new, {"position": 1})
  restored_step, restored, data = checkpointer.restore_latest(spec.abstract(), print)
  checkpointer.close()
  assert restored_step == 1 and data == {"position": 1}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored, new)
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest_fail(x, s),
               restored, spec.shardings())


def pytest_fail(x, s):
  raise AssertionError(f"{x.shape} placed {x.sharding}, the spec says {s}")
