"""What every objective builds on: the named models of a step (`Bound`) and the `Objective`
interface.

An objective's loss is `loss(models, batch) -> (sum, count, aux sums)`: `models` maps slot names
("policy", and "reference" when the objective asks for one) to `Bound` models; the reported
loss is sum / count, and so is every aux metric, so that microbatches and devices combine
exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from models.decoder import Context
from models.handle import ModelHandle, cast_floating
from trainer.data import tokenizer as tokenizer_lib
from trainer.errors import UserError

Batch = dict[str, jax.Array]
STACKS = ("layers", "dense_layers")  # the decoder's scanned layer parameters (Context.layer_dtype)


@dataclasses.dataclass(frozen=True)
class Bound:
  """A named model of the step bound to its parameters. With an `rng` (a training step of a
  model that trains) its forward pass adds NEFTune noise on the input embeddings (with
  `neftune_alpha`) and keeps lora's low-rank path apart from the weights (with its dropout).
  `aux`: where its forward passes leave the decoder's aux sums (models/ffn.py), for the step to
  add to the loss and the metrics; None for models whose aux nobody reads (a reference).
  `stack`: how its decoder runs the layer stack in a pipelined step (parallel/pipeline.py)."""
  handle: ModelHandle
  params: Any
  compute_dtype: Any
  rng: Any = None
  neftune_alpha: float = 0.0
  aux: list | None = None
  stack: Any = None  # a pipeline's stack of layers (models/decoder.py Context.stack)

  def forward(self, batch: Batch, shared_prompt: int = 0):
    """(module, final hidden states) of the batch's rows. `shared_prompt`: answers per prompt
    of rows laid out as trainer/data/pairs.py does (2: preference pairs)."""
    params, layer_dtype = self.params, None
    if self.handle.peft is None and self.handle.quant is None and \
        jnp.dtype(self.compute_dtype) != jnp.float32:  # the layer stack cast inside its scan
      layer_dtype = self.compute_dtype
      params = {k: v if k in STACKS else cast_floating(v, layer_dtype) for k, v in params.items()}
    else:
      params = cast_floating(params, self.compute_dtype)
    model = self.handle.bind(params)
    noise = (self.rng, self.neftune_alpha) if self.neftune_alpha and self.rng is not None else None
    dropout = None
    peft = self.handle.peft
    if self.rng is not None and peft is not None and peft.splits_in_training:
      dropout = jax.random.fold_in(self.rng, 2)
    router = None if self.rng is None else jax.random.fold_in(self.rng, 3)
    hidden, aux = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"],
                                Context(embed_noise=noise, shared_prompt=shared_prompt,
                                        dropout_rng=dropout, router_rng=router,
                                        stack=self.stack, layer_dtype=layer_dtype))
    if self.aux is not None:
      self.aux.append(aux)
    return model, hidden

  def frozen(self, params) -> "Bound":
    """The same model with other parameters, no training noise and no aux (a reference)."""
    return Bound(self.handle, params, self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class Model:
  """A model an objective adds to the run besides the policy and its frozen copies (PPO's
  critic and reward model, a distillation teacher): its slot `name`, where its weights start
  (`source`: a training run's folder, its newest checkpoint; `hf:DIR`, a Hugging Face folder;
  "": the policy's starting weights), whether it carries a score head instead of the LM head
  (`value_head`; a run's folder says its own), and `lr`: > 0 trains it with an optimizer of
  its own at that peak rate (train.lr_schedule), 0 keeps it frozen. `key`: the config key that
  named it (for errors)."""
  name: str
  source: str = ""
  value_head: bool = False
  lr: float = 0.0
  key: str = ""

  @property
  def hf(self) -> bool:
    return self.source.startswith("hf:")

  @property
  def folder(self) -> str:
    """The folder its weights come from ("" for the policy's)."""
    return self.source[3:] if self.hf else self.source


def require_same_tokenizer(folder: str, ours, key: str) -> None:
  """One line naming `key` unless the tokenizer kept in `folder` (a run's or a Hugging Face
  folder) is the run's own: the same vocabulary size and the same ids for texts spanning the
  vocabulary (each the decoding of 16 consecutive ids)."""
  try:
    theirs = tokenizer_lib.load(folder)
  except (OSError, ValueError) as e:
    raise UserError(f"config key {key}: no tokenizer in {folder} ({e})") from None
  texts = [ours.decode(list(range(i, min(i + 16, ours.vocab_size))))
           for i in range(0, ours.vocab_size, 16)]
  if theirs.vocab_size != ours.vocab_size or any(theirs.encode(t) != ours.encode(t)
                                                 for t in texts):
    raise UserError(f"config key {key}: the model in {folder} has another tokenizer than the "
                    "run's; train it from the same one (or give the run data.tokenizer=its file)")


@dataclasses.dataclass(frozen=True)
class Prepare:
  """What an objective's `prepare` hook gets: the run's data (whose rows it may extend), its
  models bound to their current parameters, the step it starts from, the workdir, this
  process's shard of the rows, the batch size, how a host batch is placed on the mesh, and a
  logger (process 0 prints)."""
  data: Any
  models: dict[str, Bound]
  step: int
  workdir: str
  shard: tuple[int, int]
  batch_size: int
  place: Any
  log: Any


class Objective:
  """One training objective. Subclasses set `name`, build themselves from the run config
  (`from_config`) and give `loss`; the rest has defaults.

  `pairs`: batches hold preference pairs (shared-prompt rows, trainer/data/pairs.py).
  `frozen_models()`: frozen models the state keeps for this objective, {slot: slot whose starting
  parameters it copies}, e.g. DPO's reference. `prepare(...)`: work before the first step (DPO's
  precomputed reference log-probs); it may attach columns to the rows. `online` objectives (RL)
  make each step's batch themselves (`rollout`), one rollout for `iterations` consecutive steps.
  `needs_reference`: its loss runs a frozen reference model in every step (`reference`).
  `models()`: further models of the run (`Model`: PPO's critic and reward model)."""
  name = ""
  pairs = False
  online = False  # its batches are made each step by `rollout` (RL), not read from the data
  iterations = 1  # online: the train steps (optimizer updates) each rollout feeds
  needs_reference = False

  @classmethod
  def from_config(cls, cfg) -> "Objective":
    return cls()

  @classmethod
  def problems(cls, cfg) -> list[tuple[str, str]]:
    """(config key, what is wrong) for each of this objective's own settings that is invalid."""
    del cfg
    return []

  def frozen_models(self, peft) -> dict[str, str]:
    # the reference is a frozen copy of the starting policy; with PEFT it is the policy with its
    # adapters switched off (`reference`): nothing to keep
    return {"reference": "policy"} if self.needs_reference and peft is None else {}

  def models(self) -> tuple[Model, ...]:
    return ()

  def reference(self, models: dict[str, Bound]) -> Bound:
    """The frozen reference model of `needs_reference` objectives."""
    if "reference" in models:
      return models["reference"]
    policy = models["policy"]
    return policy.frozen(policy.handle.peft.reference_params(policy.params))

  def annotate(self, batch: Batch) -> Batch:
    """Columns computed from the rows as packed, before the step may reorder positions (ring
    attention's load-balancing layout)."""
    return batch

  def loss(self, models: dict[str, Bound], batch: Batch):
    raise NotImplementedError

  def prepare(self, run: Prepare) -> None:
    del run

  def rollout(self, models: dict[str, Bound], step: int, compute_dtype,
              previous: dict | None = None) -> tuple[dict, dict]:
    """An online objective's batch for train step `step` (from 1), made with its models'
    current parameters: (host arrays, metrics to log). `previous`: the last rollout's batch
    (None for the first), for what carries over between rollouts (PPO's KL coefficient)."""
    raise NotImplementedError

  def batch_shapes(self, rows: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """An online objective's rollout batch of `rows` rows: (shape, dtype) of each column. The
    train state keeps the current rollout (checkpointed: a run resumed between two of its
    `iterations` steps goes on with the same batch)."""
    raise NotImplementedError
