"""The grouped matmul kernels and the fused gated FFN against a plain per-group loop, values and
gradients, on odd sizes with empty groups and rows past the groups; the dropless MoE against
the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import moe
from models.kernels import grouped_matmul as gmm

# (rows, per-group sizes): empty groups first, in the middle and last; a group smaller than a
# block, one of several blocks; rows left over past the groups (they must come out zero).
CASES = [(37, [0, 5, 0, 19, 1, 0]), (53, [13, 0, 0, 8, 21, 0, 3]), (16, [0, 0, 16]),
         (9, [0, 0, 0, 0])]


def reference(x, w, sizes):
  """Row r of group g times w[g], by static slices; zeros past the groups."""
  out, start = [], 0
  for g, n in enumerate(sizes):
    out.append(x[start:start + n] @ w[g])
    start += n
  out.append(jnp.zeros((x.shape[0] - start, w.shape[2]), x.dtype))
  return jnp.concatenate(out)


def ffn_reference(x, wg, wu, wd, sizes, act):
  return reference(act(reference(x, wg, sizes)) * reference(x, wu, sizes), wd, sizes)


def data(m, groups, k=6, n=5, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  w = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
       [(groups, k, n), (groups, k, n), (groups, n, k)]]
  return x, w, rng


@pytest.mark.parametrize("kernel", ["blocks", "ragged_dot"])
@pytest.mark.parametrize("m,sizes", CASES)
def test_grouped_matmul_and_gradients_match_a_loop(kernel, m, sizes):
  x, (w, _, _), rng = data(m, len(sizes))
  cot = jnp.asarray(rng.standard_normal((m, w.shape[2])), jnp.float32)
  group_sizes = jnp.asarray(sizes, jnp.int32)
  ours = lambda x, w: jnp.sum(gmm.grouped_matmul(x, w, group_sizes, kernel) * cot)
  ref = lambda x, w: jnp.sum(reference(x, w, sizes) * cot)
  np.testing.assert_allclose(gmm.grouped_matmul(x, w, group_sizes, kernel),
                             reference(x, w, sizes), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(ref, (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["blocks", "ragged_dot"])
@pytest.mark.parametrize("m,sizes", CASES)
@pytest.mark.parametrize("act", [jax.nn.silu, moe.activation("gelu_tanh")], ids=["silu", "gelu"])
def test_gated_ffn_and_gradients_match_a_loop(kernel, m, sizes, act):
  x, ws, rng = data(m, len(sizes), seed=1)
  cot = jnp.asarray(rng.standard_normal((m, x.shape[1])), jnp.float32)
  group_sizes = jnp.asarray(sizes, jnp.int32)
  ours = lambda x, *ws: jnp.sum(gmm.gated_ffn(x, *ws, group_sizes, act, kernel) * cot)
  ref = lambda x, *ws: jnp.sum(ffn_reference(x, *ws, sizes, act) * cot)
  np.testing.assert_allclose(jax.jit(lambda x, *ws: gmm.gated_ffn(x, *ws, group_sizes, act,
                                                                  kernel))(x, *ws),
                             ffn_reference(x, *ws, sizes, act), rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(ours, (0, 1, 2, 3)))(x, *ws)
  for g, want in zip(got, jax.grad(ref, (0, 1, 2, 3))(x, *ws)):
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,sizes,block", [(37, [0, 5, 0, 19, 1, 0], 8), (40, [17, 0, 23], 16)])
def test_layout_pads_each_group_to_blocks(m, sizes, block):
  """Each group starts on a block boundary, in order, padding rows hold nothing, and `src` and
  `dest` are each other's inverse."""
  lay = gmm.layout(jnp.asarray(sizes, jnp.int32), m, block)
  dest, src = np.asarray(lay.dest), np.asarray(lay.src)
  start, padded_start = 0, 0
  for g, n in enumerate(sizes):
    np.testing.assert_array_equal(dest[start:start + n], padded_start + np.arange(n))
    start += n
    padded_start += -(-n // block) * block
  assert (dest[start:] >= len(src)).all()  # past the groups: nowhere
  assert int(lay.n_blocks) == padded_start // block
  used = dest[:start]
  np.testing.assert_array_equal(src[used], np.arange(start))
  assert (np.delete(src, used) == m).all()  # padding: no row
  blocks = np.asarray(lay.block_group)[:padded_start // block]
  np.testing.assert_array_equal(blocks, np.repeat(np.arange(len(sizes)),
                                                  [-(-n // block) for n in sizes]))


def test_dropless_matches_dense_with_gradients():
  """Tokens routed to their top-2 of 5 experts (some expert unused): the sorted, grouped path
  equals every expert on every token combined by the router's weights."""
  rng = np.random.default_rng(3)
  t, d, f, n_exp, k = 23, 6, 7, 5, 2
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  w = moe.Experts(*(jnp.asarray(rng.standard_normal(s), jnp.float32)
                    for s in [(n_exp, d, f), (n_exp, d, f), (n_exp, f, d)]))
  ids = jnp.asarray(np.stack([rng.choice(n_exp - 1, k, replace=False) for _ in range(t)]),
                    jnp.int32)
  weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((t, k)), jnp.float32))
  cot = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  for kernel in ("blocks", "ragged_dot"):
    def ours(x, w, weights):
      return jnp.sum(moe.dropless(x, ids, weights, w, jax.nn.silu, kernel) * cot)

    def ref(x, w, weights):
      return jnp.sum(moe.dense(x, ids, weights, w, jax.nn.silu) * cot)
    np.testing.assert_allclose(ours(x, w, weights), ref(x, w, weights), rtol=1e-5)
    got = jax.jit(jax.grad(ours, (0, 1, 2)))(x, w, weights)
    for g, want in zip(jax.tree.leaves(got), jax.tree.leaves(jax.grad(ref, (0, 1, 2))(x, w,
                                                                                   weights))):
      np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("capacity_factor", [0.6, 1.0, 4.0])
def test_capacity_matches_dense_without_the_dropped_pairs(capacity_factor):
  """Each expert keeps its first C pairs, every first choice before any second one and earlier
  tokens first (counted here by a plain loop); the output is the dense reference with the
  dropped pairs' weights zero, gradients too, and the count of dropped pairs is theirs."""
  rng = np.random.default_rng(4)
  t, d, f, n_exp, k = 19, 6, 7, 4, 2
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  w = moe.Experts(*(jnp.asarray(rng.standard_normal(s), jnp.float32)
                    for s in [(n_exp, d, f), (n_exp, d, f), (n_exp, f, d)]))
  ids_np = np.stack([rng.choice(n_exp, k, replace=False, p=[0.5, 0.3, 0.1, 0.1])
                     for _ in range(t)])
  ids = jnp.asarray(ids_np, jnp.int32)
  weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((t, k)), jnp.float32))
  slots = moe.capacity_slots(t, k, n_exp, capacity_factor)
  kept, used = np.zeros((t, k), np.float32), [0] * n_exp
  for slot in range(k):
    for tok in range(t):
      e = ids_np[tok, slot]
      if used[e] < slots:
        kept[tok, slot], used[e] = 1.0, used[e] + 1
  cot = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)

  def ours(x, w, weights):
    y, dropped = moe.capacity(x, ids, weights, w, jax.nn.silu, capacity_factor)
    return jnp.sum(y * cot), dropped

  def ref(x, w, weights):
    return jnp.sum(moe.dense(x, ids, weights * kept, w, jax.nn.silu) * cot)
  value, dropped = jax.jit(ours)(x, w, weights)
  assert int(dropped) == int((1 - kept).sum())
  assert (int(dropped) > 0) == (capacity_factor < 4.0)
  np.testing.assert_allclose(value, ref(x, w, weights), rtol=1e-5)
  got = jax.jit(jax.grad(lambda *a: ours(*a)[0], (0, 1, 2)))(x, w, weights)
  for g, want in zip(jax.tree.leaves(got), jax.tree.leaves(jax.grad(ref, (0, 1, 2))(x, w,
                                                                                 weights))):
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)
