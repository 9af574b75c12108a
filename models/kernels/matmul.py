"""The three 2-D products of a matmul's forward and backward pass, written for XLA:CPU.

    mm(a, b)     a (m, k) @ b (k, n)
    mm_nt(a, b)  a (m, n) @ b (k, n)^T
    mm_tn(a, b)  a (m, k)^T @ b (m, n)

For bfloat16 / float16 operands each is written in the one form XLA:CPU hands to its matmul
library (YNNPACK, which runs bf16 on AMX and AVX512-BF16 where the host has them): low-precision
operands, a float32 result (then rounded to `out_dtype`, default a's dtype), and a layout the
library takes. The forms JAX writes otherwise, a bf16 result or a^T @ b contracting the rows of
both operands in place, XLA:CPU runs in float32 on its own, 2-7x slower on a Sapphire Rapids
host (benchmarks/matmul_cpu.py). Other dtypes: the plain product, as `@` writes it.

The forms are used where they pay: on CPU hosts with bf16 instructions (AMX-BF16 or
AVX512-BF16 in /proc/cpuinfo), `library_forms()`. Elsewhere, accelerators and CPUs without
them (AMD Zen 3, say), the low-precision products are the plain ones too, as before the forms
existed; `FORMS` (True / False) overrides the check (tests run both), and so does the
environment variable JAXTRAIN_MATMUL_FORMS=1 / 0 (benchmarks compare the two on one host).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of hosts the forms are for
FORMS: bool | None = None  # None: library_forms() decides from the backend and the host
ENV = "JAXTRAIN_MATMUL_FORMS"  # "1" / "0": forms on / off whatever the host


def library_forms() -> bool:
  """Whether low-precision products take the library forms: FORMS when set, else
  JAXTRAIN_MATMUL_FORMS when set, else on CPU hosts whose /proc/cpuinfo lists bf16
  instructions."""
  if FORMS is not None:
    return FORMS
  env = os.environ.get(ENV, "").strip()
  if env in ("0", "1"):
    return env == "1"
  return jax.default_backend() == "cpu" and _host_has_bf16()


@functools.cache
def _host_has_bf16() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return any(flag in line.split() for flag in BF16_FLAGS)
  except OSError:
    pass
  return False


def _forms(a) -> bool:
  return a.dtype in LOW_PRECISION and library_forms()


def mm(a, b, out_dtype=None):
  """a (m, k) @ b (k, n)."""
  if not _forms(a):
    return jnp.matmul(a, b, preferred_element_type=out_dtype)
  return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(out_dtype or a.dtype)


def mm_nt(a, b, out_dtype=None):
  """a (m, n) @ b (k, n)^T, b's contracting dim left in place."""
  if not _forms(a):
    return jnp.matmul(a, b.T, preferred_element_type=out_dtype)
  y = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return y.astype(out_dtype or a.dtype)


def mm_tn(a, b, out_dtype=None):
  """a (m, k)^T @ b (m, n): for low precision as a batch of one, which XLA:CPU lays out with a
  transposed for the library (as a 2-D dot contracting dim 0 of both it runs it in float32)."""
  if not _forms(a):
    return jnp.matmul(a.T, b, preferred_element_type=out_dtype)
  y = jnp.einsum("bmk,bmn->kn", a[None], b[None], preferred_element_type=jnp.float32)
  return y.astype(out_dtype or a.dtype)
