"""distill: knowledge distillation from a frozen teacher into the policy (the student), on the
teacher's full distribution of next tokens.

The teacher (`distill.teacher`: a training run's folder or `hf:DIR`, any model the project loads;
it must share the run's tokenizer) is a frozen slot of the state. The loss per token is the
generalized Jensen-Shannon divergence of GKD (trainer/rl/losses.py) between the student's and the
teacher's softmax(logits / `distill.temperature`): `distill.loss` = forward_kl (KL(teacher ||
student), classic distillation, beta 0), reverse_kl (KL(student || teacher), beta 1) or jsd
(`distill.beta` in between).

Off-policy (the default) it is taken on the data's rows, over the tokens the data weights (all
of a text, a chat's assistant turns). On-policy (`distill.on_policy`) the student samples replies
to the chats' prompts each step (grpo.py's prompt stream, sampler and row layout, with the `rl`
section's sampling settings: rl.prompts, rl.group_size, rl.max_new_tokens, rl.temperature, ...)
and the loss is taken on the sampled tokens, as GKD does with lambda 1. Evaluation is the loss on
the held-out rows; `student_nll` is logged beside it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from trainer import losses as token_losses
from trainer.objectives.base import Model, require_same_tokenizer
from trainer.objectives.grpo import GRPO, at_completions
from trainer.rl import losses

KINDS = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}  # distill.loss -> its beta


@dataclasses.dataclass
class Distill(GRPO):
  name = "distill"
  teacher: str = ""
  beta: float = 0.5
  distill_temperature: float = 1.0
  on_policy: bool = False

  @classmethod
  def from_config(cls, cfg) -> "Distill":
    d = cfg.distill
    beta = KINDS.get(d.loss)
    return cls(**GRPO.fields_of(cfg), teacher=d.teacher, beta=d.beta if beta is None else beta,
               distill_temperature=d.temperature, on_policy=d.on_policy)

  @classmethod
  def problems(cls, cfg) -> list[tuple[str, str]]:
    d, r, out = cfg.distill, cfg.rl, []
    teacher = Model("teacher", d.teacher).folder
    if not teacher or not os.path.isfile(os.path.join(teacher, "config.json")):
      out.append(("distill.teacher", f"{d.teacher!r} is not a training run's folder or hf:DIR "
                  "of a Hugging Face model (no config.json there)"))
    if d.loss not in KINDS:
      out.append(("distill.loss", f"{d.loss!r} is not one of {', '.join(KINDS)}"))
    if not 0 <= d.beta <= 1:
      out.append(("distill.beta", f"{d.beta} must be in [0, 1]"))
    if d.temperature <= 0:
      out.append(("distill.temperature", f"{d.temperature} must be > 0"))
    if d.on_policy:
      keep = ("data.format", "rl.prompts", "rl.max_new_tokens", "rl.temperature", "mesh.stage",
              "train.grad_accum", "rl.overlong_buffer")
      out += [(k, m.replace("train.objective=grpo", "distill.on_policy"))
              for k, m in GRPO.problems(cfg) if k in keep]
      if r.group_size < 1:
        out.append(("rl.group_size", f"{r.group_size}: at least one reply per prompt"))
    return out

  @property
  def online(self) -> bool:
    return self.on_policy

  @property
  def needs_reference(self) -> bool:
    return False

  def models(self) -> tuple[Model, ...]:
    return (Model("teacher", self.teacher, key="distill.teacher"),)

  def prepare(self, run) -> None:
    require_same_tokenizer(self.models()[0].folder, run.data.tokenizer, "distill.teacher")
    if self.on_policy:
      super().prepare(run)

  def batch_shapes(self, rows: int):
    out = super().batch_shapes(rows)
    del out["advantages"]
    return out

  def rollout(self, models, step: int, compute_dtype, previous=None):
    del previous
    chosen, outs, logps, checked, lengths = self.sample(models["policy"], step, compute_dtype)
    return self.layout(chosen, outs, logps), {"accuracy": float(checked.mean()),
                                              "response_length": float(lengths.mean())}

  def loss(self, models, batch):
    shared = self.group if "gather" in batch else 0  # rollout rows: a prompt and its replies
    student, hidden = models["policy"].forward(batch, shared_prompt=shared)
    teacher, t_hidden = models["teacher"].forward(batch, shared_prompt=shared)
    s_logits = student.logits(hidden)
    t_logits = jax.lax.stop_gradient(teacher.logits(t_hidden))
    if "gather" in batch:  # on-policy: the student's sampled tokens
      s_logits, t_logits, targets = (at_completions(x, batch["gather"])
                                     for x in (s_logits, t_logits, batch["targets"]))
      w = batch["gather_mask"].reshape(targets.shape)
    else:
      targets, w = batch["targets"], batch["weights"]
    per_token = losses.generalized_jsd_per_token(s_logits, t_logits, self.beta,
                                                 self.distill_temperature)
    nll = token_losses.token_nll(s_logits, targets)
    return jnp.sum(per_token * w), jnp.sum(w), {"student_nll": jnp.sum(nll * w)}
