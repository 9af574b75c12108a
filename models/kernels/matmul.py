"""The three 2-D products of a matmul's forward and backward pass, written for XLA:CPU.

    mm(a, b)     a (m, k) @ b (k, n)
    mm_nt(a, b)  a (m, n) @ b (k, n)^T
    mm_tn(a, b)  a (m, k)^T @ b (m, n)

For bfloat16 / float16 operands each is written in the one form XLA:CPU hands to its matmul
library (YNNPACK, which runs bf16 on AMX and AVX512-BF16 where the host has them): low-precision
operands, a float32 result (then rounded to `out_dtype`, default a's dtype), and a layout the
library takes. The forms JAX writes otherwise, a bf16 result or a^T @ b contracting the rows of
both operands in place, XLA:CPU runs in float32 on its own, 3-6x slower on a Sapphire Rapids
host (benchmarks/matmul_cpu.py). Other dtypes: the plain product, as `@` writes it. Accelerators
take every form alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def mm(a, b, out_dtype=None):
  """a (m, k) @ b (k, n)."""
  if a.dtype not in LOW_PRECISION:
    return jnp.matmul(a, b, preferred_element_type=out_dtype)
  return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(out_dtype or a.dtype)


def mm_nt(a, b, out_dtype=None):
  """a (m, n) @ b (k, n)^T, b's contracting dim left in place."""
  if a.dtype not in LOW_PRECISION:
    return jnp.matmul(a, b.T, preferred_element_type=out_dtype)
  y = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return y.astype(out_dtype or a.dtype)


def mm_tn(a, b, out_dtype=None):
  """a (m, k)^T @ b (m, n): for low precision as a batch of one, which XLA:CPU lays out with a
  transposed for the library (as a 2-D dot contracting dim 0 of both it runs it in float32)."""
  if a.dtype not in LOW_PRECISION:
    return jnp.matmul(a.T, b, preferred_element_type=out_dtype)
  y = jnp.einsum("bmk,bmn->kn", a[None], b[None], preferred_element_type=jnp.float32)
  return y.astype(out_dtype or a.dtype)
