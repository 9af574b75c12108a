"""Ring attention: causal attention with the sequence split over the `sequence` mesh axis.

Each device keeps its slice of the queries and passes its keys and values around the ring
(`ppermute`), one hop per step; after n steps every query has met every key. Partial results
combine exactly through their log-sum-exp, so memory per device is O(length / n) and the
trainable sequence length grows with the number of devices.

Load balance: with a causal mask, device i of a plain split would do i + 1 blocks of work. The
trainer reorders the sequence "zigzag" (`zigzag_order`): the sequence is cut into 2n chunks and
device i holds chunks i and 2n - 1 - i, so every device holds one early and one late chunk. Each
device works on half-chunk pairs and skips those none of whose keys its queries may see (with a
causal mask: keys all after the queries); every device then does the same amount of work. Masks
are defined in the original order, so the reordering changes nothing numerically.

The per-block computation is passed in (`block_fn`): the model uses the Pallas FlashMask kernel
(models/kernels/flash_attention.py), whose masks are key-column bands over global query rows;
each query half-chunk is contiguous in the original order, so a block only renumbers the bands
for its rows (`flashmask.shift_rows`). Whatever travels with the keys (`k_aux`: their mask
vectors) moves around the ring with them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from parallel import rules as rules_lib

AXIS = "sequence"

# block_fn(q, k, v, q_aux, k_aux) -> (out float32 (b, t, h, d), lse float32 (b, t, h)), where
# q_aux and k_aux are tuples of (b, t) arrays that belong to the queries and to the keys.
BlockFn = Callable[..., tuple[jax.Array, jax.Array]]
# visible_fn(q_aux, k_aux) -> bool scalar: False when no query of the block sees any of its keys.
VisibleFn = Callable[..., jax.Array]


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


def layout(length: int) -> np.ndarray:
  """The order ring attention runs the sequence in under the active mesh (identity without
  sequence parallelism). The trainer reorders batches by it; the model reads it to place masks."""
  n = sequence_parallel_size()
  return zigzag_order(length, n) if n > 1 else np.arange(length)


def _combine(o, lse, o_blk, lse_blk):
  new = jnp.logaddexp(lse, lse_blk)
  return (o * jnp.exp(lse - new)[..., None] + o_blk * jnp.exp(lse_blk - new)[..., None]), new


def ring_attention(block_fn: BlockFn, visible_fn: VisibleFn, q, k, v, q_aux, k_aux,
                   heads=None):
  """q (batch, length, heads, head_dim), k/v (batch, length, kv_heads, head_dim), q_aux/k_aux
  tuples of (batch, length) arrays; the length already in the order it is sharded in (`layout`).
  `heads`: an array with one entry per query head (ALiBi's slopes), split as the heads are and
  given to block_fn as a last argument."""
  active = rules_lib.active()
  if active is None or active[0].shape[AXIS] == 1:
    out, _ = block_fn(q, k, v, q_aux, k_aux, *(() if heads is None else (heads,)))
    return out.astype(q.dtype)
  mesh, rules = active
  n = mesh.shape[AXIS]
  q_spec = rules_lib.spec(("batch", "length", "heads", "head_dim"), rules, mesh, q.shape)
  kv_spec = rules_lib.spec(("batch", "length", "kv_heads", "head_dim"), rules, mesh, k.shape)
  s_spec = rules_lib.spec(("batch", "length"), rules, mesh, q_aux[0].shape)
  if q_spec[1] != AXIS or kv_spec[1] != AXIS:
    raise ValueError(f"ring attention needs the length split over exactly '{AXIS}', got {q_spec[1]}")
  if q_spec[2] != kv_spec[2]:
    raise ValueError(f"ring attention: query heads are split over {q_spec[2]} but KV heads over "
                     f"{kv_spec[2]}; make n_kv_heads divisible by mesh.tensor")
  halves = 2  # a device's two zigzag chunks, each contiguous in the original order
  block = jax.checkpoint(block_fn)  # recompute scores in the backward pass: O(length/n) memory
  split = lambda x: jnp.split(x, halves, axis=1)
  split_aux = lambda aux: list(zip(*(split(a) for a in aux)))  # per half: a tuple of arrays

  def local(q, k, v, q_aux, k_aux, heads):
    q_parts, q_aux_parts = split(q), split_aux(q_aux)
    extra = () if heads is None else (heads,)  # this device's heads' entries
    b, t, h, d = q.shape
    o = [jnp.zeros((b, t // halves, h, d), jnp.float32) for _ in range(halves)]
    lse = [jnp.full((b, t // halves, h), jnp.finfo(jnp.float32).min) for _ in range(halves)]

    def hop(carry, _):
      o, lse, k, v, k_aux = carry
      o, lse = list(o), list(lse)
      for kj, vj, aux_j in zip(split(k), split(v), split_aux(k_aux)):
        for i in range(halves):
          def attend(o_i, lse_i, i=i, kj=kj, vj=vj, aux_j=aux_j):
            o_blk, lse_blk = block(q_parts[i], kj, vj, q_aux_parts[i], aux_j, *extra)
            return _combine(o_i, lse_i, o_blk, lse_blk)
          o[i], lse[i] = jax.lax.cond(visible_fn(q_aux_parts[i], aux_j), attend,
                                      lambda a, b: (a, b), o[i], lse[i])
      perm = [(s, (s + 1) % n) for s in range(n)]
      k, v, k_aux = (jax.lax.ppermute(x, AXIS, perm) for x in (k, v, k_aux))
      return (o, lse, k, v, k_aux), None

    (o, lse, *_), _ = jax.lax.scan(hop, (o, lse, k, v, k_aux), None, length=n)
    return jnp.concatenate(o, axis=1).astype(q.dtype)

  aux_specs = lambda aux: tuple(s_spec for _ in aux)
  head_spec = None if heads is None else jax.sharding.PartitionSpec(q_spec[2])
  return jax.shard_map(
      local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, aux_specs(q_aux), aux_specs(k_aux),
                                  head_spec),
      out_specs=q_spec, check_vma=False)(q, k, v, tuple(q_aux), tuple(k_aux), heads)
