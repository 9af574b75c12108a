"""Expert parallelism: a mixture of experts' experts split over the `expert` mesh axis, tokens
sent to the devices holding their experts and back by all-to-all inside `shard_map`.

    y, dropped = routed(run, x_td, ids_tk, weights_tk, w, ffn)  # models/moe.py `routed` calls it

models/moe.py calls it when the `expert` axis is larger than 1, and for dropless dispatch on
any mesh that splits the tokens (`local_dropless`: one device on `expert`, all_to_alls that move
nothing, each device sorting and running only its own tokens' pairs).

Layout inside the shard_map: the tokens are split over every mesh axis the experts' hidden
dimension is not (data, fsdp, expert, sequence: in EP the `expert` axis also splits the batch,
so no device repeats another's work outside the experts); the experts over `expert`, device j
holding experts [j * E / n, (j + 1) * E / n); their hidden dimension (`mlp`) over whatever the
rules give it (`tensor` in fsdp_tp), in which case each tensor rank computes a partial down
projection for the same tokens and the combined output is summed over those axes (Megatron's
row-parallel reduction, done once per token rather than once per pair).

Per device, with t local tokens, k experts each and n devices on `expert`:
  1. each (token, expert) pair gets a row in a send buffer (n, width, d): block j for device j;
  2. all_to_all over `expert` swaps the blocks: device j now holds, from every source, the rows
     for its own experts;
  3. the rows run through the local experts (`ffn`, a grouped matmul);
  4. all_to_all back, each pair's result read from the row it was sent in, and the k results of
     a token summed by the router weights.
Both all_to_alls transpose to all_to_alls, so gradients flow back the same way; a parameter
replicated over an axis gets its gradient summed over that axis by shard_map's transpose.

Dropless (`moe_impl` dropless or dense): width = t * k, the worst case (every pair of this
device to one device), so no pair is ever dropped. Rows of a block past its pairs are padding:
the receiver sorts them after every real row, where the grouped matmul gives zeros (and zero
gradients) for them. The buffers are n times the pairs, the price of exactness without a
second round trip to exchange counts first.

Capacity (`moe_impl=capacity`): each device's tokens are one group, and each expert takes at
most C = ceil(capacity_factor * t * k / E) of a group's pairs, first choices before second ones
and earlier tokens first (the order models/moe.py `capacity` uses over the whole batch); the
rest are dropped and counted. width = (E / n) * C. The count returned is global (the sum over
the groups), out of the same T * k pairs as without EP. What is dropped differs from the
unsharded path in one way: there the capacity is a share of the whole batch's pairs, here of
each device's, so an expert popular on one device drops pairs there even when another device
leaves its slots free (GShard's grouping; the total number of slots is the same, up to
rounding). Within one device it is exactly models/moe.py `capacity` on that device's tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from parallel import rules as rules_lib

AXIS = "expert"

# ffn(x_md, group_sizes, w) -> (m, d): each row through its expert's gated MLP, rows sorted by
# local expert, rows past sum(group_sizes) zero (models/moe.py `expert_ffn`); `w` has the local
# experts' gate, up and down.
ExpertFn = Callable[..., jax.Array]


def expert_parallel_size() -> int:
  """Devices along the `expert` axis of the active mesh (1 without one)."""
  active = rules_lib.active()
  return 1 if active is None else active[0].shape[AXIS]


def local_dropless(n_tokens: int) -> bool:
  """Whether dropless dispatch without an expert axis should still run per device here: when a
  mesh is active and splits the tokens. The compiler cannot split the sort over all (token,
  expert) pairs, so left to it every device would hold and run the whole batch's pairs; inside
  shard_map each device sorts and runs its own (`routed` with one device on `expert`, where the
  all_to_alls move nothing), the same function at 1 / devices the work."""
  active = rules_lib.active()
  return active is not None and bool(token_axes(active[0], n_tokens, ()))


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def token_axes(mesh, n_tokens: int, exclude: tuple[str, ...]) -> tuple[str, ...]:
  """The mesh axes (in mesh order) the tokens are split over: every axis larger than 1 but the
  excluded ones (those that split the experts' hidden dimension), as long as their product
  divides the tokens. An axis left out only means repeated work, never a wrong result."""
  out: list[str] = []
  for a in mesh.axis_names:
    split = math.prod(mesh.shape[b] for b in out) * mesh.shape[a]
    if mesh.shape[a] > 1 and a not in exclude and n_tokens % split == 0:
      out.append(a)
  return tuple(out)


def routed(run, x_td, ids_tk, weights_tk, w, ffn: ExpertFn):
  """(routed output (T, d), pairs dropped (global int32 count)) with the experts of `w`
  (gate, up (E, d, f), down (E, f, d): a NamedTuple, models/moe.py `Experts`) split over the
  `expert` axis of the active mesh (which may be 1: `local_dropless`); `run.moe_impl`
  capacity drops past each expert's capacity per device (module docstring), anything else is
  dropless."""
  mesh, rules = rules_lib.active()
  n = mesh.shape[AXIS]
  n_exp = w.gate.shape[0]
  if n_exp % n:
    raise ValueError(f"expert parallelism: {n_exp} experts do not split over mesh.expert={n}")
  w_spec = rules_lib.spec(("expert", None, "mlp"), rules, mesh, w.gate.shape)
  if n > 1 and w_spec[0] != AXIS:
    raise ValueError(f"expert parallelism needs the experts split over exactly '{AXIS}' "
                     f"(mesh.rules expert=expert), got {w_spec[0]}")
  mlp_axes = _axes(w_spec[2])
  tokens = token_axes(mesh, x_td.shape[0], mlp_axes)
  t_spec = P(tokens or None, None)
  down_spec = P(w_spec[0], w_spec[2], None)
  capacity = run.moe_impl == "capacity"

  def local(x, ids, weights, gate, up, down):
    t, k = ids.shape
    e_local = gate.shape[0]
    # pairs slot-major: every first choice before any second one (capacity's priority)
    expert = ids.T.reshape(-1)
    token = jnp.tile(jnp.arange(t), k)
    dest = expert // e_local
    if capacity:
      slots = max(1, math.ceil(run.capacity_factor * t * k / n_exp))
      rank = _rank(expert, n_exp)  # this pair's place among its expert's pairs
      kept = rank < slots
      width = e_local * slots
      pos = jnp.where(kept, expert % e_local * slots + rank, width)  # dropped: out of range
    else:
      width = t * k
      kept = jnp.ones(expert.shape, bool)
      pos = _rank(dest, n)  # this pair's row in its destination's block
    send = jnp.zeros((n, width, x.shape[1]), x.dtype)
    send = send.at[dest, pos].set(jnp.take(x, token, axis=0), mode="drop")
    recv = jax.lax.all_to_all(send, AXIS, 0, 0, tiled=True)  # recv[i]: what device i sent
    experts = type(w)(gate, up, down)
    if capacity:  # (source, expert, slot) -> rows of expert 0, then expert 1, ...: equal groups
      rows = recv.reshape(n, e_local, slots, -1).transpose(1, 0, 2, 3).reshape(n * width, -1)
      y = ffn(rows, jnp.full((e_local,), n * slots, jnp.int32), experts)
      y = y.reshape(e_local, n, slots, -1).transpose(1, 0, 2, 3).reshape(n, width, -1)
    else:  # the local expert of each received row travels with it; padding sorts last
      local_ids = jnp.full((n, width), e_local, jnp.int32).at[dest, pos].set(expert % e_local)
      keys = jax.lax.all_to_all(local_ids, AXIS, 0, 0, tiled=True).reshape(-1)
      order = jnp.argsort(keys, stable=True)
      sizes = jnp.sum(jax.nn.one_hot(keys, e_local, dtype=jnp.int32), axis=0)
      y = ffn(jnp.take(recv.reshape(n * width, -1), order, axis=0), sizes, experts)
      y = jnp.zeros_like(y).at[order].set(y).reshape(n, width, -1)
    back = jax.lax.all_to_all(y, AXIS, 0, 0, tiled=True).reshape(n * width, -1)
    pairs = jnp.take(back, jnp.where(kept, dest * width + pos, n * width), axis=0, mode="fill",
                     fill_value=0).reshape(k, t, -1)
    out = jnp.einsum("ktd,tk->td", pairs, weights.astype(pairs.dtype),
                     preferred_element_type=jnp.float32)
    if mlp_axes:  # each rank holds a slice of the hidden dimension: partial sums
      out = jax.lax.psum(out, mlp_axes)
    dropped = jnp.sum(~kept).astype(jnp.int32)
    if tokens:
      dropped = jax.lax.psum(dropped, tokens)
    return out.astype(x.dtype), dropped

  return jax.shard_map(
      local, mesh=mesh, in_specs=(t_spec, t_spec, t_spec, w_spec, w_spec, down_spec),
      out_specs=(t_spec, P()), check_vma=False)(x_td, ids_tk, weights_tk, *w)


def _rank(keys, n_keys: int):
  """Each entry's place among the earlier entries with the same key (0 for the first)."""
  one_hot = jax.nn.one_hot(keys, n_keys, dtype=jnp.int32)
  return jnp.take_along_axis(jnp.cumsum(one_hot, axis=0), keys[:, None], axis=1)[:, 0] - 1
