"""sft: the lm loss on chat data, normalised per token (every assistant token counts once) or
per sequence (each example's mean token loss counts once: `sft.normalize`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from trainer.objectives.lm import LM

NORMALIZE = ("token", "sequence")


def sequence_sums(x_bt, w_bt, segment_ids_bt):
  """sft per sequence: (sum over segments of their weighted mean of x, number of segments with
  weight)."""
  n = segment_ids_bt.shape[1] + 1
  def row(x, w, seg):
    return (jax.ops.segment_sum(x * w, seg, num_segments=n)[1:],
            jax.ops.segment_sum(w, seg, num_segments=n)[1:])
  sums, counts = jax.vmap(row)(x_bt, w_bt, segment_ids_bt)
  has = counts > 0
  return jnp.sum(jnp.where(has, sums / jnp.where(has, counts, 1.0), 0.0)), jnp.sum(has)


@dataclasses.dataclass(frozen=True)
class SFT(LM):
  name = "sft"
  normalize: str = "token"  # one of NORMALIZE

  @classmethod
  def from_config(cls, cfg) -> "SFT":
    return cls(cfg.sft.normalize)

  @classmethod
  def problems(cls, cfg) -> list[tuple[str, str]]:
    out = []
    if cfg.data.format != "chat":
      out.append(("data.format", "train.objective=sft learns assistant turns: set data.format=chat"))
    if cfg.sft.normalize not in NORMALIZE:
      out.append(("sft.normalize", f"{cfg.sft.normalize!r} is not one of {', '.join(NORMALIZE)}"))
    return out

  def reduce(self, nll, batch):
    if self.normalize == "sequence":
      return (*sequence_sums(nll, batch["weights"], batch["segment_ids"]), {})
    return super().reduce(nll, batch)
