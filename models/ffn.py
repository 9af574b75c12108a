"""The feed-forward block of each decoder layer, built by name from the ModelConfig.

    ffn = make_ffn(cfg, run, rngs)        # Block's `mlp`: FFNS[ffn_kind(cfg)](cfg, run, rngs)
    out, aux = apply(ffn, x_btd, deltas)  # what Block calls

An FFN is an nnx.Module built as `cls(cfg, run, rngs)` (run: the Execution) whose call
`ffn(x_btd, deltas=None)` returns its output (batch, length, embed), or (output, aux): aux a dict
of float32 scalars for this layer (router losses, load metrics). An FFN that takes an `rng`
keyword gets one in training steps. The decoder reduces each key over the layers (keys ending in
`_max` by max, `_min` by min, the rest summed) and hands them out of its layer scan
(`Decoder.forward`). Keys ending in `_loss` are auxiliary losses already multiplied by their
config weight: the trainer adds them to the loss. Every key is logged as a metric, except those
ending in `_by_layer`: arrays the decoder keeps per layer, stacked in layer order (layers, ...),
for the train step to use (a mixture of experts' expert loads, which move its routing bias).
`deltas` are PEFT's deltas of its projections (see layers.project).

Kinds: "mlp", the dense gated MLP (models/layers.py), and "moe", a mixture of experts
(models/moe.py); `ModelConfig.layer_kinds()` says which layer is which.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.config import Execution, ModelConfig
from models.layers import MLP
from models.moe import MoE

FFNS: dict[str, type] = {"mlp": MLP, "moe": MoE}


def make_ffn(cfg: ModelConfig, run: Execution, rngs: nnx.Rngs, kind: str = "mlp") -> nnx.Module:
  return FFNS[kind](cfg, run, rngs)


def apply(ffn, x_btd, deltas=None, rng=None) -> tuple:
  """(output, aux) of an FFN, aux as float32 scalars ({} for an FFN that returns none)."""
  out = ffn(x_btd, deltas) if rng is None else ffn(x_btd, deltas, rng=rng)
  out, aux = out if isinstance(out, tuple) else (out, {})
  return out, {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}


PER_LAYER = "_by_layer"  # aux keys kept per layer, not reduced


def reduce_layers(aux_by_layer: dict, axis: int = 0) -> dict:
  """Each aux key over the layers: max for `_max` keys, min for `_min`, the `_by_layer` ones
  kept as they are (stacked along `axis`), else the sum."""
  def one(key, v):
    if key.endswith(PER_LAYER):
      return v
    op = jnp.max if key.endswith("_max") else jnp.min if key.endswith("_min") else jnp.sum
    return op(v, axis=axis)
  return {k: one(k, v) for k, v in aux_by_layer.items()}


def join_runs(auxes: list[dict]) -> dict:
  """The aux of runs of consecutive layers (each already `reduce_layers`'d), in layer order:
  reduced across the runs, the `_by_layer` keys concatenated. Keys in sorted order: the step
  adds the "_loss" ones to the loss in this order, which must not follow the string hash seed."""
  keys = sorted({k for a in auxes for k in a})
  per_layer = {k: jnp.concatenate([a[k] for a in auxes if k in a])
               for k in keys if k.endswith(PER_LAYER)}
  rest = reduce_layers({k: jnp.stack([a[k] for a in auxes if k in a])
                        for k in keys if not k.endswith(PER_LAYER)})
  return {**rest, **per_layer}
