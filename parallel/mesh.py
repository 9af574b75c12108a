"""Device mesh from named axis sizes.

`mesh.stage`, `mesh.data`, `mesh.fsdp`, `mesh.expert`, `mesh.sequence`, `mesh.tensor`: one of
them may be -1, meaning "all devices left over". Axes are laid out outermost (pipeline stages,
which pass one activation per microbatch; data, slowest interconnect is fine) to innermost
(tensor, needs the fastest links), the order MaxText and t5x use too.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

AXES = ("stage", "data", "fsdp", "expert", "sequence", "tensor")


def resolve_axis_sizes(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
  """Fill in the one -1 axis; raise ValueError naming the keys when sizes do not fit."""
  out = {a: int(sizes.get(a, 1)) for a in AXES}
  free = [a for a, s in out.items() if s == -1]
  bad = [a for a, s in out.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f"mesh.{bad[0]}={out[bad[0]]}: axis sizes must be positive or -1")
  if len(free) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {', '.join('mesh.' + a for a in free)}")
  fixed = math.prod(s for s in out.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise ValueError(f"the fixed mesh axes multiply to {fixed}, which does not divide the "
                       f"{n_devices} devices; change mesh.* so their product divides it")
    out[free[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise ValueError(f"mesh axes multiply to {fixed} but there are {n_devices} devices; "
                     "set one axis to -1 or make the product match")
  return out


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  resolved = resolve_axis_sizes(sizes, len(devices))
  shape = tuple(resolved[a] for a in AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # CPU and odd topologies: a plain reshape is as good as anything
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)

