"""Logical axis names -> mesh axes.

Model code names every dimension with a logical name (`batch, length, embed, heads, kv_heads,
head_dim, mlp, vocab, expert, layers`). A strategy is a rules table mapping each logical name to
a mesh axis (or a tuple of axes, or None for replicated). Nothing else in the project knows how
an array is laid out.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "expert", "layers")

Rules = dict[str, str | tuple[str, ...] | None]

# Both `data` and `fsdp` split the batch: fsdp is data parallelism whose state is sharded too.
_BATCH = ("data", "fsdp")


def dp() -> Rules:
  """Plain data parallelism: the batch is split, every parameter is replicated."""
  return {"batch": _BATCH}


def fsdp() -> Rules:
  """ZeRO-3: parameters (and so gradients and optimizer state) sharded over `fsdp`."""
  return {"batch": _BATCH, "embed": "fsdp"}


PRESETS = {"dp": dp, "fsdp": fsdp}


def preset(name: str) -> Rules:
  if name not in PRESETS:
    raise ValueError(f"mesh.strategy={name!r} is not one of {', '.join(PRESETS)}")
  return PRESETS[name]()


def spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None) -> P:
  """PartitionSpec for a tuple of logical names. A mesh axis is used at most once per array;
  axes of size 1 are dropped so that specs stay readable."""
  used: set[str] = set()
  out = []
  for name in names:
    axes = rules.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def sharding(names: Sequence[str | None], mesh: Mesh, rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, spec(names, rules, mesh))


# Activation constraints: the trainer activates (mesh, rules) around tracing the model; outside
# that context `constrain` is a no-op, so models run unchanged in tests and notebooks.
_ctx = threading.local()


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  prev = getattr(_ctx, "value", None)
  _ctx.value = (mesh, rules)
  try:
    yield
  finally:
    _ctx.value = prev


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  active = getattr(_ctx, "value", None)
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, sharding(names, mesh, rules))
