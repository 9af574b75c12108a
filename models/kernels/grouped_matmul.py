"""Grouped matmuls for a mixture of experts: rows sorted by group (expert), each group's rows
times that group's weight.

    y = grouped_matmul(x_md, w_gkn, group_sizes, impl)  # rows [o_g, o_g + n_g) @ w[g]

`group_sizes` (G,) int32 sums to at most m; rows past the sum give zeros. The kernels:

  "ragged_dot": `jax.lax.ragged_dot`. TPUs (and GPUs, in recent XLA) run it as a grouped
    matmul; XLA:CPU expands it into a masked product over every group, G times the work.
  "blocks": each group's rows padded to a multiple of a block, then a loop over the blocks in
    use only, one (block x k) @ (k x n) matmul each with its group's weight. Its VJP is written
    out: dx is the same loop with the weights transposed, dw sums x^T dy per block into its
    group. The work is the routed tokens' plus at most one block per group: the CPU default.
  "tokamax": tokamax's `ragged_dot` (Pallas kernels on GPU and TPU), when tokamax is installed.
  "auto": blocks on CPU, tokamax where it is installed, else ragged_dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

KERNELS = ("blocks", "ragged_dot", "tokamax")


def pick(impl: str) -> str:
  """The kernel `impl` ("auto" or one of KERNELS) means on this backend."""
  if impl != "auto":
    return impl
  if jax.default_backend() == "cpu":
    return "blocks"
  return "tokamax" if _tokamax() is not None else "ragged_dot"


def _tokamax():
  try:
    import tokamax  # noqa: PLC0415 (optional)
  except ImportError:
    return None
  return tokamax


def grouped_matmul(x_md, w_gkn, group_sizes, impl: str = "auto"):
  """(m, n): row r of group g is x[r] @ w[g]; rows past sum(group_sizes) are zero."""
  kernel = pick(impl)
  if kernel == "ragged_dot":
    return jax.lax.ragged_dot(x_md, w_gkn.astype(x_md.dtype), group_sizes)
  if kernel == "tokamax":
    tokamax = _tokamax()
    if tokamax is None:
      raise ValueError("model.grouped_matmul=tokamax needs `pip install tokamax`")
    return tokamax.ragged_dot(x_md, w_gkn.astype(x_md.dtype), group_sizes)
  if kernel != "blocks":
    raise ValueError(f"grouped matmul {impl!r} is not one of auto, {', '.join(KERNELS)}")
  m, groups = x_md.shape[0], w_gkn.shape[0]
  block = block_size(m, groups)
  dest, block_group, n_blocks = _layout(group_sizes, m, block)
  padded = jnp.zeros((_padded_rows(m, groups, block), x_md.shape[1]), x_md.dtype)
  padded = padded.at[dest].set(x_md, mode="drop")
  y = _blocks(padded, w_gkn.astype(x_md.dtype), block_group, n_blocks, block)
  return jnp.take(y, dest, axis=0, mode="fill", fill_value=0)


def block_size(m: int, groups: int) -> int:
  """Rows per block: 128, or fewer (a multiple of 8) when there are few rows per group."""
  per_group = max(1, m // max(groups, 1))
  return int(min(128, max(8, -(-per_group // 8) * 8)))


def _padded_rows(m: int, groups: int, block: int) -> int:
  return -(-(m + groups * (block - 1)) // block) * block


def _layout(group_sizes, m: int, block: int):
  """(where each row goes in the padded buffer (rows past the groups: out of range, dropped),
  each block's group, the number of blocks in use)."""
  groups = group_sizes.shape[0]
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  padded = (sizes + block - 1) // block * block
  padded_ends = jnp.cumsum(padded)
  row = jnp.arange(m, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), groups - 1)
  dest = padded_ends[group] - padded[group] + row - (ends[group] - sizes[group])
  n_rows = _padded_rows(m, groups, block)
  dest = jnp.where(row < ends[-1], dest, n_rows)  # past every group: dropped
  starts = jnp.arange(n_rows // block, dtype=jnp.int32) * block
  block_group = jnp.minimum(jnp.searchsorted(padded_ends, starts, side="right"), groups - 1)
  return dest, block_group, padded_ends[-1] // block


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocks(x, w, block_group, n_blocks, block):
  return _block_loop(x, w, block_group, n_blocks, block)


def _block_loop(x, w, block_group, n_blocks, block):
  out = jnp.zeros((x.shape[0], w.shape[2]), x.dtype)

  def body(i, out):
    rows = jax.lax.dynamic_slice_in_dim(x, i * block, block)
    return jax.lax.dynamic_update_slice_in_dim(out, rows @ w[block_group[i]], i * block, 0)

  return jax.lax.fori_loop(0, n_blocks, body, out)


def _blocks_fwd(x, w, block_group, n_blocks, block):
  return _block_loop(x, w, block_group, n_blocks, block), (x, w, block_group, n_blocks)


def _blocks_bwd(block, saved, dy):
  x, w, block_group, n_blocks = saved
  dx = _block_loop(dy, jnp.swapaxes(w, 1, 2), block_group, n_blocks, block)

  def body(i, dw):
    rows = jax.lax.dynamic_slice_in_dim(x, i * block, block)
    d_rows = jax.lax.dynamic_slice_in_dim(dy, i * block, block)
    g = block_group[i]
    return dw.at[g].add(jnp.matmul(rows.T, d_rows, preferred_element_type=jnp.float32))

  dw = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros(w.shape, jnp.float32))
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return dx, dw.astype(w.dtype), zero(block_group), zero(n_blocks)


_blocks.defvjp(_blocks_fwd, _blocks_bwd)
