"""Meshes and sharding rules. Imports nothing from `models/` or `trainer/`."""

from parallel.mesh import AXES, make_mesh, resolve_axis_sizes
from parallel.rules import LOGICAL_AXES, Strategy, activate, constrain, sharding, spec, strategy
