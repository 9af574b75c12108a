"""bfloat16 / float16 matmuls (models/kernels/matmul.py, models/layers.low_precision_matmul):
the values and gradients against numpy float32 products of the same rounded operands, float32
untouched, and the remat policies keeping the projections they name; each test with the
library forms and with the plain products."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from models import Decoder, ModelConfig, layers
from models.config import Execution
from models.decoder import REMAT_POLICIES
from models.handle import cast_floating, model_handle
from models.kernels import matmul as matmul_lib
from models.kernels.matmul import mm, mm_nt, mm_tn
from trainer.objectives.base import Bound

LOW = [jnp.bfloat16, jnp.float16]


@pytest.fixture(autouse=True, params=[True, False], ids=["forms", "plain"])
def forms(request, monkeypatch):
  """Every test twice: with the library forms (hosts with bf16 instructions) and with the plain
  products (other hosts, accelerators), whatever this host is."""
  monkeypatch.setattr(matmul_lib, "FORMS", request.param)
  return request.param


def test_the_forms_are_used_on_hosts_with_bf16_instructions(monkeypatch):
  from benchmarks.host import host_info
  monkeypatch.setattr(matmul_lib, "FORMS", None)
  monkeypatch.delenv(matmul_lib.ENV, raising=False)
  isa = host_info()["isa"]
  assert matmul_lib.library_forms() == (jax.default_backend() == "cpu" and
                                        bool(isa.get("amx_bf16") or isa.get("avx512_bf16")))


def test_the_environment_turns_the_forms_on_or_off(monkeypatch):
  monkeypatch.setattr(matmul_lib, "FORMS", None)
  for value, expected in [("1", True), ("0", False)]:
    monkeypatch.setenv(matmul_lib.ENV, value)
    assert matmul_lib.library_forms() is expected


def _rand(shape, dtype, seed):
  """Random values already representable in `dtype`, as (jax array, float32 numpy copy)."""
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  x = jnp.asarray(x, dtype)
  return x, np.asarray(x.astype(jnp.float32))


def _rounded(x, dtype):
  """float32 numpy x rounded to `dtype` and back (the reference's output rounding)."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16 if dtype == jnp.bfloat16
                                          else np.float16).astype(np.float32)


def _close_to_rounded(got, want_f32, dtype):
  """`got` (in `dtype`) is the float32 product rounded to `dtype`, give or take one unit in the
  last place (the library's summation order differs from numpy's)."""
  ulp = 2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -10
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), _rounded(want_f32, dtype),
                             rtol=2 * ulp, atol=1e-3)


@pytest.mark.parametrize("dtype", LOW)
def test_the_three_forms_are_float32_products_rounded_once(dtype):
  a, a32 = _rand((64, 48), dtype, 0)
  b, b32 = _rand((48, 40), dtype, 1)
  c, c32 = _rand((64, 40), dtype, 2)
  for got, want in ((mm(a, b), a32 @ b32), (mm_nt(c, b), c32 @ b32.T), (mm_tn(a, c), a32.T @ c32)):
    assert got.dtype == dtype
    _close_to_rounded(got, want, dtype)
  # A float32 result is not rounded at all.
  wide = mm_tn(a, c, jnp.float32)
  assert wide.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(wide), a32.T @ c32, rtol=1e-5, atol=1e-5)


def test_float32_forms_are_the_plain_products():
  a, _ = _rand((32, 16), jnp.float32, 0)
  b, _ = _rand((16, 24), jnp.float32, 1)
  c, _ = _rand((32, 24), jnp.float32, 2)
  np.testing.assert_array_equal(mm(a, b), a @ b)
  np.testing.assert_array_equal(mm_nt(c, b), c @ b.T)
  np.testing.assert_array_equal(mm_tn(a, c), a.T @ c)
  np.testing.assert_array_equal(layers.matmul(a, b), a @ b)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_matmul_value_and_gradients(dtype):
  """dense in bf16 / f16: the forward is x @ w rounded once; the backward rounds dy to the
  operands' dtype and gives dx = dy w^T and dw = x^T dy, each rounded once."""
  x, x32 = _rand((2, 24, 48), dtype, 0)
  w, w32 = _rand((48, 40), dtype, 1)
  c, _ = _rand((2, 24, 40), jnp.float32, 2)
  y, grads = jax.value_and_grad(
      lambda x, w: jnp.sum(layers.dense(x, w).astype(jnp.float32) * c), (0, 1))(x, w)
  dy = _rounded(np.asarray(c), dtype).reshape(48, 40)
  want_y = _rounded(x32.reshape(48, 48) @ w32, dtype)
  np.testing.assert_allclose(float(y), float(np.sum(want_y * np.asarray(c).reshape(48, 40))),
                             rtol=1e-3)
  dx, dw = grads
  assert dx.dtype == dtype and dw.dtype == dtype
  _close_to_rounded(dx.reshape(48, 48), dy @ w32.T, dtype)
  _close_to_rounded(dw, x32.reshape(48, 48).T @ dy, dtype)


def test_low_precision_logits_come_out_float32():
  x, x32 = _rand((8, 32), jnp.bfloat16, 0)
  w, w32 = _rand((32, 16), jnp.bfloat16, 1)
  y = layers.dense(x, w, out_dtype=jnp.float32)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), x32 @ w32, rtol=1e-5, atol=1e-5)


def _dots_in_gradient(policy):
  x, _ = _rand((16, 32), jnp.bfloat16, 0)
  w1, _ = _rand((32, 32), jnp.bfloat16, 1)
  w2, _ = _rand((32, 8), jnp.bfloat16, 2)
  body = jax.checkpoint(lambda x, w1, w2: layers.dense(jnp.sin(layers.dense(x, w1)), w2),
                        policy=policy, prevent_cse=False)
  loss = lambda x, w1, w2: jnp.sum(body(x, w1, w2).astype(jnp.float32))
  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(x, w1, w2)
  return str(jaxpr).count("dot_general")


def test_dots_policies_keep_the_low_precision_projections():
  """Two matmuls: 2 forward + 4 backward products when the first's output is kept; the policy
  that keeps nothing reruns the first (7: the backward needs it for sin's derivative). Without
  the PROJECTION name the dots policies would see no matmul in the custom VJP and rerun it too."""
  assert _dots_in_gradient(REMAT_POLICIES["full"]) == 7
  for name in ("dots", "dots_no_batch"):
    assert _dots_in_gradient(REMAT_POLICIES[name]) == 6, name


@pytest.mark.parametrize("dtype", LOW)
def test_low_rank_dense_in_low_precision(dtype):
  """LoRA's folded matmul in bf16 / f16 against the float32 reference of the same rounded
  operands, value and gradients, within the dtype's rounding."""
  x, _ = _rand((40, 32), dtype, 0)
  w, _ = _rand((32, 24), dtype, 1)
  a, _ = _rand((32, 4), dtype, 2)
  b, _ = _rand((4, 24), dtype, 3)
  c, _ = _rand((40, 24), jnp.float32, 4)
  ours = lambda *p: jnp.sum(layers.low_rank_dense(*p, 0.5).astype(jnp.float32) * c)
  plain = lambda x, w, a, b: jnp.sum((x @ (w + 0.5 * a @ b)) * c)
  f32 = [p.astype(jnp.float32) for p in (x, w, a, b)]
  np.testing.assert_allclose(float(ours(x, w, a, b)), float(plain(*f32)), rtol=2e-2)
  for got, want in zip(jax.grad(ours, (0, 1, 2, 3))(x, w, a, b), jax.grad(plain, (0, 1, 2, 3))(*f32)):
    assert got.dtype == dtype
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want),
                               atol=0.03 * scale)


def test_attention_on_bf16_inputs_gives_bf16_equal_to_float32_attention():
  """The xla attention upcasts bf16 q, k, v on CPU: its output is the float32 attention of the
  same values, rounded once to bf16 (the dtype of q)."""
  q, q32 = _rand((2, 16, 4, 8), jnp.bfloat16, 0)
  k, k32 = _rand((2, 16, 2, 8), jnp.bfloat16, 1)
  v, v32 = _rand((2, 16, 2, 8), jnp.bfloat16, 2)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  seg = jnp.ones((2, 16), jnp.int32)
  mask = layers.attention_mask(pos, seg, pos, seg)
  got = layers.dot_product_attention(q, k, v, mask)
  assert got.dtype == jnp.bfloat16
  want = layers.dot_product_attention(*(jnp.asarray(a) for a in (q32, k32, v32)), mask)
  _close_to_rounded(got, np.asarray(want), jnp.bfloat16)


@pytest.mark.parametrize("n_experts", [0, 4])
def test_the_layer_stack_cast_inside_its_scan_equals_a_cast_before_it(n_experts):
  """`Bound` (trainer/objectives/base.py) keeps a plain model's layer stack in float32 and
  casts each layer inside the scan (Context.layer_dtype): the loss and the float32 gradients
  are those of the whole model cast to bfloat16 first, and the scan really takes float32
  weights, so no pass converts the stacked weight gradients after it."""
  moe = dict(n_experts=n_experts, experts_per_token=2, expert_d_ff=24) if n_experts else {}
  cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_seq_len=16, **moe)
  run = Execution(remat="dots_no_batch")
  params = nnx.to_pure_dict(nnx.split(Decoder(cfg, nnx.Rngs(0), run))[1])
  handle = model_handle(cfg, run=run)
  tok = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 97))
  batch = {"inputs": tok, "positions": np.broadcast_to(np.arange(16), (2, 16)),
           "segment_ids": np.ones_like(tok)}
  weights = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 97))

  def ours(p):
    model, hidden = Bound(handle, p, jnp.bfloat16).forward(batch)
    return jnp.sum(model.logits(hidden) * weights)

  def cast_first(p):
    model = handle.bind(cast_floating(p, jnp.bfloat16))
    hidden, _ = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"])
    return jnp.sum(model.logits(hidden) * weights)

  (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f))(params) for f in (ours, cast_first))
  assert float(a) == float(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), ga, gb)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(ga))

  def scanned_weight_dtypes(f):
    """dtypes of the stacked (n_layers, ...) arrays the forward's scans take."""
    eqns = [e for e in jax.make_jaxpr(f)(params).jaxpr.eqns if e.primitive.name == "scan"]
    return {v.aval.dtype for e in eqns for v in e.invars
            if len(v.aval.shape) >= 2 and v.aval.shape[0] == cfg.n_layers}
  assert scanned_weight_dtypes(ours) == {jnp.dtype(jnp.float32)}
  assert jnp.dtype(jnp.bfloat16) in scanned_weight_dtypes(cast_first)
