"""A mixture-of-experts feed-forward block: a router picks k of n gated-MLP experts per token.

    moe = MoE(cfg, run, rngs)          # built by models/ffn.py for the layers cfg makes MoE
    y, aux = moe(x_btd, deltas, rng)   # aux: this layer's router losses and load metrics

Routing (float32): logits = x @ router; "softmax_topk" takes the k largest softmax
probabilities, renormalised to sum 1 when `router_norm_topk` (Mixtral, Qwen3-MoE) or not
(Qwen2-MoE); "topk_softmax" takes a softmax over the k largest logits. With `router_jitter` j,
training multiplies the layer's input by uniform(1 - j, 1 + j) noise first (Mixtral).

Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437 section 2.1.2), with
`router_bias_update_rate` r > 0: each MoE layer keeps a per-expert routing bias b_e that is
added to the router logits only to choose the k experts; the combine weights are those of the
unbiased logits. (DeepSeek-V3 adds it to its sigmoid scores. On the logits of a softmax router it
is a factor exp(b_e) on expert e's probability when choosing, and it can cancel what a random
router makes of a part that all the layer's inputs share: the same logit offset for every
token, which no additive bias on the probabilities undoes; configs/moe_tiny.py has the figures.)
b is no parameter: no gradient reaches it and the optimizer leaves it alone (its leaf is
"frozen", trainer/train.py). After each training step b_e += r * sign(mean_e' load_e' - load_e),
load_e the (token, expert) pairs of that step that chose expert e in that layer (`bias_update`,
applied by trainer/step.py). With a sign rule b is always r times an integer, so the layer stores
that integer (`router_bias_steps`, int32: exact and kept out of the float casts of the
parameters) and uses b = r * steps. It is saved in checkpoints with the model; Hugging Face
export leaves it out (no family there has one) and import starts it at zero.

Batch-balanced training routing (`router_batch_balance` n > 0): in training steps each batch's
(each microbatch's) routing adds per-expert offsets, solved on that batch's logits, that give
every expert the same number of (token, expert) pairs, as BASE layers (Lewis et al. 2021, arXiv
2103.16716) balance their training assignment; evaluation and generation route by the logits
(and the routing bias) alone, as BASE layers route greedily at test time. The offsets only pick
the k experts, like the routing bias: the weights are those of the logits. `balanced_offsets`
says how they are solved. Why: in a small model's first ~100 steps (configs/moe_tiny.py) the
layers' inputs are mostly a part shared by every token, which moves from batch to batch by more
than the tokens of a batch differ, and the balancing loss and the routing bias alone leave the
load beyond 2x of uniform for most of them; BENCHMARKS.md "Load balancing" has the figures. The
balancing loss and a routing bias's update then read the loads of the routing without the
offsets (that of evaluation), so that the router and the bias still learn to balance it.

The routed experts run one of three ways (`Execution.moe_impl`), all the same function when no
token is dropped:
  dropless: the (token, expert) pairs sorted by expert, each expert's rows through its weights
    by a grouped matmul (models/kernels/grouped_matmul.py); no token is dropped.
  capacity: each expert takes at most C = ceil(capacity_factor * tokens * k / n_experts) pairs,
    first choices before second ones and earlier tokens first; the rest are dropped (that
    expert adds nothing for them) and counted. Experts run as one batched matmul (E, C, d).
  dense: every expert on every token, combined by the router weights (zero for the experts
    not picked): the reference, E / k times the work.
With expert parallelism (the `expert` mesh axis larger than 1) the dispatch crosses devices:
parallel/experts.py; dropless runs there per device on any mesh that splits the tokens.

A shared expert (`shared_expert_d_ff`) runs on every token beside the routed ones, scaled by
sigmoid(x @ shared_gate) when `shared_expert_gate` (Qwen2-MoE).

aux (models/ffn.py): `moe_balance_loss` = weight * E * sum_e f_e P_e (Switch Transformer; f_e
the share of the token-expert pairs that went to expert e in the routing without batch-balance
offsets, P_e its mean router probability: k when balanced), `moe_z_loss` = weight *
mean(logsumexp(logits)^2) (ST-MoE), each only when its weight is set and divided by the number
of MoE layers (the decoder sums over layers: their mean); `moe_dropped` the fraction of pairs
dropped (mean over layers); `moe_share_max` and `moe_share_min`, the most and least loaded
expert's share of the pairs as routed times E (1 is uniform), the extremes over the layers (the
decoder takes max and min of these keys); with a routing bias, `moe_load_by_layer`, the layer's
pairs per expert (E,) without batch-balance offsets, which the decoder keeps per layer, and
`moe_bias_max` / `moe_bias_min`, the largest and smallest b_e (over the layers too).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import Execution, ModelConfig
from models.kernels import grouped_matmul as gmm
from models.layers import MLP, LowRank, param
from parallel import experts as ep
from parallel.rules import constrain


class Experts(NamedTuple):
  """The routed experts' weights: gate and up (E, d, f), down (E, f, d)."""
  gate: jax.Array
  up: jax.Array
  down: jax.Array


def activation(name: str):
  return jax.nn.silu if name == "silu" else lambda z: jax.nn.gelu(z, approximate=True)


BIAS_STEPS = "router_bias_steps"  # the MoE attribute (and parameter-tree leaf) holding b / r
LOAD_KEY = "moe_load_by_layer"  # aux: a layer's pairs per expert (models/ffn.py: kept per layer)


class RouterBiasSteps(nnx.Variable):
  """A MoE layer's routing bias in units of `router_bias_update_rate` (int32, (E,)): not a
  Param, and no gradient reaches it (it only picks the top k)."""


def route(cfg: ModelConfig, logits_te, bias_e=None):
  """(weights (T, k) float32, expert ids (T, k) int32, probabilities (T, E)) from float32
  router logits. `bias_e` (E,): added to the logits only to choose the k experts (module
  docstring); the weights stay those of the unbiased logits."""
  k = cfg.experts_per_token
  probs = jax.nn.softmax(logits_te, axis=-1)
  ids = None if bias_e is None else jax.lax.top_k(logits_te + bias_e, k)[1]
  if cfg.router_order == "topk_softmax":
    if ids is None:
      top, ids = jax.lax.top_k(logits_te, k)
    else:
      top = jnp.take_along_axis(logits_te, ids, axis=-1)
    return jax.nn.softmax(top, axis=-1), ids, probs
  if ids is None:
    weights, ids = jax.lax.top_k(probs, k)
  else:
    weights = jnp.take_along_axis(probs, ids, axis=-1)
  if cfg.router_norm_topk:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, ids, probs


BALANCE_KEEP = 0.2  # a balancing round keeps this much of the offsets before it (steadies them)
QUANTILE_HALVINGS = 24  # bisection steps of `_column_quantile`: its error is 2^-24 of a range


def balanced_offsets(logits_te, k: int, rounds: int):
  """Per-expert offsets (E,) that, added to `logits_te` (T, E) to choose each token's k experts,
  give each expert about C = T k / E of the T k pairs. They start as minus each expert's mean
  logit over the batch; a round then moves every expert's offset at once, given the others':
  a token picks expert e when its logit for e plus the offset beats the k-th largest of its
  other experts' offset logits (the bar), so the offset that lets C tokens through is minus the
  midpoint of the C-th and (C+1)-th largest of (logit - bar) over the tokens; the new offsets
  are 0.8 of that and 0.2 of the old (BALANCE_KEEP). On the moe_tiny batches 3 rounds balance
  every expert to within 1.06x of uniform (tests/test_moe.py checks the loads). No gradient
  flows through them."""
  t, n_exp = logits_te.shape
  c = t * k // n_exp
  if c < 1 or k >= n_exp:  # nothing to balance: too few pairs, or every expert picked
    return jnp.zeros((n_exp,), jnp.float32)
  logits = jax.lax.stop_gradient(logits_te.astype(jnp.float32))
  offsets = -jnp.mean(logits, axis=0)
  for _ in range(rounds):
    z = logits + offsets
    top = _largest(z, k + 1)
    bar = jnp.where(z >= top[:, k - 1:k], top[:, k:], top[:, k - 1:k])
    offsets = BALANCE_KEEP * offsets - (1 - BALANCE_KEEP) * _column_quantile(logits - bar, c)
  return offsets


def _largest(z_te, n: int):
  """The n largest entries of each row of z (T, n), largest first (n argmax passes: cheaper on
  CPU than lax.top_k over a few experts)."""
  values = []
  for _ in range(n):
    i = jnp.argmax(z_te, axis=-1)
    values.append(jnp.take_along_axis(z_te, i[:, None], axis=-1))
    z_te = jnp.where(jax.nn.one_hot(i, z_te.shape[-1], dtype=bool), -jnp.inf, z_te)
  return jnp.concatenate(values, axis=-1)


def _column_quantile(m_te, c: int):
  """Per column (E,), the midpoint between its c-th and (c+1)-th largest entries: c entries
  above it, the rest below, none within rounding of it. Bisection on the count brackets the
  (c+1)-th largest (to 2^-QUANTILE_HALVINGS of the column's range), then the nearest entries
  either side of the bracket give the midpoint."""
  lo, hi = jnp.min(m_te, axis=0), jnp.max(m_te, axis=0)
  for _ in range(QUANTILE_HALVINGS):
    mid = (lo + hi) / 2
    above = jnp.sum(m_te > mid, axis=0) > c
    lo, hi = jnp.where(above, mid, lo), jnp.where(above, hi, mid)
  upper = jnp.min(jnp.where(m_te > hi, m_te, jnp.inf), axis=0)  # the c-th largest
  lower = jnp.max(jnp.where(m_te > hi, -jnp.inf, m_te), axis=0)  # the (c+1)-th
  return jnp.where(jnp.isfinite(upper), (upper + lower) / 2, hi)


def expert_ffn(x_md, group_sizes, w: Experts, act, kernel: str = "auto"):
  """The gated MLP of each row's expert, rows sorted by expert (`group_sizes` per expert)."""
  return gmm.gated_ffn(x_md, w.gate, w.up, w.down, group_sizes, act, kernel)


def dropless(x_td, ids_tk, weights_tk, w: Experts, act, kernel: str = "auto"):
  """Routed output (T, d): the T * k pairs sorted by expert through `expert_ffn`, then summed
  back per token by their weights. Both reorderings are gathers whose transposes are gathers
  too (`gmm.permute`): a scatter's rows are slow on XLA:CPU."""
  t, k = ids_tk.shape
  flat = ids_tk.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # sorted position -> pair
  where = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype))  # inverse
  sizes = jnp.bincount(flat, length=w.gate.shape[0]).astype(jnp.int32)
  x_sorted = gmm.permute(jnp.repeat(x_td, k, axis=0), order, where)
  y = expert_ffn(x_sorted, sizes, w, act, kernel)
  pairs = gmm.permute(y, where, order)  # back to (token, slot) order
  return combine(pairs.reshape(t, k, -1), weights_tk)


def combine(pairs_tkd, weights_tk):
  """sum_k weight * output, accumulated in float32."""
  out = jnp.einsum("tkd,tk->td", pairs_tkd, weights_tk.astype(pairs_tkd.dtype),
                   preferred_element_type=jnp.float32)
  return out.astype(pairs_tkd.dtype)


def capacity(x_td, ids_tk, weights_tk, w: Experts, act, capacity_factor: float):
  """(routed output (T, d), pairs dropped): each expert takes its first C pairs in the order
  (slot, token), C = ceil(capacity_factor * T * k / E)."""
  t, k = ids_tk.shape
  n_exp = w.gate.shape[0]
  slots = capacity_slots(t, k, n_exp, capacity_factor)
  ids = ids_tk.T.reshape(-1)  # slot-major: every first choice before any second one
  one_hot = jax.nn.one_hot(ids, n_exp, dtype=jnp.int32)
  rank = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0), ids[:, None], axis=1)[:, 0] - 1
  kept = rank < slots
  where = jnp.where(kept, ids * slots + rank, n_exp * slots)  # dropped: out of range
  # Which pair each slot holds (empty: out of range): the rows then move by gathers both ways
  # (gmm.permute), not by a scatter of rows, slow on XLA:CPU.
  holder = jnp.full((n_exp * slots,), t * k, jnp.int32).at[where].set(
      jnp.arange(t * k, dtype=jnp.int32), mode="drop")
  buf = gmm.permute(jnp.tile(x_td, (k, 1)), holder, where)
  buf = constrain(buf.reshape(n_exp, slots, -1), ("expert", None, "embed"))
  dt = x_td.dtype
  h = act(jnp.einsum("ecd,edf->ecf", buf, w.gate.astype(dt))) * \
      jnp.einsum("ecd,edf->ecf", buf, w.up.astype(dt))
  y = jnp.einsum("ecf,efd->ecd", h, w.down.astype(dt)).reshape(n_exp * slots, -1)
  pairs = gmm.permute(y, where, holder)  # (k * T, d), slot-major; dropped: zero
  pairs = pairs.reshape(k, t, -1).transpose(1, 0, 2)
  return combine(pairs, weights_tk), jnp.sum(~kept)


def capacity_slots(tokens: int, k: int, n_experts: int, capacity_factor: float) -> int:
  return max(1, math.ceil(capacity_factor * tokens * k / n_experts))


def dense(x_td, ids_tk, weights_tk, w: Experts, act):
  """The reference: every expert on every token, combined by the router weights."""
  dt = x_td.dtype
  n_exp = w.gate.shape[0]
  combine_te = jnp.zeros((x_td.shape[0], n_exp), jnp.float32)
  combine_te = combine_te.at[jnp.arange(x_td.shape[0])[:, None], ids_tk].add(weights_tk)
  h = act(jnp.einsum("td,edf->etf", x_td, w.gate.astype(dt))) * \
      jnp.einsum("td,edf->etf", x_td, w.up.astype(dt))
  y = jnp.einsum("etf,efd->etd", h, w.down.astype(dt))
  return jnp.einsum("etd,te->td", y, combine_te.astype(dt),
                    preferred_element_type=jnp.float32).astype(dt)


def routed(cfg: ModelConfig, run: Execution, x_td, ids_tk, weights_tk, w: Experts):
  """(routed output (T, d), pairs dropped) by `run.moe_impl`, across devices when the mesh
  has an expert axis; dropless per device whenever the mesh splits the tokens."""
  act = activation(cfg.mlp_activation)
  if ep.expert_parallel_size() > 1 or (run.moe_impl == "dropless" and
                                       ep.local_dropless(x_td.shape[0])):
    # under EP dense runs dropless too: the same function
    ffn = functools.partial(expert_ffn, act=act, kernel=run.grouped_matmul)
    return ep.routed(run, x_td, ids_tk, weights_tk, w, ffn)
  if run.moe_impl == "dense":
    return dense(x_td, ids_tk, weights_tk, w, act), jnp.zeros((), jnp.int32)
  if run.moe_impl == "capacity":
    return capacity(x_td, ids_tk, weights_tk, w, act, run.capacity_factor)
  return dropless(x_td, ids_tk, weights_tk, w, act, run.grouped_matmul), jnp.zeros((), jnp.int32)


def bias_update(steps_le, load_le):
  """The routing biases after a training step, in units of the rate: steps + sign(mean load -
  load) per layer (rows) and expert (columns); `load_le` that step's pairs per expert."""
  mean = jnp.mean(load_le, axis=-1, keepdims=True)
  return steps_le + jnp.sign(mean - load_le).astype(steps_le.dtype)


def _counts(ids_tk, n_exp: int):
  return jnp.bincount(ids_tk.reshape(-1), length=n_exp).astype(jnp.float32)


def load_stats(cfg: ModelConfig, logits_te, probs_te, ids_tk, dropped, n_moe_layers: int,
               bias_e=None, plain_ids_tk=None):
  """This layer's aux dict (module docstring); `plain_ids_tk`: when the batch was balanced, the
  experts that the logits (and the routing bias) alone pick, whose loads the balancing loss and
  the routing bias's update read."""
  t, k = ids_tk.shape
  n_exp = cfg.n_experts
  counts = _counts(ids_tk, n_exp)
  plain_counts = counts if plain_ids_tk is None else _counts(plain_ids_tk, n_exp)
  share, plain_share = counts / (t * k), plain_counts / (t * k)
  aux = {"moe_share_max": jnp.max(share) * n_exp, "moe_share_min": jnp.min(share) * n_exp,
         "moe_dropped": dropped.astype(jnp.float32) / (t * k) / n_moe_layers}
  if cfg.router_bias_update_rate:  # what the step moves the routing bias by (trainer/step.py)
    aux[LOAD_KEY] = plain_counts
    aux["moe_bias_max"], aux["moe_bias_min"] = jnp.max(bias_e), jnp.min(bias_e)
  if cfg.router_aux_loss_weight:
    balance = n_exp * jnp.sum(plain_share * k * jnp.mean(probs_te, axis=0))
    aux["moe_balance_loss"] = cfg.router_aux_loss_weight * balance / n_moe_layers
  if cfg.router_z_loss_weight:
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_te, axis=-1)))
    aux["moe_z_loss"] = cfg.router_z_loss_weight * z / n_moe_layers
  return aux


class MoE(nnx.Module):
  """Router (d, E), routed experts gate/up (E, d, f) and down (E, f, d) on the `expert` axis,
  and an optional shared expert (`shared`, a gated MLP, with `shared_gate` (d, 1))."""

  def __init__(self, cfg: ModelConfig, run: Execution, rngs: nnx.Rngs):
    self.cfg, self.run = cfg, run
    d, f, n_exp, std = cfg.d_model, cfg.expert_d_ff, cfg.n_experts, run.init_std
    out_std = std / math.sqrt(2 * cfg.n_layers)
    self.router = param(rngs, (d, n_exp), ("embed", None), std)
    self.gate = param(rngs, (n_exp, d, f), ("expert", "embed", "mlp"), std)
    self.up = param(rngs, (n_exp, d, f), ("expert", "embed", "mlp"), std)
    self.down = param(rngs, (n_exp, f, d), ("expert", "mlp", "embed"), out_std)
    if cfg.shared_expert_d_ff:
      self.shared = MLP(dataclasses.replace(cfg, d_ff=cfg.shared_expert_d_ff), run, rngs)
      if cfg.shared_expert_gate:
        self.shared_gate = param(rngs, (d, 1), ("embed", None), std)
    if cfg.router_bias_update_rate:
      setattr(self, BIAS_STEPS, RouterBiasSteps(jnp.zeros((n_exp,), jnp.int32),
                                                out_sharding=(None,), eager_sharding=False))

  def __call__(self, x_btd, deltas=None, rng=None):
    """(output (batch, length, embed), aux). `deltas` (PEFT): {"gate" | "up" | "down":
    LowRank with a leading expert axis on a and b, "shared": the shared MLP's deltas}; `rng`:
    training (router jitter, batch-balanced routing)."""
    cfg = self.cfg
    deltas = deltas or {}
    b, t, d = x_btd.shape
    if rng is not None and cfg.router_jitter:
      noise = jax.random.uniform(rng, x_btd.shape, jnp.float32, 1.0 - cfg.router_jitter,
                                 1.0 + cfg.router_jitter)
      x_btd = (x_btd * noise).astype(x_btd.dtype)
    x_td = x_btd.reshape(b * t, d)
    logits = jnp.matmul(x_td.astype(jnp.float32), self.router[...].astype(jnp.float32))
    bias = None
    if cfg.router_bias_update_rate:
      bias = cfg.router_bias_update_rate * getattr(self, BIAS_STEPS)[...].astype(jnp.float32)
    choose, plain_ids = bias, None  # what picks the k experts; those picked without offsets
    if rng is not None and cfg.router_batch_balance:
      biased = logits if bias is None else logits + bias
      plain_ids = jax.lax.top_k(biased, cfg.experts_per_token)[1]
      offsets = balanced_offsets(biased, cfg.experts_per_token, cfg.router_batch_balance)
      choose = offsets if bias is None else bias + offsets
    weights, ids, probs = route(cfg, logits, choose)
    w = Experts(*(_with_delta(getattr(self, n)[...], deltas.get(n), x_td.dtype)
                  for n in ("gate", "up", "down")))
    y, dropped = routed(cfg, self.run, x_td, ids, weights, w)
    y = y.reshape(b, t, d)
    if cfg.shared_expert_d_ff:
      shared = self.shared(x_btd, deltas.get("shared"))
      if cfg.shared_expert_gate:
        scale = jax.nn.sigmoid(jnp.matmul(x_btd, self.shared_gate[...].astype(x_btd.dtype)))
        shared = shared * scale
      y = y + shared
    n_moe = cfg.layer_kinds().count("moe")
    return y, load_stats(cfg, logits, probs, ids, dropped, n_moe, bias, plain_ids)


def _with_delta(w, delta, dtype):
  """An expert weight (E, n_in, n_out) with a LowRank delta (a (E, n_in, r), b (E, r, n_out))
  folded in: w + scale * a @ b, per expert."""
  w = w.astype(dtype)
  if delta is None:
    return w
  if not isinstance(delta, LowRank):
    raise ValueError("expert weights take low-rank deltas only (LoRA folded per expert)")
  return w + jnp.asarray(delta.scale, dtype) * jnp.matmul(delta.a.astype(dtype),
                                                          delta.b.astype(dtype))
