"""KV-cache generation: cached logits equal a full forward, greedy equals a naive loop, stop
tokens, top-k / top-p filtering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Context, Decoder, ModelConfig
from models.config import Execution, split_fields
from trainer import generate as gen
from models import handle as handles

SMALL = dict(vocab_size=97, d_model=48, n_layers=3, n_heads=6, n_kv_heads=3, d_ff=80,
             max_seq_len=64, rope_theta=10000.0, init_std=0.3)
GEMMA2 = dict(SMALL, family="gemma2", norm_offset=True, mlp_activation="gelu_tanh",
              embed_scale=True, query_scale=0.3, attn_softcap=3.0, logit_softcap=5.0,
              post_norms=True, sliding_window=4, sliding_window_layers=(0, 2), tie_embeddings=True)


def build(overrides):
  fields, run = split_fields(overrides)
  cfg, run = ModelConfig(**fields), Execution(**run)
  params = nnx.to_pure_dict(nnx.split(Decoder(cfg, nnx.Rngs(0), run))[1])
  return handles.model_handle(cfg, run=run), params


@pytest.mark.parametrize("overrides", [SMALL, GEMMA2, dict(SMALL, alibi=True)],
                         ids=["llama", "gemma2", "alibi"])
def test_cached_decoding_equals_full_forward(overrides):
  """Prompts of 3, 7 and 5 tokens, left-padded and prefilled together, then 6 tokens fed one
  at a time: every step's logits equal a full forward over that row alone."""
  handle, params = build(overrides)
  model = handle.bind(params)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 97, n) for n in (3, 7, 5)]
  follow = rng.integers(0, 97, (3, 6))
  p = 7
  tokens = np.zeros((3, p), np.int32)
  seg, pos = np.zeros_like(tokens), np.zeros_like(tokens)
  for r, q in enumerate(prompts):
    tokens[r, p - len(q):], seg[r, p - len(q):], pos[r, p - len(q):] = q, 1, np.arange(len(q))
  cache = model.init_cache(3, p + 6)
  h, cache = model.hidden(tokens, pos, seg, Context(cache=cache, start=0))
  steps = [model.logits(h)[:, -1]]
  for i in range(5):
    h, cache = model.hidden(follow[:, i:i + 1], (pos[:, -1] + 1 + i)[:, None],
                            np.ones((3, 1), np.int32), Context(cache=cache, start=p + i))
    steps.append(model.logits(h)[:, 0])
  for r, q in enumerate(prompts):
    full = model(np.concatenate([q, follow[r, :5]])[None])[0]
    want = full[len(q) - 1:]
    got = np.stack([s[r] for s in steps])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def naive_greedy(model, prompts, n, width=32):
  """Greedy decoding of each prompt by recomputing the whole sequence every step, no cache. Rows
  are padded on the right to a fixed `width` (causal: padding after a position cannot change its
  logits), so one compiled forward serves every step of every prompt."""
  forward = jax.jit(lambda row: model(row[None])[0])
  out = []
  for prompt in prompts:
    assert len(prompt) + n <= width, "widen the row"
    seq = list(prompt)
    for _ in range(n):
      row = np.zeros(width, np.int32)
      row[:len(seq)] = seq
      seq.append(int(jnp.argmax(forward(row)[len(seq) - 1])))
    out.append(seq[len(prompt):])
  return out


def test_greedy_equals_a_naive_loop_and_stops():
  handle, params = build(SMALL)
  model = handle.bind(params)
  prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8], [42]]
  want = naive_greedy(model, prompts, 10)
  assert gen.generate(handle, params, prompts, 10) == want
  stop = want[1][4]  # a token row 1 produces at its 5th step
  got = gen.generate(handle, params, prompts, 10, stop_ids=[stop])
  for g, w in zip(got, want):
    cut = w.index(stop) if stop in w else len(w)
    assert g == w[:cut]


def test_longrope_generation_runs_the_sequence_again_past_the_original_length():
  """LongRoPE takes its long factors once a sequence passes the original length (8 here): the
  tokens then equal greedy decoding by full forwards of exactly the sequence so far (no padding:
  the longest position picks the factors), for prompts that cross it at different steps."""
  half = SMALL["d_model"] // SMALL["n_heads"] // 2
  handle, params = build(dict(SMALL, rope_scaling="longrope", rope_factor=4.0,
                              rope_original_max_len=8, rope_short_factor=[1.0] * half,
                              rope_long_factor=[1.0 + 3 * i for i in range(half)]))
  model = handle.bind(params)
  forward = jax.jit(lambda row: model(row[None])[0])
  prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7]]
  want = []
  for prompt in prompts:
    seq = list(prompt)
    for _ in range(9):
      seq.append(int(jnp.argmax(forward(np.asarray(seq, np.int32))[-1])))
    want.append(seq[len(prompt):])
  for prompt, tokens in zip(prompts, want):
    got, logps = gen.generate(handle, params, [prompt], 9, with_logps=True)
    assert got == [tokens]
    assert len(logps[0]) == 9 and np.all(logps[0] <= 0)
  # together, the longest row picks the factors for all (as transformers' batches): row 1 is
  # as alone; a stop token still ends its row
  assert gen.generate(handle, params, prompts, 9)[1] == want[1]
  stop = want[1][3]
  assert gen.generate(handle, params, prompts[1:], 9, stop_ids=[stop]) == [
      want[1][:want[1].index(stop)]]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
  handle, params = build(SMALL)
  prompts = [[5, 9, 2], [7, 7]]
  a = gen.generate(handle, params, prompts, 8, temperature=1.0, seed=3)
  assert a == gen.generate(handle, params, prompts, 8, temperature=1.0, seed=3)
  assert a != gen.generate(handle, params, prompts, 8, temperature=1.0, seed=4)
  assert gen.generate(handle, params, prompts, 8, temperature=0.7, top_k=1) == \
      gen.generate(handle, params, prompts, 8)


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  keep = lambda f: np.asarray(f > jnp.finfo(jnp.float32).min)[0].tolist()
  assert keep(gen.filter_logits(logits, 1.0, top_k=2)) == [True, True, False, False, False]
  # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third (0.15) is needed too
  assert keep(gen.filter_logits(logits, 1.0, top_p=0.8)) == [True, True, True, False, False]
  assert keep(gen.filter_logits(logits, 1.0, top_p=0.3)) == [True, False, False, False, False]
  shuffled = logits[:, ::-1]  # order in the vocabulary must not matter
  assert keep(gen.filter_logits(shuffled, 1.0, top_p=0.8)) == [False, False, True, True, True]


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (0.7, 5), (1.3, 0)])
def test_sampled_logps_equal_the_training_forward(temperature, top_k):
  """The log-probs the sampler records (RL rollouts' old log-probs) equal those a training
  forward gives the same tokens at the same temperature, with the prompts and completions packed
  two to a row as training rows are (f32, 1e-5). Filtering (top-k) changes which tokens can be
  drawn, not the recorded probabilities."""
  handle, params = build(SMALL)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 97, n).tolist() for n in (3, 7, 5, 4)]
  settings = dict(temperature=temperature, top_k=top_k, seed=3)
  stop = gen.generate(handle, params, prompts, 8, **settings)[0][3]  # row 0's 4th token
  outs, logps = gen.generate(handle, params, prompts, 8, stop_ids=[stop], with_logps=True,
                             keep_stop=True, **settings)
  assert len(outs[0]) <= 4 and outs[0][-1] == stop  # the stop ends row 0, and is kept
  model = handle.bind(params)
  scale = temperature if temperature > 0 else 1.0
  for pair in ((0, 1), (2, 3)):  # two sequences per row: segments 1 and 2
    tokens, seg, pos = [], [], []
    for k, r in enumerate(pair):
      seq = prompts[r] + outs[r]
      tokens += seq
      seg += [k + 1] * len(seq)
      pos += list(range(len(seq)))
    h = model.hidden(np.asarray([tokens], np.int32), np.asarray([pos], np.int32),
                     np.asarray([seg], np.int32))
    lp = jax.nn.log_softmax(model.logits(h)[0] / scale, axis=-1)
    at = 0
    for r in pair:
      p, n = len(prompts[r]), len(outs[r])
      want = [float(lp[at + p - 1 + j, outs[r][j]]) for j in range(n)]
      np.testing.assert_allclose(logps[r], want, rtol=1e-5, atol=1e-5)
      at += p + n
