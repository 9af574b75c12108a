"""The Pallas FlashMask kernel (interpreted on CPU) against dense plain-jnp attention: outputs, lse
and gradients dq, dk, dv, over mask kinds, GQA ratios, odd lengths and head sizes, bf16."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.kernels import flashmask as fm
from models.kernels.flash_attention import flash_attention


def dense_attention(q, k, v, allowed, softcap=0.0, alibi=None):
  """Plain jnp: K/V repeated per query head, the (b, t, s) boolean mask applied to the scores,
  `alibi` (slopes, query positions, key positions) subtracting slope x distance.
  A row that sees no key gives 0 and lse -inf."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  if softcap:
    s = softcap * jnp.tanh(s / softcap)
  if alibi is not None:
    slopes, q_pos, k_pos = (np.asarray(a, np.float32) for a in alibi)
    s = s - slopes[None, :, None, None] * (q_pos[:, None, :, None] - k_pos[:, None, None, :])
  allowed = jnp.asarray(allowed)[:, None]
  m = jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(allowed, jnp.exp(s - m), 0.0)
  l = p.sum(-1, keepdims=True)
  seen = l > 0
  out = jnp.einsum("bhts,bshd->bthd", p / jnp.where(seen, l, 1.0), v)
  lse = jnp.where(seen, jnp.log(jnp.where(seen, l, 1.0)) + m, -jnp.inf)[..., 0]
  return out, lse.transpose(0, 2, 1)


def random_vectors(rng, b, n):
  a = np.sort(rng.integers(0, n + 1, (2, b, n)), axis=0)
  c = np.sort(rng.integers(0, n + 1, (2, b, n)), axis=0)
  return fm.from_vectors(a[0], a[1], c[0], c[1])


def random_segments(rng, b, n):
  """Packed rows: documents of random lengths, then a padding tail of id 0."""
  seg = np.zeros((b, n), np.int32)
  for r in range(b):
    at, k = 0, 1
    while at < n - int(rng.integers(0, 6)):
      length = int(rng.integers(1, n // 2))
      seg[r, at:at + length] = k
      at, k = at + length, k + 1
  return seg


def make_mask(kind, rng, b, n):
  if kind == "full":
    return fm.full(b, n)
  if kind == "causal":
    return fm.causal(b, n)
  if kind == "document":
    return fm.document(random_segments(rng, b, n))
  if kind == "bidirectional_document":
    return fm.document(random_segments(rng, b, n), is_causal=False)
  if kind == "shared_prompt":
    return fm.shared_prompt(n // 4, [n // 3, n // 5, 3], n, batch=b)
  if kind == "prefix_lm":
    return fm.prefix_lm(rng.integers(0, n, b), n)
  if kind == "sliding_window":
    return fm.sliding_window(b, n, 7)
  if kind == "random":
    return random_vectors(rng, b, n)
  raise ValueError(kind)


def compare(q, k, v, mask, atol, softcap=0.0, block_q=16, block_k=16, seed=0, d_scale=1.0,
            out_dtype=None, alibi=None):
  """Outputs, lse and the gradients of a random linear function of both (cotangents normal
  times d_scale: bf16 tests keep gradients near 1, where 2e-2 is a few bf16 steps)."""
  rng = np.random.default_rng(seed)
  allowed = np.asarray((mask or fm.full(q.shape[0], k.shape[1])).dense(q.shape[1]))
  d_out = d_scale * jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  d_lse = d_scale * jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)

  def loss(attend):
    def f(q, k, v):
      out, lse = attend(q, k, v)
      finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that see no key: -inf
      return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(finite_lse * d_lse), (out, lse)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  ours = loss(lambda q, k, v: flash_attention(q, k, v, mask, softcap=softcap, block_q=block_q,
                                              block_k=block_k, out_dtype=out_dtype,
                                              alibi=alibi))(q, k, v)
  want = loss(lambda q, k, v: dense_attention(q, k, v, allowed, softcap, alibi))(q, k, v)
  (_, (out, lse)), grads = ours
  (_, (want_out, want_lse)), want_grads = want
  assert out.dtype == (out_dtype or q.dtype)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out, atol=atol, rtol=0)
  np.testing.assert_allclose(lse, want_lse, atol=atol, rtol=0)
  for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
    assert g.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol,
                               rtol=0, err_msg=name)


def qkv(rng, b, t, h, kv, d, dtype=jnp.float32, s=None):
  s = t if s is None else s
  return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
               for shape in ((b, t, h, d), (b, s, kv, d), (b, s, kv, d)))


KINDS = ["full", "causal", "document", "bidirectional_document", "shared_prompt", "prefix_lm",
         "sliding_window", "random"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_mask_kind_f32(kind):
  rng = np.random.default_rng(KINDS.index(kind))
  b, n = 2, int(rng.integers(40, 70))  # not a multiple of the 16-wide blocks
  group = [1, 2, 4, 8][KINDS.index(kind) % 4]
  q, k, v = qkv(rng, b, n, 2 * group, 2, 16)
  compare(q, k, v, make_mask(kind, rng, b, n), atol=1e-5, seed=KINDS.index(kind))


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa_ratios_on_packed_rows(group):
  rng = np.random.default_rng(10 + group)
  b, n, kv = 3, 45, 8 // group
  q, k, v = qkv(rng, b, n, 8, kv, 8)
  compare(q, k, v, fm.document(random_segments(rng, b, n)), atol=1e-5, block_q=16, block_k=32)


@pytest.mark.parametrize("group,softcap", [(1, 0.0), (4, 0.0), (2, 5.0)])
def test_alibi_computed_in_the_kernels_on_packed_rows(group, softcap):
  """ALiBi's bias from per-document positions (packed rows, odd length), computed per tile in
  the forward, dq and dk/dv kernels: against dense attention with the bias written out."""
  from models.layers import alibi_slopes
  rng = np.random.default_rng(30 + group)
  b, n, heads = 2, 53, 8
  seg = random_segments(rng, b, n)
  pos = np.zeros_like(seg)
  for r in range(b):
    for doc in np.unique(seg[r]):
      where = seg[r] == doc
      pos[r, where] = np.arange(where.sum())
  q, k, v = qkv(rng, b, n, heads, heads // group, 16)
  compare(q, k, v, fm.document(seg), atol=1e-5, softcap=softcap, block_k=32,
          alibi=(alibi_slopes(heads), pos, pos))


def test_rows_that_see_nothing_keys_unlike_queries_and_default_blocks():
  """Rows 10..19 see no key (output 0, lse -inf, no NaN in any gradient); 30 queries over 45 keys;
  no mask with the default 128-wide blocks over 150 tokens; bf16 in, float32 out (as the ring
  runs it)."""
  rng = np.random.default_rng(22)
  lts, lte = np.full((2, 45), 10), np.full((2, 45), 20)
  uts, ute = np.zeros((2, 45), int), np.where(np.arange(45) > 25, np.arange(45) - 15, 0)[None]
  mask = fm.from_vectors(lts, lte, uts, np.broadcast_to(ute, (2, 45)))
  assert not mask.dense(30)[:, 10:20].any()
  q, k, v = qkv(rng, 2, 30, 4, 2, 16, s=45)
  compare(q, k, v, mask, atol=1e-5)
  q, k, v = qkv(rng, 1, 150, 2, 1, 16)
  compare(q, k, v, None, atol=1e-5, block_q=None, block_k=None)
  q, k, v = qkv(rng, 2, 50, 4, 2, 32, jnp.bfloat16)
  compare(q, k, v, fm.causal(2, 50), atol=2e-2, d_scale=0.2, out_dtype=jnp.float32)


def test_head_dim_not_a_power_of_two_and_uneven_blocks():
  rng = np.random.default_rng(20)
  q, k, v = qkv(rng, 1, 37, 6, 3, 24)  # head_dim 24 is zero-padded to 32 inside
  compare(q, k, v, fm.causal(1, 37), atol=1e-5, block_q=32, block_k=16)


def test_soft_cap():
  rng = np.random.default_rng(21)
  q, k, v = qkv(rng, 2, 33, 4, 2, 16)
  q = q * 4  # large scores, so the cap bends them
  compare(q, k, v, fm.sliding_window(2, 33, 9), atol=1e-5, softcap=5.0)


@pytest.mark.parametrize("kind", ["causal", "document", "shared_prompt"])
def test_bfloat16(kind):
  rng = np.random.default_rng(30 + len(kind))
  b, n = 2, 50
  q, k, v = qkv(rng, b, n, 4, 2, 32, jnp.bfloat16)
  compare(q, k, v, make_mask(kind, rng, b, n), atol=2e-2, d_scale=0.2)


def test_segments_mask_in_jnp_equals_numpy_builders():
  rng = np.random.default_rng(40)
  seg = random_segments(rng, 4, 57)
  np.testing.assert_array_equal(np.asarray(fm.from_segments(seg).dense()),
                                fm.document(seg).dense())
  window = np.asarray(fm.from_segments(seg, sliding_window=5).dense())
  i, j = np.arange(57)[:, None], np.arange(57)[None, :]
  np.testing.assert_array_equal(window, fm.document(seg).dense() & (i - j < 5))
  np.testing.assert_array_equal(np.asarray(fm.from_segments(np.ones((1, 9))).dense()),
                                fm.causal(1, 9).dense())


def test_skipped_tiles_are_never_read():
  """Keys 32..47 are hidden from every row: their tile is SKIP everywhere, so NaN there must not
  reach any output or gradient (masking alone would give 0 * NaN = NaN through p @ v)."""
  rng = np.random.default_rng(50)
  n = 64
  mask = fm.causal(1, n)
  hidden = np.zeros(n, bool)
  hidden[32:48] = True
  mask = fm.from_vectors(np.where(hidden, 0, mask.lts), np.where(hidden, n, mask.lte),
                         mask.uts, mask.ute)
  q, k, v = qkv(rng, 1, n, 2, 1, 16)
  k, v = k.at[:, 32:48].set(jnp.nan), v.at[:, 32:48].set(jnp.nan)
  kinds = np.asarray(fm.tile_kinds(mask, n, 16, 16))
  assert (kinds[0, :, 2] == fm.SKIP).all()
  out, grads = jax.value_and_grad(
      lambda q, k, v: flash_attention(q, k, v, mask, block_q=16, block_k=16)[0].sum(),
      argnums=(0, 1, 2))(q, k, v)
  assert np.isfinite(out)
  assert np.isfinite(grads[0]).all()
  for g in grads[1:]:
    assert np.isfinite(np.delete(np.asarray(g), np.arange(32, 48), axis=1)).all()


def test_bad_shapes_are_clear_errors():
  q, k, v = qkv(np.random.default_rng(0), 1, 8, 3, 2, 8)
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    flash_attention(q, k, v)
  q, k, v = qkv(np.random.default_rng(0), 1, 8, 4, 2, 8)
  with pytest.raises(ValueError, match="do not match the keys"):
    flash_attention(q, k, v, fm.causal(1, 9))


def tiny_losses(impl: str, workdir: str) -> list[float]:
  """The logged losses of configs/tiny.py (on 200k characters) for 4 steps with `impl`."""
  from configs import tiny
  from trainer import train
  c = tiny.get_config()
  c.model.attention_impl = impl
  c.data.max_chars = 200_000
  c.train.update(steps=4, log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0)
  train.run(c, workdir)
  with open(f"{workdir}/metrics.jsonl") as f:
    return [json.loads(l)["loss"] for l in f if '"loss"' in l]


@pytest.mark.slow  # 45-85 s: run with `pytest -m slow` (keeps the default suite under 20 min)
def test_tiny_config_trains_the_same_with_pallas_and_xla(tmp_path):
  """configs/tiny.py (4 layers, d=256, GQA 4:2, packed rows of 128) for 4 steps in float32:
  the Pallas kernel gives the XLA path's losses (rtol 1e-5)."""
  losses = {impl: tiny_losses(impl, str(tmp_path / impl)) for impl in ("xla", "pallas")}
  assert len(losses["xla"]) == 4
  np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
  assert losses["xla"][-1] < losses["xla"][0]


@pytest.mark.parametrize("platform,alibi", [("cuda", False), ("tpu", False), ("cuda", True),
                                            ("tpu", True)])
def test_kernels_lower_for_gpu_triton_and_tpu_mosaic(platform, alibi):
  """No GPU or TPU here: check that forward and backward lower through Triton (GPU) and Mosaic
  (TPU, for an abstract v5p) with odd shapes: padded lengths and head_dim, GQA 7, a soft-cap.
  Compiling and running on the devices is the device benchmark's job."""
  import contextlib
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType

  context = contextlib.nullcontext()
  if platform == "tpu":
    device = AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
    context = jax.sharding.use_abstract_mesh(
        AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device))
  backend = {"cuda": "gpu"}.get(platform, platform)
  b, t, h, kv, d = 2, 300, 14, 2, 80
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, t, kv, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def grads(q, k, v, seg):
    mask = fm.from_segments(seg, sliding_window=17)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    bias = (jnp.linspace(0.5, 0.01, h), positions, positions) if alibi else None
    loss = lambda q, k, v: flash_attention(q, k, v, mask, softcap=50.0, backend=backend,
                                           alibi=bias)[0].sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  with context:
    text = jax.jit(grads).trace(q, k, k, seg).lower(lowering_platforms=(platform,)).as_text()
  kernel_call = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
  assert text.count(kernel_call) == 3  # forward (for the residuals), dq, dk/dv


def test_cudnn_path_arguments_mean_our_mask():
  """The cudnn path passes jax.nn.dot_product_attention our dense mask, a scale and the causal
  flag; with implementation="xla" (no GPU here) that call equals our own attention."""
  from models.layers import attention_inputs, dot_product_attention, library_attention

  rng = np.random.default_rng(60)
  b, n = 2, 40
  seg = jnp.asarray(random_segments(rng, b, n))
  pos = jnp.asarray([[int((seg[r, :i + 1] == seg[r, i]).sum()) - 1 for i in range(n)]
                     for r in range(b)])  # counting up inside each segment
  q, k, v = qkv(rng, b, n, 4, 2, 16)
  for window in (0, 6):
    dense_mask = attention_inputs("cudnn", pos, seg, window)
    got = library_attention(q, k, v, dense_mask, 0.25, "xla")
    want = dot_product_attention(q, k, v, attention_inputs("xla", pos, seg, window), 0.25)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_pallas_attention_partitions_over_a_tpu_mesh():
  """XLA cannot partition a Mosaic kernel: on a mesh the model wraps it in shard_map over batch
  and heads. Lowered for an abstract 4-chip TPU v5p mesh (data 2 x tensor 2)."""
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from models.layers import partitioned_flash_attention
  from parallel import rules as rules_lib

  device = AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
  axes = ("data", "fsdp", "expert", "sequence", "tensor")
  mesh = AbstractMesh((2, 1, 1, 1, 2), axes, (AxisType.Auto,) * 5, abstract_device=device)
  rules = rules_lib.strategy("fsdp_tp", "batch=data").activations
  q = jax.ShapeDtypeStruct((4, 256, 8, 128), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P("data", None, "tensor")))
  kv = jax.ShapeDtypeStruct((4, 256, 2, 128), jnp.bfloat16,
                            sharding=NamedSharding(mesh, P("data", None, "tensor")))
  seg = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=NamedSharding(mesh, P("data")))

  def attend(q, k, v, seg):
    with rules_lib.activate(mesh, rules):
      return partitioned_flash_attention(q, k, v, fm.from_segments(seg), None, 0.0, "tpu")

  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(attend).trace(q, kv, kv, seg).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text and "sdy.manual_computation" in text


@pytest.mark.parametrize("window,softcap,shared", [(0, 0.0, False), (9, 0.0, False),
                                                   (0, 30.0, False), (0, 0.0, True)])
def test_xla_query_blocks_equal_dense_attention(window, softcap, shared):
  """The xla path in training skips keys after each query block (`blocks`): outputs and
  gradients equal plain dense attention on the full mask, for packed rows, a sliding window, a
  soft-cap and shared-prompt preference rows, in float32 and bfloat16."""
  from models.layers import attention_mask, dot_product_attention

  rng = np.random.default_rng(70 + window)
  b, n = 2, 64
  if shared:  # pair k: prompt 3k+1, then both answers at the positions after it
    seg = np.array([[1] * 10 + [2] * 8 + [3] * 6 + [4] * 12 + [5] * 16 + [6] * 12] * b)
    pos = np.array([list(range(10)) + list(range(10, 18)) + list(range(10, 16)) +
                    list(range(12)) + list(range(12, 28)) + list(range(12, 24))] * b)
  else:
    seg = random_segments(rng, b, n)
    pos = np.array([[int((seg[r, :i + 1] == seg[r, i]).sum()) - 1 for i in range(n)]
                    for r in range(b)])
  mask = attention_mask(jnp.asarray(pos), jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(seg),
                        window, 2 if shared else 0)  # 2 answers per prompt
  q, k, v = qkv(rng, b, n, 8, 2, 16)
  d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def run(attend, dtype):
    f = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * d_out)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*(x.astype(dtype) for x in (q, k, v)))

  want = run(lambda q, k, v: dense_attention(q, k, v, mask[:, 0, 0], softcap)[0], jnp.float32)
  for blocks, dtype, tol in ((4, jnp.float32, 1e-5), (8, jnp.float32, 1e-5),
                             (4, jnp.bfloat16, 2e-2)):
    got = run(lambda q, k, v: dot_product_attention(q, k, v, mask, softcap=softcap,
                                                    blocks=blocks), dtype)
    for name, g, w in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
      error = np.linalg.norm(np.asarray(g, np.float32) - w) / np.linalg.norm(w)
      assert error < tol, f"{name} blocks={blocks} {dtype.__name__}: relative error {error:.1e}"
  with pytest.raises(ValueError, match="divide"):
    dot_product_attention(q[:, :60], k[:, :60], v[:, :60], mask[..., :60, :60], blocks=8)
