"""Expert parallelism on 8 simulated CPU devices (parallel/experts.py): training steps equal one
device's for every expert-axis size and with fsdp and tensor beside it; the all-to-all dispatch
and its gradients equal the unsharded function; capacity drops what each device's group would;
the rules and the config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel
from models import moe
from models.config import Execution, ModelConfig
from parallel import experts as ep, rules as rules_lib
from trainer import train
from trainer.validate import UserError, check_mesh, model_config

import small_run

# 8 experts, top-2, of an odd width; ragged_dot compiles in half the time of the blocks kernel
# on CPU (the function-level tests below run the blocks kernel, the CPU default)
MOE = dict(n_experts=8, experts_per_token=2, expert_d_ff=40, router_aux_loss_weight=0.01,
           grouped_matmul="ragged_dot")
VOCAB = 512


def config(mesh, **model):
  c = small_run.config(steps=3)
  c.model.update(**{**MOE, **model})
  c.mesh.update(**mesh)
  return c


def batches(cfg, n: int):
  """Fixed random batches: the data pipeline is not what is under test."""
  rng = np.random.default_rng(0)
  b, t = cfg.train.batch_size, cfg.train.seq_len
  out = []
  for _ in range(n):
    tokens = rng.integers(0, VOCAB, (b, t + 1)).astype(np.int32)
    out.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                    weights=np.ones((b, t), np.float32),
                    positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                    segment_ids=np.ones((b, t), np.int32)))
  return out


def three_steps(cfg, devices):
  """(losses, metrics of the last step, final state) of the real train step (trainer/train.py
  `plan`) from the same initial parameters."""
  mesh = parallel.make_mesh(check_mesh(cfg, len(devices)), devices)
  pl = train.plan(cfg, model_config(cfg, VOCAB), mesh)
  state = pl.init_state(seed=0)
  losses = []
  with parallel.activate(mesh, pl.rules):
    for batch in batches(cfg, 3):
      state, metrics = pl.train_step(state, jax.device_put(batch, pl.batch_sharding))
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(metrics), state


@pytest.fixture(scope="module")
def one_device():
  return three_steps(config(dict(data=1)), jax.devices()[:1])


CASES = {
    "expert8": dict(data=1, expert=8, strategy="ep"),
    "expert2 x fsdp2 x tensor2": dict(data=1, fsdp=2, expert=2, tensor=2, strategy="fsdp_tp"),
    "expert2 x fsdp4": dict(data=1, fsdp=4, expert=2, strategy="ep"),
    "expert4 x data2": dict(data=2, expert=4, strategy="dp"),
    "expert1 x fsdp8": dict(data=1, fsdp=8, expert=1, strategy="ep"),
}
SLOW = ("expert2 x fsdp4", "expert4 x data2", "expert1 x fsdp8")  # ~25 s each on 2 cores


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in CASES])
def test_expert_parallel_trains_like_one_device(name, one_device):
  mesh = CASES[name]
  losses, metrics, state = three_steps(config(mesh), jax.devices())
  ref_losses, ref_metrics, ref_state = one_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert metrics["moe_dropped"] == ref_metrics["moe_dropped"] == 0
  # rtol 1e-5; the atol covers parameters whose gradient is a near-cancelling sum (as in
  # tests/test_parallel.py: Adam's normalisation shows reduction-order rounding there)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-6),
               state["params"], ref_state["params"])
  gate = state["params"]["layers"]["mlp"]["gate"]  # (layers, experts, embed, mlp)
  local = gate.sharding.shard_shape(gate.shape)
  assert local[1] == MOE["n_experts"] // mesh.get("expert", 1)
  assert local[3] == MOE["expert_d_ff"] // mesh.get("tensor", 1)


# --- The dispatch itself, against the unsharded function ------------------------------------

CFG = ModelConfig(vocab_size=50, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                  n_experts=8, experts_per_token=2, expert_d_ff=20)


def inputs(tokens: int = 64, seed: int = 0):
  """x (T, d), router logits (T, E) skewed towards a few experts, expert weights."""
  d, e, f = CFG.d_model, CFG.n_experts, CFG.expert_d_ff
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(ks[0], (tokens, d))
  logits = jax.random.normal(ks[1], (tokens, e)) * 2 + jnp.linspace(0, 2, e)
  w = moe.Experts(*(jax.random.normal(k, s) * 0.3 for k, s in
                    zip(ks[2:], ((e, d, f), (e, d, f), (e, f, d)))))
  return x, logits, w


def test_dropless_runs_per_device_whenever_the_mesh_splits_the_tokens():
  mesh = parallel.make_mesh(dict(data=4, fsdp=2))
  assert not ep.local_dropless(64)  # no mesh active: the plain path
  with parallel.activate(mesh, rules_lib.fsdp().activations):
    assert ep.local_dropless(64) and not ep.local_dropless(1)


def loss_and_grads(run, mesh=None, rules=None):
  def loss(x, logits, w):
    weights, ids, _ = moe.route(CFG, logits)
    y, dropped = moe.routed(CFG, run, x, ids, weights, w)
    return jnp.sum(jnp.sin(y)), (y, dropped)
  grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  if mesh is None:
    return grad(*inputs())
  with parallel.activate(mesh, rules):
    return jax.jit(grad)(*inputs())


@pytest.mark.parametrize("mesh,strategy", [
    (dict(data=1, fsdp=2, expert=2, tensor=2), "fsdp_tp"),  # experts' hidden split: psum
    (dict(data=4, fsdp=2), "fsdp"),  # no expert axis: dropless per device (local_dropless)
    pytest.param(dict(data=1, expert=8), "ep", marks=pytest.mark.slow),
])
def test_dropless_dispatch_and_gradients_equal_the_unsharded_function(mesh, strategy):
  run = Execution(grouped_matmul="blocks")
  (ref, (ref_y, _)), ref_grads = loss_and_grads(run)
  (out, (y, dropped)), grads = loss_and_grads(run, parallel.make_mesh(mesh),
                                              rules_lib.strategy(strategy).activations)
  assert int(dropped) == 0
  assert out == pytest.approx(float(ref), rel=1e-5)

  def close(a, b):  # float32 sums in another order: 1e-5 of the array's scale
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))))
  close(y, ref_y)
  for g, r in zip(grads, ref_grads):
    jax.tree.map(close, g, r)


def test_capacity_drops_per_device_group_and_counts_them_globally():
  """Each of the 8 devices (data 2 x expert 4) is a group of 8 tokens: its output is the
  unsharded capacity path on those tokens, and the count is the sum over the groups of the
  pairs past each expert's capacity, counted here with numpy."""
  factor, groups, k = 1.0, 8, CFG.experts_per_token
  run = Execution(moe_impl="capacity", capacity_factor=factor)
  x, logits, w = inputs()
  weights, ids, _ = moe.route(CFG, logits)
  mesh = parallel.make_mesh(dict(data=2, expert=4))
  with parallel.activate(mesh, rules_lib.dp().activations):
    y, dropped = jax.jit(lambda *a: moe.routed(CFG, run, *a))(x, ids, weights, w)
  per_group = ids.shape[0] // groups
  slots = int(np.ceil(factor * per_group * k / CFG.n_experts))
  counts = [np.bincount(np.asarray(g).ravel(), minlength=CFG.n_experts)
            for g in np.split(np.asarray(ids), groups)]
  expected = sum(int(np.maximum(c - slots, 0).sum()) for c in counts)
  assert expected > 0  # the skewed router overfills some experts
  assert int(dropped) == expected
  act = moe.activation(CFG.mlp_activation)
  ref = [moe.capacity(*parts, w, act, factor)[0]
         for parts in zip(*(jnp.split(a, groups) for a in (x, ids, weights)))]
  np.testing.assert_allclose(y, jnp.concatenate(ref), rtol=1e-5, atol=1e-6)


# --- Rules and config checks --------------------------------------------------------------------

def test_ep_places_experts_on_the_expert_axis_and_the_rest_like_fsdp():
  mesh = parallel.make_mesh(dict(data=1, fsdp=2, expert=4))
  s = rules_lib.strategy("ep")
  assert rules_lib.spec(("expert", "embed", "mlp"), s.params, mesh, (8, 64, 40)) == \
      jax.sharding.PartitionSpec("expert", "fsdp", None)
  assert rules_lib.spec(("embed", "mlp"), s.params, mesh, (64, 40)) == \
      jax.sharding.PartitionSpec(("fsdp", "expert"), None)
  for name in rules_lib.PRESETS:  # every preset: experts over `expert`, batch over it too
    table = rules_lib.strategy(name)
    assert table.params["expert"] == "expert" and "expert" in table.activations["batch"]
  assert ep.token_axes(mesh, 64, exclude=()) == ("fsdp", "expert")
  assert ep.token_axes(mesh, 4, exclude=()) == ("fsdp",)  # 4 tokens: not over 8 devices


@pytest.mark.parametrize("model,mesh,message", [
    (dict(n_experts=0), dict(data=2, expert=4), "model.n_experts=0"),
    (dict(n_experts=6), dict(data=2, expert=4), "6 experts"),
    (dict(n_experts=8), dict(data=4, expert=2), "mesh.data x mesh.fsdp x mesh.expert"),
    (dict(n_experts=8), dict(data=2, expert=4, rules="expert="), "expert=None"),
])
def test_expert_axis_config_errors_name_the_key(model, mesh, message):
  c = small_run.config(batch_size=4)
  c.model.update(**model)
  c.mesh.update(**mesh)
  with pytest.raises(UserError) as e:
    check_mesh(c, 8)
  text = str(e.value)
  assert "\n" not in text and message in text
  key = ("mesh.expert" if model["n_experts"] != 8 else "mesh.rules" if "rules" in mesh
         else "train.batch_size")
  assert f"config key {key}" in text


def test_expert_axis_accepted_for_an_moe_model():
  c = small_run.config(batch_size=8)
  c.model.update(n_experts=8)
  c.mesh.update(data=1, fsdp=2, expert=4)
  assert check_mesh(c, 8)["expert"] == 4


def test_batch_balanced_routing_trains_alike_on_the_expert_axis():
  """router_batch_balance solves its offsets over the whole batch, also when the tokens and
  experts are spread over 8 devices: three steps equal one device's."""
  balanced = dict(router_batch_balance=3)
  ref_losses, ref_metrics, ref_state = three_steps(config(dict(data=1), **balanced),
                                                   jax.devices()[:1])
  losses, metrics, state = three_steps(config(CASES["expert8"], **balanced), jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert metrics["moe_share_max"] == ref_metrics["moe_share_max"] < 1.1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                       atol=1e-6),
               state["params"], ref_state["params"])
