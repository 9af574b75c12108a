"""Logical axis names -> mesh axes.

Model code names every dimension with a logical name (`batch, length, embed, heads, kv_heads,
head_dim, mlp, vocab, expert, layers`). A rules table maps each logical name to a mesh axis (or a
tuple of axes, or None for replicated). A strategy is three tables: for parameters, for their
gradients and for optimizer state; ZeRO-1/2 differ from plain data parallelism only there.
Nothing else in the project knows how an array is laid out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parallel.mesh import AXES

LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "expert", "layers")

Rules = dict[str, str | tuple[str, ...] | None]

# Activations: the batch is split over every data-parallel axis (fsdp is data parallelism whose
# state is sharded too; outside the experts `expert` is data parallelism as well); the sequence
# over `sequence` (context parallelism). A mixture of experts' experts are split over `expert`
# in every preset (parallel/experts.py moves the tokens to them). A mesh axis of size 1 drops
# out, so these rules cost nothing when the axis is not used.
# A stacked layer axis (`layers`) is split over `stage`: each pipeline stage keeps its layers'
# weights, gradients and optimizer state (parallel/pipeline.py).
_ACTIVATIONS: Rules = {"batch": ("data", "fsdp", "expert"), "length": "sequence",
                       "expert": "expert", "layers": "stage"}
# Megatron tensor parallelism: heads and the MLP hidden split (column-parallel q/k/v/gate/up,
# row-parallel o/down), the vocabulary split (embedding and logits).
_TENSOR: Rules = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
# ZeRO: state sharded over all data-parallel devices along the model dimension (the experts'
# own state is already split over `expert`, so theirs goes over the other two).
_ZERO: Rules = {"embed": ("data", "fsdp", "expert")}


@dataclasses.dataclass(frozen=True)
class Strategy:
  params: Rules
  grads: Rules
  opt_state: Rules
  activations: Rules


def _same(rules: Rules) -> Strategy:
  return Strategy(rules, rules, rules, rules)


def dp() -> Strategy:
  """Data parallel: batch split, everything else replicated."""
  return _same(dict(_ACTIVATIONS))


def zero1() -> Strategy:
  """ZeRO-1: optimizer state sharded over the data-parallel devices."""
  base = dict(_ACTIVATIONS)
  return Strategy(base, base, {**base, **_ZERO}, base)


def zero2() -> Strategy:
  """ZeRO-2: gradients and optimizer state sharded; parameters replicated."""
  base = dict(_ACTIVATIONS)
  return Strategy(base, {**base, **_ZERO}, {**base, **_ZERO}, base)


def fsdp() -> Strategy:
  """ZeRO-3 / FSDP: parameters, gradients and optimizer state sharded over `fsdp`."""
  return _same({**_ACTIVATIONS, "embed": "fsdp"})


def fsdp_tp() -> Strategy:
  """FSDP over `fsdp` plus Megatron tensor parallelism over `tensor`."""
  return _same({**_ACTIVATIONS, "embed": "fsdp", **_TENSOR})


def fsdp_tp_sp() -> Strategy:
  """fsdp_tp plus Megatron sequence parallelism: between blocks (where the residual stream is
  not split by heads) the sequence is split over `tensor` too."""
  return _same({**_ACTIVATIONS, "embed": "fsdp", **_TENSOR, "length": ("sequence", "tensor")})


def ep() -> Strategy:
  """Expert parallelism with FSDP: the experts split over `expert`, and every other weight (with
  its gradient and optimizer state) sharded like fsdp over `fsdp` and `expert` together, since
  outside the experts the `expert` axis is data parallelism; an expert's weights go over `fsdp`
  along the model dimension. With mesh.tensor, fsdp_tp keeps its Megatron split and places the
  experts the same way."""
  return _same({**_ACTIVATIONS, "embed": ("fsdp", "expert")})


PRESETS = {"dp": dp, "zero1": zero1, "zero2": zero2, "fsdp": fsdp, "fsdp_tp": fsdp_tp,
           "fsdp_tp_sp": fsdp_tp_sp, "ep": ep}


def parse_rules(text: str) -> Rules:
  """'embed=fsdp,mlp=tensor,vocab=' -> {'embed': 'fsdp', 'mlp': 'tensor', 'vocab': None};
  several axes join with '+': 'batch=data+fsdp'. Names and axes are checked here, so a typo is
  one line about mesh.rules rather than a KeyError deep inside sharding."""
  out: Rules = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, axes = item.partition("=")
    name = name.strip()
    if not sep or name not in LOGICAL_AXES:
      raise ValueError(f"mesh.rules: {item!r} is not NAME=AXIS with NAME one of "
                       f"{', '.join(LOGICAL_AXES)}")
    parts = tuple(a.strip() for a in axes.split("+") if a.strip())
    unknown = [a for a in parts if a not in AXES]
    if unknown:
      raise ValueError(f"mesh.rules: {item!r} names mesh axis {unknown[0]!r}, which is not one of "
                       f"{', '.join(AXES)}")
    out[name] = None if not parts else parts[0] if len(parts) == 1 else parts
  return out


def strategy(name: str, overrides: str = "") -> Strategy:
  """A preset by name, with `mesh.rules` overrides applied to every table."""
  if name not in PRESETS:
    raise ValueError(f"mesh.strategy={name!r} is not one of {', '.join(PRESETS)}")
  s = PRESETS[name]()
  extra = parse_rules(overrides)
  if not extra:
    return s
  return Strategy(*({**table, **extra} for table in dataclasses.astuple(s)))


def spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
         shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for a tuple of logical names.

  A mesh axis is used at most once per array; `length` is served last, so that an axis it shares
  with another name (sequence parallelism over `tensor`) goes to the other name first. Axes of
  size 1 are dropped, and with `shape` given an axis that does not divide its dimension is
  dropped too (that dimension stays whole rather than failing).
  """
  used: set[str] = set()
  out: list = [None] * len(names)
  order = sorted(range(len(names)), key=lambda i: names[i] == "length")
  for i in order:
    axes = rules.get(names[i]) if names[i] is not None else None
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    if shape is not None and mesh is not None:
      while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    used.update(axes)
    out[i] = None if not axes else axes[0] if len(axes) == 1 else axes
  return P(*out)


def sharding(names: Sequence[str | None], mesh: Mesh, rules: Rules,
             shape: Sequence[int] | None = None) -> NamedSharding:
  return NamedSharding(mesh, spec(names, rules, mesh, shape))


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


def active() -> tuple[Mesh, Rules] | None:
  return getattr(_ctx, "value", None)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  current = active()
  if current is None:
    return x
  mesh, rules = current
  inside = jax.sharding.get_abstract_mesh()
  if not inside.empty and inside.manual_axes:
    # inside shard_map (a pipeline stage): the constraint names the context's mesh, whose
    # manual axes (`stage`) no activation rule uses
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(inside, spec(names, rules, mesh, x.shape)))
  return jax.lax.with_sharding_constraint(x, sharding(names, mesh, rules, x.shape))
