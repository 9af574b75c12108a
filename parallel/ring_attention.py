"""Ring attention: causal attention with the sequence split over the `sequence` mesh axis.

Each device keeps its slice of the queries and passes its keys and values around the ring
(`ppermute`), one hop per step; after n steps every query has met every key. Partial results
combine exactly through their log-sum-exp, so memory per device is O(length / n) and the
trainable sequence length grows with the number of devices.

Load balance: with a causal mask, device i of a plain split would do i + 1 blocks of work. The
trainer reorders the sequence "zigzag" (`zigzag_order`): the sequence is cut into 2n chunks and
device i holds chunks i and 2n - 1 - i, so every device holds one early and one late chunk. Each
device works on half-chunk pairs and skips those whose keys all come after its queries; every
device then does the same amount of work. The mask itself is computed from positions, so the
reordering changes nothing numerically.

The per-block computation is passed in (`block_fn`), so the same ring drives the XLA block and,
later, a Pallas kernel.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from parallel import rules as rules_lib

AXIS = "sequence"

# block_fn(q, k, v, pos_q, seg_q, pos_k, seg_k) -> (out float32 (b, t, h, d), lse float32 (b, t, h))
BlockFn = Callable[..., tuple[jax.Array, jax.Array]]


def zigzag_order(length: int, n: int) -> np.ndarray:
  """Indices that reorder a sequence so that contiguous slice i of n holds chunks i, 2n-1-i."""
  if length % (2 * n):
    raise ValueError(f"ring attention over {n} devices needs train.seq_len divisible by {2 * n}, "
                     f"got {length}")
  chunks = np.arange(length).reshape(2 * n, length // (2 * n))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def sequence_parallel_size() -> int:
  active = rules_lib.active()
  return 1 if active is None else active[0].shape[AXIS]


def _combine(o, lse, o_blk, lse_blk):
  new = jnp.logaddexp(lse, lse_blk)
  return (o * jnp.exp(lse - new)[..., None] + o_blk * jnp.exp(lse_blk - new)[..., None]), new


def ring_attention(block_fn: BlockFn, q, k, v, positions, segment_ids):
  """q (batch, length, heads, head_dim), k/v (batch, length, kv_heads, head_dim), positions and
  segment ids (batch, length); the length already in the order it is sharded in."""
  active = rules_lib.active()
  if active is None or active[0].shape[AXIS] == 1:
    out, _ = block_fn(q, k, v, positions, segment_ids, positions, segment_ids)
    return out.astype(q.dtype)
  mesh, rules = active
  n = mesh.shape[AXIS]
  q_spec = rules_lib.spec(("batch", "length", "heads", "head_dim"), rules, mesh, q.shape)
  kv_spec = rules_lib.spec(("batch", "length", "kv_heads", "head_dim"), rules, mesh, k.shape)
  s_spec = rules_lib.spec(("batch", "length"), rules, mesh, positions.shape)
  if q_spec[1] != AXIS or kv_spec[1] != AXIS:
    raise ValueError(f"ring attention needs the length split over exactly '{AXIS}', got {q_spec[1]}")
  if q_spec[2] != kv_spec[2]:
    raise ValueError(f"ring attention: query heads are split over {q_spec[2]} but KV heads over "
                     f"{kv_spec[2]}; make n_kv_heads divisible by mesh.tensor")
  halves = 2 if q.shape[1] % (2 * n) == 0 else 1
  block = jax.checkpoint(block_fn)  # recompute scores in the backward pass: O(length/n) memory

  def local(q, k, v, pos_q, seg_q, pos_k, seg_k):
    split = lambda x: jnp.split(x, halves, axis=1)
    q_parts, pq_parts, sq_parts = split(q), split(pos_q), split(seg_q)
    b, t, h, d = q.shape
    o = [jnp.zeros((b, t // halves, h, d), jnp.float32) for _ in range(halves)]
    lse = [jnp.full((b, t // halves, h), jnp.finfo(jnp.float32).min) for _ in range(halves)]

    def hop(carry, _):
      o, lse, k, v, pos_k, seg_k = carry
      o, lse = list(o), list(lse)
      for j, (kj, vj, pkj, skj) in enumerate(zip(split(k), split(v), split(pos_k), split(seg_k))):
        for i in range(halves):
          def attend(o_i, lse_i, i=i, kj=kj, vj=vj, pkj=pkj, skj=skj):
            o_blk, lse_blk = block(q_parts[i], kj, vj, pq_parts[i], sq_parts[i], pkj, skj)
            return _combine(o_i, lse_i, o_blk, lse_blk)
          visible = jnp.min(pkj) <= jnp.max(pq_parts[i])  # causal: some key not after a query
          o[i], lse[i] = jax.lax.cond(visible, attend, lambda a, b: (a, b), o[i], lse[i])
      perm = [(s, (s + 1) % n) for s in range(n)]
      k, v, pos_k, seg_k = (jax.lax.ppermute(x, AXIS, perm) for x in (k, v, pos_k, seg_k))
      return (o, lse, k, v, pos_k, seg_k), None

    (o, lse, *_), _ = jax.lax.scan(hop, (o, lse, k, v, pos_k, seg_k), None, length=n)
    return jnp.concatenate(o, axis=1).astype(q.dtype)

  return jax.shard_map(
      local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, s_spec, s_spec, s_spec, s_spec),
      out_specs=q_spec, check_vma=False)(q, k, v, positions, segment_ids, positions, segment_ids)

