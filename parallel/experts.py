"""Expert parallelism: a mixture of experts' experts split over the `expert` mesh axis, tokens
sent to the devices holding their experts and back by all-to-all inside `shard_map`."""

from __future__ import annotations

from parallel import rules as rules_lib

AXIS = "expert"


def expert_parallel_size() -> int:
  """Devices along the `expert` axis of the active mesh (1 without one)."""
  active = rules_lib.active()
  return 1 if active is None else active[0].shape[AXIS]


def routed(cfg, run, x_td, ids_tk, weights_tk, w, act):
  raise NotImplementedError("expert parallelism: not built yet")
