"""dpo: preference pairs (`dpo.loss`): sigmoid DPO with label smoothing (cDPO), IPO, and the
reference-free SimPO and ORPO.

The reference model is the starting parameters, kept frozen in the state ("reference" slot) with
full fine-tuning, or the policy with its adapters switched off with PEFT; with
`dpo.precompute_ref` its log-probs of every pair are computed once before training (`prepare`)
and each batch brings them, so that no step runs it.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from models import safetensors_io
from trainer import losses
from trainer.data import pairs as pair_rows, pipeline
from trainer.errors import UserError
from trainer.objectives import pairwise
from trainer.objectives.base import Bound, Objective

LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")  # no reference model


def log1mexp(x):
  """log(1 - exp(x)) for x < 0, stable at both ends."""
  return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def preference_losses(kind: str, pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta: float,
                      label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
  """Per-pair (losses, chosen rewards, rejected rewards) from summed answer log-probs of the
  policy (pi) and reference (ref; ignored by the reference-free losses) and the answers' token
  counts n. As TRL: DPO sigmoid with label smoothing eps is
  -(1-eps) log s(beta z) - eps log s(-beta z), z the difference of log-ratios; IPO
  (z' - 1/(2 beta))^2 with z' from per-token averages; SimPO the smoothed sigmoid of
  beta (avg_c - avg_r) - gamma; ORPO -beta log s(log-odds(avg_c) - log-odds(avg_r)) (its NLL term
  is added by the caller). Rewards: beta (pi - ref), or beta avg for the reference-free ones."""
  smoothed = lambda z: (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * z)
                        - label_smoothing * jax.nn.log_sigmoid(-beta * z))
  if kind == "sigmoid":
    ratio_c, ratio_r = pi_c - ref_c, pi_r - ref_r
    return smoothed(ratio_c - ratio_r), beta * ratio_c, beta * ratio_r
  if kind == "ipo":
    ratio_c, ratio_r = pi_c - ref_c, pi_r - ref_r
    z = ratio_c / jnp.maximum(n_c, 1.0) - ratio_r / jnp.maximum(n_r, 1.0)
    return (z - 1.0 / (2.0 * beta)) ** 2, beta * ratio_c, beta * ratio_r
  avg_c, avg_r = pi_c / jnp.maximum(n_c, 1.0), pi_r / jnp.maximum(n_r, 1.0)
  if kind == "simpo":
    return smoothed(avg_c - avg_r - simpo_gamma / beta), beta * avg_c, beta * avg_r
  if kind == "orpo":
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    return -beta * jax.nn.log_sigmoid(log_odds), beta * avg_c, beta * avg_r
  raise ValueError(f"dpo.loss={kind!r} is not one of {', '.join(LOSSES)}")


def answer_logps(model: Bound, batch):
  """(chosen, rejected), each (batch, pairs): the summed log-probs of each preference pair's
  answer tokens under `model`."""
  module, hidden = model.forward(batch, shared_prompt=pair_rows.ANSWERS)
  logp = -losses.token_nll(module.logits(hidden), batch["targets"]) * batch["weights"]
  return pairwise.pair_sums(logp, batch["segment_ids"],
                            pairwise.max_pairs(batch["inputs"].shape[1]))


@dataclasses.dataclass(frozen=True)
class DPO(Objective):
  name = "dpo"
  pairs = True
  kind: str = "sigmoid"  # dpo.loss: one of LOSSES
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  precompute_ref: bool = False

  @classmethod
  def from_config(cls, cfg) -> "DPO":
    d = cfg.dpo
    return cls(d.loss, d.beta, d.label_smoothing, d.simpo_gamma, d.precompute_ref)

  @classmethod
  def problems(cls, cfg) -> list[tuple[str, str]]:
    d, out = cfg.dpo, []
    if d.loss not in LOSSES:
      out.append(("dpo.loss", f"{d.loss!r} is not one of {', '.join(LOSSES)}"))
    if not d.beta > 0:
      out.append(("dpo.beta", f"must be positive, got {d.beta}"))
    if not 0 <= d.label_smoothing < 0.5:
      out.append(("dpo.label_smoothing", f"must be in [0, 0.5), got {d.label_smoothing}"))
    if d.precompute_ref and d.loss in REFERENCE_FREE:
      out.append(("dpo.precompute_ref", f"dpo.loss={d.loss} uses no reference model"))
    return out

  @property
  def needs_reference(self) -> bool:
    """A reference model's log-probs in every step (no precomputation)."""
    return self.kind not in REFERENCE_FREE and not self.precompute_ref

  def loss(self, models, batch):
    seg, w = batch["segment_ids"], batch["weights"]
    n_pairs = pairwise.max_pairs(batch["inputs"].shape[1])
    model, hidden = models["policy"].forward(batch, shared_prompt=pair_rows.ANSWERS)
    nll = losses.token_nll(model.logits(hidden), batch["targets"])
    pi_c, pi_r = pairwise.pair_sums(-nll * w, seg, n_pairs)
    n_c, n_r = pairwise.pair_sums(w, seg, n_pairs)
    if self.kind in REFERENCE_FREE:
      ref_c = ref_r = jnp.zeros_like(pi_c)
    elif self.precompute_ref:
      ref_c, ref_r = pairwise.pair_sums(batch["reference"], seg, n_pairs)
    else:
      ref_c, ref_r = jax.lax.stop_gradient(answer_logps(self.reference(models), batch))
    losses_, reward_c, reward_r = preference_losses(
        self.kind, pi_c, pi_r, ref_c, ref_r, n_c, n_r, self.beta, self.label_smoothing,
        self.simpo_gamma)
    if self.kind == "orpo":  # plus the chosen answer's token-mean NLL
      losses_ = losses_ - pi_c / jnp.maximum(n_c, 1.0)
    return pairwise.pair_metrics(losses_, reward_c, reward_r, (n_c > 0) & (n_r > 0))

  def prepare(self, run) -> None:
    if self.precompute_ref:
      reference_tables(run)


def reference_tables(run) -> None:
  """dpo.precompute_ref: the reference model's log-probs of every training and eval pair's two
  answers, computed in one pass before training and attached to the rows (each batch then
  brings them), so that no step runs the reference model. Saved in the workdir: a resumed run
  (whose parameters have moved) reads them back."""
  data, policy = run.data, run.models["policy"]
  path = os.path.join(run.workdir, "reference_logps.safetensors")
  if os.path.exists(path):
    saved = safetensors_io.SafetensorsFile(path)
    data.train.reference, data.eval.reference = saved.get("train"), saved.get("eval")
    return
  peft = policy.handle.peft
  if run.step != 0 and peft is None:  # (PEFT: the adapters switched off)
    raise UserError(f"{path} is missing and the run is past step 0: the reference model (the "
                    "starting parameters) is gone; start a new workdir")
  reference = policy if peft is None else policy.frozen(peft.reference_params(policy.params))

  @jax.jit
  def per_pair(params, batch):
    k = pairwise.max_pairs(batch["inputs"].shape[1])
    seg = batch["segment_ids"]
    first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
    examples = pairwise.pair_sums(jnp.where(first, batch["example"] + 1, 0), seg, k)[0] - 1
    return (*answer_logps(reference.frozen(params), batch), examples)

  t0 = time.perf_counter()
  tables = {}
  for name, rows in (("train", data.train), ("eval", data.eval)):
    table = np.zeros((len(rows.examples), 2), np.float32)
    once = pipeline.batches(pipeline.single_pass(rows), run.batch_size, shard=run.shard,
                            repeat=False)
    for i in range(len(once)):
      out = per_pair(reference.params, run.place(once[i]))
      chosen, rejected, examples = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                                    for x in out)
      seen = examples >= 0
      table[examples[seen]] = np.stack([chosen[seen], rejected[seen]], axis=-1)
    tables[name] = table
  data.train.reference, data.eval.reference = tables["train"], tables["eval"]
  if jax.process_index() == 0:
    safetensors_io.write(path, list(tables.items()))
  run.log(f"reference log-probs of {sum(len(t) for t in tables.values())} pairs: "
          f"{time.perf_counter() - t0:.1f}s")
