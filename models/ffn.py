"""The feed-forward block of each decoder layer, built by name from the ModelConfig.

    ffn = make_ffn(cfg, run, rngs)        # Block's `mlp`: FFNS[ffn_kind(cfg)](cfg, run, rngs)
    out, aux = apply(ffn, x_btd, deltas)  # what Block calls

An FFN is an nnx.Module built as `cls(cfg, run, rngs)` (run: the Execution) whose call `ffn(x_btd, deltas=None)` returns
its output (batch, length, embed), or (output, aux): aux a dict of scalar sums for this layer
(router losses, load metrics). The decoder sums each key over the layers and hands the sums out
of its layer scan (`Decoder.forward`). Keys ending in `_loss` are auxiliary losses already
multiplied by their config weight: the trainer adds them to the loss. Every key is logged as a
metric. `deltas` are PEFT's activation-space deltas of its projections (see layers.project).

Only the dense gated MLP exists now; a mixture of experts registers here and `ffn_kind` picks
it from the ModelConfig's expert fields.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.config import Execution, ModelConfig
from models.layers import MLP

FFNS: dict[str, type] = {"mlp": MLP}


def ffn_kind(cfg: ModelConfig) -> str:
  """The name in FFNS of the block `cfg` describes."""
  del cfg  # one kind so far: the choice will read the expert fields
  return "mlp"


def make_ffn(cfg: ModelConfig, run: Execution, rngs: nnx.Rngs) -> nnx.Module:
  return FFNS[ffn_kind(cfg)](cfg, run, rngs)


def apply(ffn, x_btd, deltas=None) -> tuple:
  """(output, aux) of an FFN, aux as float32 scalars ({} for an FFN that returns none)."""
  out = ffn(x_btd, deltas)
  out, aux = out if isinstance(out, tuple) else (out, {})
  return out, {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
