"""Mixture of experts (models/moe.py): routing against numpy, the three execution paths against
each other and against tests/reference.py's token-by-token experts (forward and gradients, f32),
capacity drops against a numpy simulation, the auxiliary losses against their formulas, mixed
dense/MoE layer stacks, and the metrics a training run logs."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from models import moe
from models.config import Execution, ModelConfig
from models.decoder import Context, Decoder

# odd sizes on purpose: 5 experts, width 22, d 36
SMALL = dict(vocab_size=101, d_model=36, n_layers=2, n_heads=3, n_kv_heads=1, d_ff=44,
             max_seq_len=64, rope_theta=10000.0, n_experts=5, experts_per_token=2,
             expert_d_ff=22)
TOKENS = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (3, 11), 0, 101))
PATHS = [("dense", "auto"), ("dropless", "blocks"), ("dropless", "ragged_dot"),
         ("capacity", "auto")]


def build(run=None, **overrides):
  cfg = ModelConfig(**{**SMALL, **overrides})
  model = Decoder(cfg, nnx.Rngs(0), run or Execution())
  return cfg, model, nnx.to_pure_dict(nnx.split(model)[1])


def bind(cfg, params, run):
  model = Decoder(cfg, nnx.Rngs(0), run)
  nnx.replace_by_pure_dict(state := nnx.split(model)[1], params)
  return nnx.merge(nnx.split(model)[0], state)


@pytest.mark.parametrize("order,norm", [("softmax_topk", True), ("softmax_topk", False),
                                        ("topk_softmax", True)])
def test_routing_matches_numpy(order, norm):
  cfg = ModelConfig(**{**SMALL, "router_order": order, "router_norm_topk": norm})
  logits = jax.random.normal(jax.random.PRNGKey(1), (50, cfg.n_experts)) * 3
  weights, ids, probs = moe.route(cfg, logits)
  want_w, want_ids = reference.route(logits, cfg)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(weights, want_w, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("shared", [0, 14])
def test_every_path_equals_the_token_by_token_reference(shared):
  """Logits of a 2-layer MoE decoder by each path (capacity with room for every pair) against
  tests/reference.py, which gathers each token's k experts' weights and loops nothing shared
  with models/moe.py."""
  cfg, _, params = build(shared_expert_d_ff=shared, shared_expert_gate=bool(shared))
  want = reference.forward(params, cfg, TOKENS)
  for impl, kernel in PATHS:
    run = Execution(moe_impl=impl, grouped_matmul=kernel,
                    capacity_factor=cfg.n_experts / cfg.experts_per_token)
    got = jax.jit(lambda p: bind(cfg, p, run)(TOKENS))(params)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"{impl}/{kernel}")


def test_gradients_of_every_path_equal_the_dense_reference():
  cfg, _, params = build(router_aux_loss_weight=0.01, router_z_loss_weight=0.001,
                         shared_expert_d_ff=14)

  def grads(run):
    def loss(p):
      h, aux = bind(cfg, p, run).forward(TOKENS)
      logits = bind(cfg, p, run).logits(h)
      return jnp.mean(jnp.square(logits)) + aux["moe_balance_loss"] + aux["moe_z_loss"]
    return jax.jit(jax.value_and_grad(loss))(params)

  want_loss, want = grads(Execution(moe_impl="dense"))
  for impl, kernel in PATHS[1:]:
    run = Execution(moe_impl=impl, grouped_matmul=kernel, capacity_factor=2.5)
    got_loss, got = grads(run)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(),
                                                         err_msg=f"{impl}/{kernel}"), got, want)
  # the routed experts and the router all get gradients
  layer = want["layers"]["mlp"]
  assert all(np.abs(layer[n]).max() > 0 for n in ("router", "gate", "up", "down"))


def capacity_reference(ids, n_experts, slots):
  """(T, k) bool: the pairs a capacity of `slots` drops, visiting first choices of all tokens
  in order, then second choices, ..."""
  t, k = ids.shape
  taken = np.zeros(n_experts, int)
  dropped = np.zeros((t, k), bool)
  for j in range(k):
    for i in range(t):
      e = ids[i, j]
      dropped[i, j] = taken[e] >= slots
      taken[e] += 1
  return dropped


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_drops_the_overflow_and_counts_it(factor):
  cfg, model, params = build()
  p = jax.tree.map(lambda a: a[0], params["layers"])["mlp"]
  x = jax.random.normal(jax.random.PRNGKey(2), (40, cfg.d_model))
  _, ids = reference.route(x @ p["router"], cfg)
  slots = moe.capacity_slots(40, cfg.experts_per_token, cfg.n_experts, factor)
  assert slots == math.ceil(factor * 40 * 2 / 5)
  dropped = capacity_reference(ids, cfg.n_experts, slots)
  assert dropped.any()
  weights, got_ids, _ = moe.route(cfg, x @ p["router"])
  w = moe.Experts(p["gate"], p["up"], p["down"])
  out, n_dropped = moe.capacity(x, got_ids, weights, w, jax.nn.silu, factor)
  assert int(n_dropped) == dropped.sum()
  np.testing.assert_allclose(out, reference.moe(x, p, cfg, dropped), atol=1e-5, rtol=1e-5)


def test_aux_losses_and_load_metrics_match_their_formulas():
  cfg, model, params = build(router_aux_loss_weight=0.02, router_z_loss_weight=0.003)
  run = Execution(moe_impl="capacity", capacity_factor=0.75)
  _, aux = jax.jit(lambda p: bind(cfg, p, run).forward(TOKENS))(params)
  # recompute each layer's router input with the reference's own layers
  seen = []
  reference.forward(params, cfg, TOKENS, on_mlp_input=seen.append)
  balance, z, share_max, share_min, drop = [], [], [], [], []
  k, e = cfg.experts_per_token, cfg.n_experts
  for layer, h in enumerate(seen):
    p = jax.tree.map(lambda a: a[layer], params["layers"])["mlp"]
    logits = np.asarray(h.reshape(-1, cfg.d_model) @ p["router"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    _, ids = reference.route(logits, cfg)
    counts = np.bincount(ids.reshape(-1), minlength=e)
    t = logits.shape[0]
    # Hugging Face's load_balancing_loss_func for one layer: E * sum(tokens_per_expert * P)
    balance.append(e * np.sum(counts / t * probs.mean(0)))
    lse = np.log(np.exp(logits).sum(-1))
    z.append(np.mean(lse ** 2))
    share_max.append(counts.max() / (t * k) * e)
    share_min.append(counts.min() / (t * k) * e)
    slots = moe.capacity_slots(t, k, e, 0.75)
    drop.append(capacity_reference(ids, e, slots).sum() / (t * k))
  np.testing.assert_allclose(aux["moe_balance_loss"], 0.02 * np.mean(balance), rtol=1e-5)
  np.testing.assert_allclose(aux["moe_z_loss"], 0.003 * np.mean(z), rtol=1e-4)
  np.testing.assert_allclose(aux["moe_share_max"], max(share_max), rtol=1e-6)
  np.testing.assert_allclose(aux["moe_share_min"], min(share_min), rtol=1e-6)
  np.testing.assert_allclose(aux["moe_dropped"], np.mean(drop), rtol=1e-6)
  assert aux["moe_dropped"] > 0


@pytest.mark.parametrize("layout", [dict(moe_every=2), dict(moe_first_dense=1),
                                    dict(moe_every=2, moe_first_dense=2, n_layers=5)])
def test_mixed_dense_and_moe_layers(layout):
  cfg, model, params = build(**layout)
  kinds = cfg.layer_kinds()
  assert "mlp" in kinds and "moe" in kinds
  assert params["dense_layers"]["mlp"]["gate"].shape[0] == kinds.count("mlp")
  assert params["layers"]["mlp"]["gate"].shape[0] == kinds.count("moe")
  n = sum(a.size for a in jax.tree.leaves(params))
  assert n == cfg.num_params()
  run = Execution()

  def both(p):
    m = bind(cfg, p, run)
    h, _ = m.hidden(TOKENS, ctx=Context(cache=m.init_cache(TOKENS.shape[0], 16), start=0))
    return m(TOKENS), m.logits(h)

  full, decoded = jax.jit(both)(params)
  np.testing.assert_allclose(full, reference.forward(params, cfg, TOKENS), atol=1e-5, rtol=1e-5)
  # the pass that fills a KV cache (decoding) gives the same logits
  np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=1e-5)


def test_parameter_counts_total_and_active():
  cfg = ModelConfig(**{**SMALL, "shared_expert_d_ff": 14, "shared_expert_gate": True})
  d, f, e, k = 36, 22, 5, 2
  ffn_total = d * e + e * 3 * d * f + 3 * d * 14 + d
  ffn_active = d * e + k * 3 * d * f + 3 * d * 14 + d
  assert cfg.num_params() - cfg.num_params(active=True) == 2 * (ffn_total - ffn_active)
  dense = ModelConfig(**{**SMALL, "n_experts": 0})
  assert cfg.num_params() - dense.num_params() == 2 * (ffn_total - 3 * d * 44)
  assert cfg.flops_per_token(8) == 6 * cfg.num_params(False, active=True) + \
      cfg.attention_flops_per_token(8)


def test_router_jitter_only_in_training():
  cfg, model, params = build(router_jitter=0.3)
  h = model.hidden(TOKENS)
  noisy, _ = model.forward(TOKENS, ctx=Context(router_rng=jax.random.PRNGKey(4)))
  again, _ = model.forward(TOKENS, ctx=Context(router_rng=jax.random.PRNGKey(4)))
  np.testing.assert_array_equal(noisy, again)
  assert not np.allclose(noisy, h, atol=1e-4)
  np.testing.assert_allclose(reference.forward(params, cfg, TOKENS), model.logits(h),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(experts_per_token=6), "experts_per_token=6"),
    (dict(moe_first_dense=2), "no layer is MoE"),
    (dict(router_order="sorted"), "router_order"),
])
def test_bad_moe_settings_are_one_clear_error(bad, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{**SMALL, **bad})


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_a_training_run_logs_the_router_metrics(tmp_path):
  """configs/tiny.py made MoE trains a few steps; metrics.jsonl carries the aux losses, the
  expert shares and the dropped fraction, and the balance loss is part of the logged loss."""
  import small_run  # noqa: PLC0415
  from trainer import train  # noqa: PLC0415
  workdir = tmp_path / "run"
  c = small_run.config(steps=3)
  c.model.update(n_experts=4, experts_per_token=2, router_aux_loss_weight=0.01,
                 router_z_loss_weight=0.001, moe_impl="capacity", capacity_factor=1.0)
  train.run(c, str(workdir))
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "moe_share_max" in l]
  assert train, lines
  last = train[-1]
  assert 1.0 <= last["moe_share_max"] <= 4.0 and 0.0 <= last["moe_share_min"] <= 1.0
  assert 0.0 <= last["moe_dropped"] < 1.0
  assert 0.01 * 2 * 0.9 < last["moe_balance_loss"] < 0.01 * 4  # k at balance, E * k at worst
  assert last["moe_z_loss"] > 0


# --- auxiliary-loss-free balancing: the routing bias (router_bias_update_rate) ----------------


@pytest.mark.parametrize("order,norm", [("softmax_topk", True), ("softmax_topk", False),
                                        ("topk_softmax", True)])
def test_routing_bias_picks_the_experts_but_not_their_weights(order, norm):
  cfg = ModelConfig(**{**SMALL, "router_order": order, "router_norm_topk": norm,
                       "router_bias_update_rate": 0.01})
  logits = jax.random.normal(jax.random.PRNGKey(1), (200, cfg.n_experts)) * 0.5
  bias = np.asarray([0.0, 3.0, -2.0, 1.0, 0.5], np.float32) * 0.5
  weights, ids, _ = moe.route(cfg, logits, jnp.asarray(bias))
  want_w, want_ids = reference.route(logits, cfg, bias)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(weights, want_w, rtol=1e-6, atol=1e-7)
  plain_w, plain_ids, _ = moe.route(cfg, logits)
  assert (np.asarray(ids) != np.asarray(plain_ids)).any(axis=1).mean() > 0.5  # it moved them
  counts = np.bincount(np.asarray(ids).ravel(), minlength=cfg.n_experts)
  assert counts[1] > counts[2]  # towards the raised expert, away from the lowered one
  # the weights are the unbiased ones of the chosen experts: where the choice is the same, the
  # weights are the plain routing's, bit for bit
  same = (np.sort(np.asarray(ids), 1) == np.sort(np.asarray(plain_ids), 1)).all(1)
  same &= (np.asarray(ids) == np.asarray(plain_ids)).all(1)
  assert same.any()
  np.testing.assert_array_equal(np.asarray(weights)[same], np.asarray(plain_w)[same])
  # a zero bias routes exactly as no bias
  zero_w, zero_ids, _ = moe.route(cfg, logits, jnp.zeros(cfg.n_experts))
  np.testing.assert_array_equal(zero_ids, plain_ids)
  np.testing.assert_array_equal(zero_w, plain_w)


def test_routing_bias_gets_no_gradient_and_the_weights_keep_theirs():
  cfg = ModelConfig(**{**SMALL, "router_bias_update_rate": 0.01})
  logits = jax.random.normal(jax.random.PRNGKey(2), (40, cfg.n_experts))
  bias = jnp.asarray([0.0, 0.2, -0.1, 0.0, 0.05])
  f = lambda lg, b: jnp.sum(moe.route(cfg, lg, b)[0] * jnp.arange(2.0))
  g_logits, g_bias = jax.grad(f, argnums=(0, 1))(logits, bias)
  np.testing.assert_array_equal(g_bias, 0.0)
  assert np.abs(np.asarray(g_logits)).sum() > 0


def test_bias_update_moves_each_layer_towards_its_mean_load():
  """b_e += rate * sign(mean load - load_e), per layer, in units of the rate: numpy on given
  counts (ties with the mean stay)."""
  steps = np.asarray([[0, 3, -2, 1, 0], [5, 0, 0, -1, -4]], np.int32)
  load = np.asarray([[10, 0, 5, 5, 5], [1, 2, 3, 4, 15]], np.float32)  # means 5 and 5
  got = moe.bias_update(jnp.asarray(steps), jnp.asarray(load))
  want = steps + np.sign(load.mean(-1, keepdims=True) - load).astype(np.int32)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got - steps, [[-1, 1, 0, 0, 0], [1, 1, 1, 1, -1]])


@pytest.mark.parametrize("balance", [0, 3])
def test_a_train_step_moves_the_bias_by_that_steps_loads(balance):
  """One train step of a 2-layer MoE with the routing bias: each layer's bias steps become
  sign(mean - load) of the loads of tests/reference.py's routing of the step's batch (the bias
  starts at zero); the optimizer keeps no state for it. With batch-balanced routing the step
  routes evenly, and the bias still reads the loads of the routing without the offsets."""
  import parallel  # noqa: PLC0415
  import small_run  # noqa: PLC0415
  from trainer import step as step_lib, train as train_lib  # noqa: PLC0415
  cfg = ModelConfig(**{**SMALL, "router_bias_update_rate": 0.01,
                       "router_batch_balance": balance})
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=1, sequence=1, tensor=1),
                            jax.devices()[:1])
  pl = train_lib.plan(small_run.config(), cfg, mesh)
  fn = step_lib.make_train_step(pl.spec, pl.objective, jnp.float32, 1)
  state = pl.init_state(0)
  params = jax.device_get(state["params"])
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(5), (4, 17), 0, 101))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones((4, 16), np.float32),
           "positions": np.broadcast_to(np.arange(16), (4, 16)).astype(np.int32),
           "segment_ids": np.ones((4, 16), np.int32)}
  loads = []

  def count(h):
    p = {k: np.asarray(v)[len(loads)] for k, v in params["layers"]["mlp"].items()}
    _, ids = reference.route(np.asarray(h).reshape(-1, cfg.d_model) @ p["router"], cfg)
    loads.append(np.bincount(ids.ravel(), minlength=cfg.n_experts))

  reference.forward(params, cfg, tokens[:, :-1], on_mlp_input=count)
  new, metrics = jax.jit(fn)(state, {k: jnp.asarray(v) for k, v in batch.items()})
  loads = np.asarray(loads, np.float64)
  want = np.sign(loads.mean(-1, keepdims=True) - loads)
  plain = loads / loads.sum(-1, keepdims=True) * cfg.n_experts
  assert plain.max() > 1.2  # the plain routing is uneven here ...
  if balance:  # ... and the balanced one even: 128 pairs over 5 experts, 25 or 26 each
    assert 25 / 128 * 5 <= metrics["moe_share_min"] <= metrics["moe_share_max"] <= 26 / 128 * 5
  else:
    np.testing.assert_allclose(metrics["moe_share_max"], plain.max(), rtol=1e-6)
  got = np.asarray(new["params"]["layers"]["mlp"][moe.BIAS_STEPS])
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want)
  assert np.abs(want).sum() > 0
  # no optimizer moments for it: every moment leaf has a parameter's float shape
  assert not any(x.dtype == jnp.int32 and x.shape == got.shape
                 for x in jax.tree.leaves(new["opt_state"]))


# --- batch-balanced training routing (router_batch_balance) -----------------------------------


def numpy_loads(logits, bias, k):
  """Pairs per expert when each row takes the k largest of logits + bias (numpy sorting)."""
  ids = np.argsort(-(np.asarray(logits, np.float64) + bias), axis=-1, kind="stable")[:, :k]
  return np.bincount(ids.ravel(), minlength=np.shape(logits)[-1])


@pytest.mark.parametrize("n_exp,k", [(8, 2), (5, 2), (8, 1), (6, 3)])
def test_balanced_offsets_even_out_a_skewed_batch(n_exp, k):
  """Logits shaped like a small model's early MoE inputs (moe_tiny.py): a per-expert offset
  shared by every token, a shared part that varies little, a small token-specific part. The
  plain top k piles most pairs on a few experts; with 3 rounds of offsets every expert gets
  within 3% of T k / E (counted by numpy), 8 rounds closer still; no gradient flows."""
  t = 1000
  keys = jax.random.split(jax.random.PRNGKey(n_exp * 10 + k), 3)
  logits = (jax.random.normal(keys[0], (n_exp,)) * 0.4
            + jax.random.normal(keys[1], (t, 1)) * jnp.linspace(-0.3, 0.3, n_exp)
            + jax.random.normal(keys[2], (t, n_exp)) * 0.1)
  plain = numpy_loads(logits, 0.0, k)
  even = t * k / n_exp
  assert plain.max() > 1.5 * even and plain.min() < 0.5 * even
  for rounds, tol in [(3, 0.03), (8, 0.01)]:
    offsets = np.asarray(moe.balanced_offsets(logits, k, rounds), np.float64)
    loads = numpy_loads(logits, offsets, k)
    assert loads.sum() == t * k
    np.testing.assert_allclose(loads, even, rtol=tol, atol=1, err_msg=f"{rounds} rounds")
  grad = jax.grad(lambda lg: jnp.sum(moe.balanced_offsets(lg, k, 3) * jnp.arange(n_exp)))(logits)
  np.testing.assert_array_equal(grad, 0.0)
  # nothing to balance: every expert picked, or fewer pairs than experts
  np.testing.assert_array_equal(moe.balanced_offsets(logits, n_exp, 3), 0.0)
  np.testing.assert_array_equal(moe.balanced_offsets(logits[:1], 1, 3), 0.0)


def test_batch_balanced_routing_only_in_training():
  """Training (a router key in the Context): each MoE layer picks its experts by the logits
  plus `balanced_offsets` of its batch, weighted by the plain logits: the logits equal
  tests/reference.py's with that routing; the balancing loss and the loads that move the routing
  bias (zero here) read the routing without the offsets. Without the key (evaluation,
  generation) the model is the plain one."""
  cfg, model, params = build(router_batch_balance=3, router_aux_loss_weight=0.02,
                             router_bias_update_rate=0.01)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(7), (4, 32), 0, 101))
  ctx = Context(router_rng=jax.random.PRNGKey(4))
  got, aux = jax.jit(lambda p: bind(cfg, p, Execution()).forward(tokens, ctx=ctx))(params)
  k, e = cfg.experts_per_token, cfg.n_experts

  class Balanced:
    @staticmethod
    def moe_bias(l, logits):
      return np.asarray(moe.balanced_offsets(jnp.asarray(logits, jnp.float32), k, 3))

  seen = []  # each layer's MoE input in the balanced forward
  want = reference.forward(params, cfg, tokens, hooks=Balanced(), on_mlp_input=seen.append)
  np.testing.assert_allclose(model.logits(got), want, atol=1e-5, rtol=1e-5)
  plain_want = reference.forward(params, cfg, tokens)
  assert not np.allclose(want, plain_want, atol=1e-3)  # the offsets moved some pairs
  np.testing.assert_allclose(model(tokens), plain_want, atol=1e-5, rtol=1e-5)
  shares, balance, plain = [], [], []
  for layer, h in enumerate(seen):
    p = jax.tree.map(lambda a: a[layer], params["layers"])["mlp"]
    logits = np.asarray(h.reshape(-1, cfg.d_model) @ p["router"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    offsets = Balanced.moe_bias(layer, logits)
    shares.append(numpy_loads(logits, offsets, k) / (len(logits) * k) * e)
    loads = numpy_loads(logits, 0.0, k)
    plain.extend(loads)
    balance.append(e * np.sum(loads / len(logits) * probs.mean(0)))
  np.testing.assert_allclose(aux["moe_share_max"], max(s.max() for s in shares), rtol=1e-6)
  np.testing.assert_allclose(aux["moe_share_min"], min(s.min() for s in shares), rtol=1e-6)
  assert aux["moe_share_max"] <= 54 / 256 * 5  # 256 pairs over 5 experts: 51.2 each
  assert max(plain) > 60  # where the plain routing gives some expert far more
  np.testing.assert_array_equal(aux[moe.LOAD_KEY], np.reshape(plain, (-1, e)))
  np.testing.assert_allclose(aux["moe_balance_loss"], 0.02 * np.mean(balance), rtol=1e-5)


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_a_run_with_the_routing_bias_is_deterministic_and_resumes_it(tmp_path):
  """configs/tiny.py:smoke made an 8-expert MoE with the routing bias: two fresh 6-step runs
  end bitwise equal (metrics and parameters, the bias included), and one stopped after 3 steps
  and resumed from its checkpoint ends equal to them too: the bias is saved and restored (a
  bias restarted at zero would route, and so train, differently)."""
  import small_run  # noqa: PLC0415
  from trainer import train  # noqa: PLC0415

  def run(name, stop=0):
    c = small_run.config(steps=6, log_every=1, eval_every=0, checkpoint_every=0,
                         sample_tokens=0, stop_after_steps=stop)
    c.model.update(n_experts=8, experts_per_token=2, router_aux_loss_weight=0.1,
                   router_bias_update_rate=0.01)
    out = train.run(c, str(tmp_path / name))
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    drop = ("tokens_per_sec", "mfu")
    return jax.device_get(out["state"]["params"]), [
        {k: v for k, v in json.loads(l).items() if k not in drop} for l in lines]

  a, a_lines = run("a")
  b, b_lines = run("b")
  run("c", stop=3)
  c, _ = run("c", stop=3)
  bias = np.asarray(a["layers"]["mlp"][moe.BIAS_STEPS])
  assert bias.shape == (2, 8) and np.abs(bias).max() >= 2, bias  # it moved, more than once
  assert a_lines == b_lines
  for other in (b, c):
    jax.tree.map(np.testing.assert_array_equal, a, other)


def test_hugging_face_export_leaves_the_bias_out_and_import_starts_it_at_zero(tmp_path):
  from models import hf, safetensors_io  # noqa: PLC0415
  cfg, _, params = build(family="mixtral", router_bias_update_rate=0.01)
  params["layers"]["mlp"][moe.BIAS_STEPS] = np.asarray([[1, -2, 0, 3, 0], [0, 0, 1, 1, -2]],
                                                       np.int32)
  hf.save(str(tmp_path), cfg, params)
  names = safetensors_io.SafetensorsFile(str(tmp_path / "model.safetensors")).names()
  assert not [n for n in names if "bias" in n]
  assert "bias" not in (tmp_path / "config.json").read_text()
  plain, loaded = hf.load(str(tmp_path))  # no rate: no bias leaf
  assert moe.BIAS_STEPS not in loaded["layers"]["mlp"] and not plain.router_bias_update_rate
  cfg2, loaded = hf.load(str(tmp_path), router_bias_update_rate=0.01)
  assert cfg2.router_bias_update_rate == 0.01
  got = loaded["layers"]["mlp"].pop(moe.BIAS_STEPS)
  np.testing.assert_array_equal(got, np.zeros((2, 5), np.int32))
  assert got.dtype == np.int32
  params["layers"]["mlp"].pop(moe.BIAS_STEPS)
  jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(loaded))


def test_joined_aux_keys_come_in_sorted_order():
  """The train step adds the "_loss" aux values to the loss in the order join_runs gives: that
  order is sorted, never that of a set of strings (which follows the string hash seed and made
  two runs' logged losses differ in the last bit)."""
  from models import ffn  # noqa: PLC0415
  names = ["moe_z_loss", "moe_balance_loss", "moe_share_max", "moe_load_by_layer", "moe_dropped"]
  runs = [{n: jnp.ones((2, 3)) if n.endswith(ffn.PER_LAYER) else jnp.ones(()) for n in names}]
  rest = [n for n in sorted(names) if not n.endswith(ffn.PER_LAYER)]
  assert list(ffn.join_runs(runs)) == rest + ["moe_load_by_layer"]
