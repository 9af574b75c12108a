"""models/quant/uniform.py and calibrate.py: int8 / int4 round trips within half a step, exact
zero in the affine case, the streaming histogram equal to one made at the end, and on a
heavy-tailed sample KL and percentile thresholds below absmax with a lower error on the bulk."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.quant import calibrate, uniform
from models.quant.uniform import PER_CHANNEL, PER_TENSOR, Scheme

SCHEMES = [Scheme(bits, sym, group) for bits, sym, group in
           itertools.product((8, 4), (True, False), (PER_TENSOR, PER_CHANNEL, 16))]


def weight(seed=0, shape=(3, 48, 10)):
  rng = np.random.default_rng(seed)
  w = rng.normal(0, 0.05, shape).astype(np.float32)
  w[..., 5, 2] = 0.9  # an outlier in one column
  return w


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_round_trip_is_within_half_a_step(scheme):
  w = weight()
  stored = uniform.quantize(jnp.asarray(w), scheme)
  back = np.asarray(uniform.dequantize(stored, scheme))
  scale = np.asarray(stored["scales"])
  if scheme.group == PER_TENSOR:
    step = np.broadcast_to(scale, w.shape)
    assert scale.size == 1
  else:
    g = scheme.groups(w.shape[-2])
    assert scale.shape == (3, g, 1, 10)
    step = np.broadcast_to(scale, (3, g, w.shape[-2] // g, 10)).reshape(w.shape)
  assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5) + 1e-9)
  # each scale is its block's range over the grid: the extreme value is (almost) exact
  assert np.abs(back - w).max() < np.abs(w).max() / (2 ** scheme.bits - 2)
  want_dtype = {(8, True): np.int8}.get((scheme.bits, scheme.symmetric), np.uint8)
  assert stored["qweight"].dtype == want_dtype
  assert stored["qweight"].shape[-2] == w.shape[-2] // (8 // scheme.bits)
  assert ("zeros" in stored) == (not scheme.symmetric)


def test_finer_groups_give_smaller_errors():
  w = weight(1)
  errs = [np.abs(np.asarray(uniform.dequantize(uniform.quantize(w, s), s)) - w).mean()
          for s in (Scheme(4, True, PER_TENSOR), Scheme(4, True, PER_CHANNEL),
                    Scheme(4, True, 16))]
  assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("bits", (8, 4))
def test_zero_is_exact_in_the_affine_case(bits):
  w = np.abs(weight(2)) + 0.3  # all positive: the range must still hold 0
  w[:, ::7] = 0.0
  scheme = Scheme(bits, symmetric=False, group=16)
  back = np.asarray(uniform.dequantize(uniform.quantize(w, scheme), scheme))
  assert np.all(back[:, ::7] == 0.0)


def test_int4_codes_pack_two_per_byte():
  for sym in (True, False):
    s = Scheme(4, sym)
    q = jnp.asarray(np.random.default_rng(3).integers(s.qmin, s.qmax + 1, (2, 8, 5)), jnp.int32)
    packed = uniform.pack(q, s)
    assert packed.shape == (2, 4, 5) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(uniform.unpack(packed, s)), np.asarray(q))


def test_bad_schemes_say_why():
  with pytest.raises(ValueError, match="group size 32 does not divide the input dimension 48"):
    uniform.quantize(weight(), Scheme(4, True, 32))
  with pytest.raises(ValueError, match="bits"):
    Scheme(3)


def test_fake_quant_passes_gradients_inside_the_range_only():
  s = Scheme(8, True)
  x = jnp.array([-3.0, -0.5, 0.01, 0.7, 1.2, 5.0])
  scale = jnp.float32(1.0 / 127)  # range +-1
  y = uniform.fake_quant(x, scale, None, s)
  np.testing.assert_allclose(np.asarray(y), np.clip(np.round(np.asarray(x) * 127), -127, 127)
                             / 127, rtol=1e-6)
  g = jax.grad(lambda v: uniform.fake_quant(v, scale, None, s).sum())(x)
  np.testing.assert_array_equal(np.asarray(g), [0, 1, 1, 1, 0, 0])
  a = Scheme(8, False)
  g = jax.grad(lambda v: uniform.fake_quant(v, jnp.float32(0.01), jnp.float32(100.0), a).sum())(x)
  np.testing.assert_array_equal(np.asarray(g), [0, 1, 1, 1, 1, 0])  # range [-1, 1.55]


def test_streaming_histogram_equals_one_made_at_the_end():
  rng = np.random.default_rng(4)
  batches = [rng.normal(0, s, 1000).astype(np.float32) for s in (0.1, 1.0, 0.5, 8.0)]
  obs = calibrate.Observer()
  for b in batches:
    obs.update(b)
  a = np.abs(np.concatenate(batches))
  idx = np.minimum((a / obs.top * obs.bins).astype(np.int64), obs.bins - 1)
  np.testing.assert_array_equal(obs.counts, np.bincount(idx, minlength=obs.bins))
  assert obs.top >= a.max() and obs.seen == a.size
  assert (obs.lo, obs.hi) == (min(b.min() for b in batches), max(b.max() for b in batches))


def test_kl_and_percentile_clip_a_heavy_tail_and_fit_its_bulk_better():
  rng = np.random.default_rng(5)
  x = rng.standard_t(2.0, 200_000).astype(np.float32)  # heavy tails: absmax is far out
  obs = calibrate.Observer()
  obs.update(x)
  absmax = obs.threshold("absmax")
  bulk = x[np.abs(x) <= np.quantile(np.abs(x), 0.99)]
  s = Scheme(8, True)

  def bulk_mse(t):
    y = uniform.fake_quant(jnp.asarray(bulk), jnp.float32(t / 127), None, s)
    return float(np.mean((np.asarray(y) - bulk) ** 2))

  for method in ("kl", "percentile"):
    t = obs.threshold(method)
    assert t < absmax / 4, (method, t, absmax)
    assert bulk_mse(t) < bulk_mse(absmax) / 16, method
  # MSE weighs the clipped tail's squared error too, so it clips less
  t = obs.threshold("mse")
  assert obs.threshold("kl") < t < absmax and bulk_mse(t) < bulk_mse(absmax)
  # on a light-tailed (uniform) sample nothing is an outlier: KL keeps (nearly) the whole range
  u = calibrate.Observer()
  u.update(rng.uniform(-1, 1, 200_000).astype(np.float32))
  assert u.threshold("kl") > 0.9 * u.threshold("absmax")
  assert u.range("minmax") == (u.lo, u.hi)


def test_kl_threshold_is_the_minimum_over_candidates():
  rng = np.random.default_rng(6)
  obs = calibrate.Observer(bins=512)
  obs.update(rng.laplace(0, 1, 50_000).astype(np.float32))
  t = obs.threshold("kl")
  i = round(t / obs.width)

  def kl_at(i):  # the definition, written out bin by bin
    counts = obs.counts.astype(np.float64)
    p = counts[:i].copy()
    p[-1] += counts[i:].sum()
    q = np.zeros(i)
    for j in range(128):
      members = [b for b in range(i) if b * 128 // i == j and counts[b] > 0]
      for b in members:
        q[b] = sum(counts[m] for m in range(i) if m * 128 // i == j) / len(members)
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    return np.inf if np.any(q[m] == 0) else float((p[m] * np.log(p[m] / q[m])).sum())

  best = kl_at(i)
  assert all(kl_at(k) >= best - 1e-12 for k in (128, 200, i - 7, i + 7, 400, 512) if k != i)


@pytest.mark.parametrize("scheme", [Scheme(8, True, 0), Scheme(4, False, 16), Scheme(4, True, -1)],
                         ids=str)
def test_fake_quantized_weight_is_the_round_trip_with_a_straight_through_gradient(scheme):
  w = jnp.asarray(weight(7))
  got = uniform.fake_quant_weight(w, scheme)
  np.testing.assert_allclose(np.asarray(got), np.asarray(uniform.dequantize(
      uniform.quantize(w, scheme), scheme)), rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda v: (uniform.fake_quant_weight(v, scheme) * w).sum())(w)
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)  # identity: all inside
