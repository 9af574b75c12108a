"""The decoder against an independent plain-jnp reference, and its structural promises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from models import Decoder, ModelConfig
from models.config import Execution
from models import hf, layers
from models.layers import rope_inv_freq
from parallel.rules import LOGICAL_AXES
from models import handle as handles

SMALL = dict(vocab_size=97, d_model=48, n_layers=3, n_heads=6, n_kv_heads=3, d_ff=80,
             max_seq_len=64, rope_theta=10000.0)


def build(**overrides):
  cfg = ModelConfig(**{**SMALL, **overrides})
  model = Decoder(cfg, nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.split(model)[1])
  # Non-trivial norms and biases so that every parameter matters in the comparison.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(path))), x.shape)
      if str(path[-1]) in ("['scale']", "['q_bias']", "['k_bias']", "['v_bias']") else x, params)
  return cfg, params


def tokens(b=2, t=13, vocab=97, seed=0):
  return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, vocab))


@pytest.mark.parametrize("overrides", [
    {},
    {"n_kv_heads": 1},  # MQA
    {"n_kv_heads": 6},  # MHA
    {"qkv_bias": True},  # Qwen2
    {"tie_embeddings": True},
    {"sliding_window": 4},  # Mistral
    {"head_dim": 10},  # head_dim != d_model / n_heads
])
def test_forward_matches_plain_jnp_reference(overrides):
  cfg, params = build(**overrides)
  tok = tokens()
  ours = handles.model_handle(cfg).bind(params)(tok)
  ref = reference.forward(params, cfg, tok)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_packed_segments_match_separate_sequences():
  cfg, params = build()
  a, b = tokens(1, 7, seed=1), tokens(1, 6, seed=2)
  packed = np.concatenate([a, b], 1)
  seg = np.array([[1] * 7 + [2] * 6])
  pos = np.array([list(range(7)) + list(range(6))])
  model = handles.model_handle(cfg).bind(params)
  out = model(packed, pos, seg)
  np.testing.assert_allclose(out[:, :7], model(a), atol=1e-5)
  np.testing.assert_allclose(out[:, 7:], model(b), atol=1e-5)
  np.testing.assert_allclose(out, reference.forward(params, cfg, packed, pos, seg), atol=1e-5)


def test_long_rows_run_the_blocked_causal_attention_exactly():
  """At 256 tokens the xla path runs its queries in blocks that skip later keys
  (models/layers.py QUERY_BLOCKS); packed rows still equal the plain-jnp reference."""
  cfg, params = build(max_seq_len=256)
  tok = tokens(2, 256)
  seg = np.repeat(np.array([[1] * 100 + [2] * 120 + [3] * 36]), 2, axis=0)
  pos = np.concatenate([np.arange(100), np.arange(120), np.arange(36)])[None].repeat(2, 0)
  ours = handles.model_handle(cfg).bind(params)(tok, pos, seg)
  np.testing.assert_allclose(ours, reference.forward(params, cfg, tok, pos, seg), atol=1e-5)


@pytest.mark.parametrize("remat,alibi", [("none", False), ("dots_no_batch", False),
                                         ("none", True)])
def test_attention_backward_matches_autodiff_of_the_plain_reference(remat, alibi):
  """The xla path's hand-written attention backward (models/layers.attend_block: probabilities
  recomputed from the saved log-sum-exp) against jax.grad of tests/reference.py's plain softmax
  attention: packed 256-token rows (so the query blocks run), grouped-query heads; with ALiBi,
  each document's own distances."""
  cfg, params = build(max_seq_len=256, alibi=alibi)
  tok = tokens(2, 256)
  seg = np.repeat(np.array([[1] * 100 + [2] * 120 + [3] * 36]), 2, axis=0)
  pos = np.concatenate([np.arange(100), np.arange(120), np.arange(36)])[None].repeat(2, 0)
  weights = jax.random.normal(jax.random.PRNGKey(1), (2, 256, cfg.vocab_size))
  handle = handles.model_handle(cfg, run=Execution(remat=remat))
  ours = lambda p: jnp.sum(handle.bind(p)(tok, pos, seg) * weights)
  plain = lambda p: jnp.sum(reference.forward(p, cfg, tok, pos, seg) * weights)
  # f32 sums over 512 tokens in another order: an error of about 1e-6 of the leaf's largest
  # entry (up to ~30 here), so atol scales with it; a wrong backward is off by O(the entry)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max()))),
      jax.grad(ours)(params), jax.grad(plain)(params))


@pytest.mark.parametrize("n_heads", [4, 6, 12, 16])
def test_alibi_slopes_are_blooms(n_heads):
  """Against transformers' BLOOM: build_alibi_tensor is slope_h * key position."""
  pytest.importorskip("torch")
  import torch
  from transformers.models.bloom.modeling_bloom import build_alibi_tensor
  bias = build_alibi_tensor(torch.ones(1, 5), n_heads, torch.float32).numpy()  # (h, 1, 5)
  np.testing.assert_allclose(layers.alibi_slopes(n_heads), bias[:, 0, 1], rtol=1e-6)
  np.testing.assert_allclose(layers.alibi_slopes(n_heads), reference.alibi_slopes(n_heads),
                             rtol=1e-6)


def test_alibi_packed_rows_keep_each_documents_distances():
  """A document's logits with ALiBi are the same alone and packed after another one."""
  cfg, params = build(alibi=True)
  model = handles.model_handle(cfg).bind(params)
  first, second = tokens(1, 5, seed=1), tokens(1, 8, seed=2)
  packed = np.concatenate([first, second], axis=1)
  pos = np.concatenate([np.arange(5), np.arange(8)])[None]
  seg = np.asarray([[1] * 5 + [2] * 8])
  np.testing.assert_allclose(model(packed, pos, seg)[:, 5:], model(second), atol=1e-5)
  assert np.abs(model(packed)[:, 5:] - model(second)).max() > 1e-3  # unpacked: it sees more


def test_attention_block_backward_with_softcap():
  """attend_block with a logit soft-cap (Gemma 2) and a ragged mask: value and gradients against
  autodiff of a plain jnp softmax of the capped scores."""
  b, kv, g, q_len, k_len, d = 2, 2, 3, 8, 16, 4
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(k1, (b, kv, g * q_len, d)) * 3
  k = jax.random.normal(k2, (b, kv, k_len, d))
  v = jax.random.normal(k3, (b, kv, k_len, d))
  mask = ((jnp.arange(k_len)[None, :] <= jnp.arange(q_len)[:, None] + 8)
          & (jax.random.uniform(k4, (b, 1, 1, q_len, k_len)) > 0.2)).at[..., 0].set(True)
  d_out = jax.random.normal(k4, q.shape)

  def plain(q, k, v):
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k).reshape(b, kv, g, q_len, k_len) * 0.5
    scores = jnp.where(mask, 5.0 * jnp.tanh(scores / 5.0), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kv, g * q_len, k_len)
    return jnp.sum(jnp.einsum("bkqs,bksd->bkqd", probs, v) * d_out)

  ours = lambda q, k, v: jnp.sum(layers.attend_block(q, k, v, mask, None, g, 0.5, 5.0) * d_out)
  np.testing.assert_allclose(ours(q, k, v), plain(q, k, v), rtol=1e-5)
  for got, want in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(plain, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_nothing_numerically(remat):
  cfg, params = build()
  tok = tokens()

  def loss(params, run):
    return jnp.mean(handles.model_handle(cfg, run=run).bind(params)(tok) ** 2)

  base_val, base_grad = jax.value_and_grad(loss)(params, Execution())
  val, grad = jax.value_and_grad(loss)(params, Execution(remat=remat))
  np.testing.assert_allclose(val, base_val, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, base_grad)


def test_every_parameter_has_logical_axes_and_count_matches():
  for overrides in ({}, {"qkv_bias": True, "tie_embeddings": True}):
    cfg = ModelConfig(**{**SMALL, **overrides})
    handle = handles.model_handle(cfg)
    shapes = handle.abstract_params()
    axes = handle.axes
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    for path, shape in flat_shapes:
      names = axes
      for key in path:
        names = names[key.key]
      assert len(names) == len(shape.shape), path
      assert all(n in LOGICAL_AXES for n in names), (path, names)
    assert sum(s.size for _, s in flat_shapes) == cfg.num_params()
  assert handle.axes["layers"]["mlp"]["gate"] == ("layers", "embed", "mlp")


LONG = [1.0, 1.5, 2.0, 3.5, 5.0, 8.0, 13.0, 21.0]  # longrope: one per frequency (head_dim 16)
SHORT = [1.0, 1.0, 1.1, 1.2, 1.4, 1.8, 2.5, 3.0]


@pytest.mark.parametrize("scaling,extra,seq_len", [
    ("linear", {"factor": 4.0}, 64),
    ("dynamic", {"factor": 2.0}, 100),  # beyond the original length: the base grows
    ("dynamic", {"factor": 2.0}, 16),  # within it: unchanged
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}, 64),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 32}, 128),
    ("yarn", {"factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
              "beta_slow": 2.0, "truncate": False}, 128),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.707,
              "mscale_all_dim": 1.0}, 128),  # DeepSeek's attention factor
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 32,
              "attention_factor": 1.3}, 128),
    ("longrope", {"long_factor": LONG, "short_factor": SHORT,
                  "original_max_position_embeddings": 32}, 128),  # long: past 32
    ("longrope", {"long_factor": LONG, "short_factor": SHORT,
                  "original_max_position_embeddings": 32}, 20),  # short
])
def test_rope_scaling_matches_transformers(scaling, extra, seq_len):
  """Inverse frequencies and the attention factor (what multiplies cos and sin) of a
  transformers config read by models/hf.py, against transformers' own rope-init function."""
  pytest.importorskip("torch")
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
                       vocab_size=10, architectures=["LlamaForCausalLM"],
                       rope_parameters={"rope_type": scaling,
                                        "rope_theta": 10000.0, **extra})
  if scaling == "dynamic":  # (transformers' dynamic grows past max_position_embeddings)
    hf_cfg.max_position_embeddings = 32
  want, want_attention = ROPE_INIT_FUNCTIONS[scaling](hf_cfg, "cpu", seq_len=seq_len)
  cfg = hf.config_from_hf(hf_cfg.to_dict())
  ours, attention = rope_inv_freq(cfg, seq_len)
  np.testing.assert_allclose(ours, want.numpy(), rtol=1e-6)
  assert float(attention) == pytest.approx(want_attention, rel=1e-6)
  if scaling in ("yarn", "longrope", "llama3"):  # what a model written back declares
    again = hf.config_from_hf(hf.config_to_hf(cfg))
    assert again == cfg


def test_ntk_aware_rope_grows_the_base():
  """Static NTK-aware scaling (no transformers rope_type has it): the plain formula."""
  cfg = ModelConfig(**{**SMALL, "rope_scaling": "ntk", "rope_factor": 4.0})
  d = cfg.head_dim
  want = 1.0 / (cfg.rope_theta * 4.0 ** (d / (d - 2))) ** (np.arange(0, d, 2) / d)
  np.testing.assert_allclose(rope_inv_freq(cfg, 10)[0], want, rtol=1e-6)
  assert rope_inv_freq(cfg, 10)[0][0] == 1.0  # the highest frequency is not moved


def test_rope_attention_factor_scales_the_logits():
  """YaRN's temperature: cos and sin times the factor, so q.k times its square."""
  cfg, params = build(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=8)
  tok = tokens()
  inv, attention = rope_inv_freq(cfg, tok.shape[1])
  assert attention == pytest.approx(0.1 * np.log(4.0) + 1)
  ours = handles.model_handle(cfg).bind(params)(tok)
  want = reference.forward(params, cfg, tok, inv_freq=np.asarray(inv), rope_scale=attention)
  np.testing.assert_allclose(ours, want, atol=1e-5)


def test_scaled_rope_reaches_the_forward_pass():
  cfg, params = build(rope_scaling="linear", rope_factor=4.0)
  tok = tokens()
  inv = reference.plain_inv_freq(cfg.head_dim, cfg.rope_theta) / 4.0
  ours = handles.model_handle(cfg).bind(params)(tok)
  np.testing.assert_allclose(ours, reference.forward(params, cfg, tok, inv_freq=inv), atol=1e-5)


def test_bad_shapes_are_rejected_with_the_field_named():
  with pytest.raises(ValueError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
    ModelConfig(**{**SMALL, "n_kv_heads": 4})
  with pytest.raises(ValueError, match="remat='some'"):
    Execution(remat="some")
