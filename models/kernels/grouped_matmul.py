"""Grouped matmuls for a mixture of experts: rows sorted by group (expert), each group's rows
times that group's weight.

    y = grouped_matmul(x_md, w_gkn, group_sizes, impl)  # rows [o_g, o_g + n_g) @ w[g]
    y = gated_ffn(x_md, w_gate, w_up, w_down, group_sizes, act, impl)  # each group's gated MLP

`group_sizes` (G,) int32 sums to at most m; rows past the sum give zeros. The kernels:

  "ragged_dot": `jax.lax.ragged_dot`. TPUs (and GPUs, in recent XLA) run it as a grouped
    matmul; XLA:CPU expands it into a masked product over every group, G times the work.
  "blocks": each group's rows padded to a multiple of a block, then a loop over the blocks in
    use only, one (block x k) @ (k x n) matmul each with its group's weight. Its VJP is written
    out: dx is the same loop with the weights transposed, dw sums x^T dy per block into its
    group. The work is the routed tokens' plus at most one block per group: the CPU default.
    The rows move into their padded places and back by gathers whose transposes are gathers
    (`permute`), not scatters. `gated_ffn` pads once and does a block's three matmuls in one
    loop, keeping the gate and up pre-activations for its backward loop, which does the
    block's five matmuls and three weight gradients.
    Each product is one of models/kernels/matmul.py's forms (bfloat16 blocks reach XLA:CPU's
    matmul library).
  "tokamax": tokamax's `ragged_dot` (Pallas kernels on GPU and TPU), when tokamax is installed.
  "auto": blocks on CPU, tokamax where it is installed, else ragged_dot.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from models.kernels.matmul import mm, mm_nt, mm_tn

KERNELS = ("blocks", "ragged_dot", "tokamax")
# The checkpoint name of the blocks gated FFN's output and pre-activations: a remat policy that
# saves it keeps the backward pass from running the forward loop again (the dots policies
# cannot see into it: it is a custom VJP's loop).
EXPERT_FFN = "expert_ffn"


def pick(impl: str) -> str:
  """The kernel `impl` ("auto" or one of KERNELS) means on this backend."""
  if impl != "auto":
    return impl
  if jax.default_backend() == "cpu":
    return "blocks"
  return "tokamax" if _tokamax() is not None else "ragged_dot"


def tokamax_installed() -> bool:
  return _tokamax() is not None


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
  lay = layout(group_sizes, x_md.shape[0])
  y = _blocks(lay.pad(x_md), w_gkn.astype(x_md.dtype), lay.block_group, lay.n_blocks, lay.block)
  return lay.unpad(y)


def gated_ffn(x_md, w_gate, w_up, w_down, group_sizes, act, impl: str = "auto"):
  """(m, n_out): act(x[r] @ gate[g]) * (x[r] @ up[g]) @ down[g] for row r of group g (rows
  sorted by group, rows past sum(group_sizes) zero): a mixture of experts' gated MLPs. The
  blocks kernel pads the rows once and runs the three matmuls of a block in one loop (one loop
  back, with the three weight gradients); the others are three grouped matmuls."""
  if pick(impl) != "blocks":
    gate = grouped_matmul(x_md, w_gate, group_sizes, impl)
    up = grouped_matmul(x_md, w_up, group_sizes, impl)
    return grouped_matmul(act(gate) * up, w_down, group_sizes, impl)
  lay = layout(group_sizes, x_md.shape[0])
  dt = x_md.dtype
  y = _ffn_blocks(lay.pad(x_md), w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt),
                  lay.block_group, lay.n_blocks, lay.block, act)
  return lay.unpad(y)


def block_size(m: int, groups: int) -> int:
  """Rows per block: 128, or fewer (a multiple of 8) when there are few rows per group."""
  per_group = max(1, m // max(groups, 1))
  return int(min(128, max(8, -(-per_group // 8) * 8)))


def _padded_rows(m: int, groups: int, block: int) -> int:
  return -(-(m + groups * (block - 1)) // block) * block


class Layout(NamedTuple):
  """Rows sorted by group, each group padded to a multiple of `block` rows: `dest` (m,) where
  each row goes in the padded rows (rows past the groups: out of range), `src` (padded,) the
  row each padded row holds (padding: out of range), `block_group` each block's group, and
  `n_blocks` the blocks in use."""
  dest: jax.Array
  src: jax.Array
  block_group: jax.Array
  n_blocks: jax.Array
  block: int

  def pad(self, x_md):
    """(padded rows, n): the rows in their padded places, zeros between groups."""
    return permute(x_md, self.src, self.dest)

  def unpad(self, y_pn):
    """(m, n): the padded rows back in the rows' order (rows past the groups: zeros)."""
    return permute(y_pn, self.dest, self.src)


def layout(group_sizes, m: int, block: int = 0) -> Layout:
  """The padded layout of m rows in groups of `group_sizes` (block: `block_size` by default)."""
  groups = group_sizes.shape[0]
  block = block or block_size(m, groups)
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  padded = (sizes + block - 1) // block * block
  padded_ends = jnp.cumsum(padded)
  padded_starts = padded_ends - padded
  n_rows = _padded_rows(m, groups, block)
  row = jnp.arange(m, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), groups - 1)
  dest = jnp.where(row < ends[-1], padded_starts[group] + row - starts[group], n_rows)
  block_starts = jnp.arange(n_rows // block, dtype=jnp.int32) * block
  block_group = jnp.minimum(jnp.searchsorted(padded_ends, block_starts, side="right"),
                            groups - 1)
  slot = jnp.arange(n_rows, dtype=jnp.int32)
  slot_group = block_group[slot // block]
  offset = slot - padded_starts[slot_group]
  src = jnp.where((offset >= 0) & (offset < sizes[slot_group]), starts[slot_group] + offset, m)
  return Layout(dest, src, block_group, padded_ends[-1] // block, block)


@jax.custom_vjp
def permute(x, idx, inverse):
  """x[idx] with out-of-range indices giving zero rows, where every row of x lands at most once
  and `inverse` says where (out of range: nowhere). Its transpose is then the gather
  g[inverse], not the scatter-add that `jnp.take`'s would be (slow on XLA:CPU)."""
  return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _permute_fwd(x, idx, inverse):
  return permute(x, idx, inverse), (idx, inverse)


def _permute_bwd(saved, g):
  idx, inverse = saved
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return jnp.take(g, inverse, axis=0, mode="fill", fill_value=0), zero(idx), zero(inverse)


permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocks(x, w, block_group, n_blocks, block):
  return _block_loop(x, w, block_group, n_blocks, block)


def _block_loop(x, w, block_group, n_blocks, block, product=mm):
  """Each block in use: product(its rows, its group's weight); `mm_nt` for the rows times the
  weight transposed (the backward's dx)."""
  n_out = w.shape[1] if product is mm_nt else w.shape[2]
  out = jnp.zeros((x.shape[0], n_out), x.dtype)

  def body(i, out):
    rows = jax.lax.dynamic_slice_in_dim(x, i * block, block)
    return jax.lax.dynamic_update_slice_in_dim(out, product(rows, w[block_group[i]]),
                                               i * block, 0)

  return jax.lax.fori_loop(0, n_blocks, body, out)


def _blocks_fwd(x, w, block_group, n_blocks, block):
  return _block_loop(x, w, block_group, n_blocks, block), (x, w, block_group, n_blocks)


def _blocks_bwd(block, saved, dy):
  x, w, block_group, n_blocks = saved
  dx = _block_loop(dy, w, block_group, n_blocks, block, mm_nt)

  def body(i, dw):
    rows = jax.lax.dynamic_slice_in_dim(x, i * block, block)
    d_rows = jax.lax.dynamic_slice_in_dim(dy, i * block, block)
    g = block_group[i]
    return dw.at[g].add(mm_tn(rows, d_rows, jnp.float32))

  dw = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros(w.shape, jnp.float32))
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return dx, dw.astype(w.dtype), zero(block_group), zero(n_blocks)


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _ffn_blocks(x, w_gate, w_up, w_down, block_group, n_blocks, block, act):
  return _ffn_loop(x, w_gate, w_up, w_down, block_group, n_blocks, block, act, False)[0]


def _ffn_loop(x, w_gate, w_up, w_down, block_group, n_blocks, block, act, keep: bool):
  """(output, (gate, up) pre-activations when `keep`, else ()): per block in use, its rows
  through its group's gated MLP."""
  rows_n, f = x.shape[0], w_gate.shape[2]
  out = jnp.zeros((rows_n, w_down.shape[2]), x.dtype)
  pre = (jnp.zeros((rows_n, f), x.dtype),) * 2 if keep else ()

  def body(i, carry):
    out, pre = carry
    start, g = i * block, block_group[i]
    rows = jax.lax.dynamic_slice_in_dim(x, start, block)
    gate, up = mm(rows, w_gate[g]), mm(rows, w_up[g])
    out = jax.lax.dynamic_update_slice_in_dim(out, mm(act(gate) * up, w_down[g]), start, 0)
    if keep:
      pre = tuple(jax.lax.dynamic_update_slice_in_dim(p, v, start, 0)
                  for p, v in zip(pre, (gate, up)))
    return out, pre

  return jax.lax.fori_loop(0, n_blocks, body, (out, pre))


def _ffn_fwd(x, w_gate, w_up, w_down, block_group, n_blocks, block, act):
  out, (gate, up) = _ffn_loop(x, w_gate, w_up, w_down, block_group, n_blocks, block, act, True)
  out, gate, up = (checkpoint_name(a, EXPERT_FFN) for a in (out, gate, up))
  return out, (x, w_gate, w_up, w_down, block_group, n_blocks, gate, up)


def _ffn_bwd(block, act, saved, dy):
  """One loop over the blocks: dx, and each weight's gradient summed into its group in
  float32. The pre-activations come from the forward pass (two matmuls fewer than
  recomputing them)."""
  x, w_gate, w_up, w_down, block_group, n_blocks, gate_all, up_all = saved
  f32 = jnp.float32

  def body(i, carry):
    dx, dw_gate, dw_up, dw_down = carry
    start, g = i * block, block_group[i]
    piece = lambda a: jax.lax.dynamic_slice_in_dim(a, start, block)
    rows, d_out, gate, up = piece(x), piece(dy), piece(gate_all), piece(up_all)
    act_gate, act_vjp = jax.vjp(act, gate)
    d_h = mm_nt(d_out, w_down[g])
    d_up = d_h * act_gate
    d_gate, = act_vjp(d_h * up)
    dx = jax.lax.dynamic_update_slice_in_dim(
        dx, mm_nt(d_gate, w_gate[g]) + mm_nt(d_up, w_up[g]), start, 0)
    outer = lambda a, b: mm_tn(a, b, f32)
    return (dx, dw_gate.at[g].add(outer(rows, d_gate)), dw_up.at[g].add(outer(rows, d_up)),
            dw_down.at[g].add(outer(act_gate * up, d_out)))

  zeros = lambda w: jnp.zeros(w.shape, f32)
  dx, dw_gate, dw_up, dw_down = jax.lax.fori_loop(
      0, n_blocks, body, (jnp.zeros_like(x), zeros(w_gate), zeros(w_up), zeros(w_down)))
  zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return (dx, dw_gate.astype(w_gate.dtype), dw_up.astype(w_up.dtype),
          dw_down.astype(w_down.dtype), zero(block_group), zero(n_blocks))


_ffn_blocks.defvjp(_ffn_fwd, _ffn_bwd)
