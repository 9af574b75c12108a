"""ppo: RLHF with four models (actor, critic, frozen reference, reward), on the project's own
rollouts.

The models are slots of the train state (trainer/state.py): the `policy` (the actor: full or
PEFT), the `critic` (a decoder with a score head in place of the LM head, trained by an
optimizer of its own at `rl.critic_lr`; it starts from the reward model's weights, as is usual,
or from the policy's with a zero head: `rl.critic`), the frozen `reference` (a copy of the
starting policy; with PEFT the policy with its adapters switched off, so no copy) and, with
`rl.reward_model` (the folder of a `train.objective=reward` run), the frozen `reward` model.
Without one the score is `rl.reward` (a Python function: trainer/objectives/grpo.py).

Each rollout (grpo.py's prompt stream, sampler and row layout; `rl.group_size` completions per
prompt, 1 is plain PPO) is then scored in one jitted pass: the reference's log-probs of the
sampled tokens, the critic's values before each token and the reward model's score of each
completion (at its last token, as it was trained). A reward model's scores have no scale of
their own (the Bradley-Terry loss fixes only their differences; two reward models trained alike
on two hosts spread their scores a factor of 2 apart), so with `rl.normalize_reward` they are
standardised by the mean and standard deviation of the first rollout's scores (the starting
policy's replies, as Ziegler et al. 2019 normalise theirs), fixed for the run and carried in the
state's copy of each rollout: the KL coefficient and the value clip then mean the same for any
reward model. A critic that starts from the reward model reads its values through the same
map, so that they start in the rewards' units. Per-token rewards are -kl_coef x (log-prob -
reference log-prob) with the score added at the last token; GAE (`rl.gamma`, `rl.lam`) gives
advantages (whitened over the rollout) and returns. The KL coefficient is fixed, or adaptive
(`rl.kl_target`, Ziegler et al.): each rollout moves it by the previous rollout's KL, which the
state's copy of that rollout carries (so a resumed run continues it exactly). Each rollout feeds
`rl.iterations` train steps; each step's loss is the clipped policy loss (`rl.eps_low`) plus
`rl.vf_coef` x the clipped value loss (`rl.cliprange_value`) less `rl.entropy_coef` x the
entropy, as TRL's PPO had it; one backward pass gives both the actor's and the critic's
gradients, and each slot's optimizer steps on its own.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from trainer.objectives.base import Bound, Model, require_same_tokenizer
from trainer.objectives.grpo import GRPO, at_completions
from trainer.objectives.lm import LM
from trainer.rl import losses

CRITIC_INIT = ("reward", "policy")  # rl.critic: where the critic's weights start


def standardised(x, norm):
  """x in units of a reward model's first-rollout statistics `norm` = (mean, std)."""
  return (x - norm[0]) / norm[1]


@dataclasses.dataclass
class PPO(GRPO):
  name = "ppo"
  finished_turns = True
  reward_model: str = ""
  critic: str = "reward"
  critic_lr: float = 1e-4
  gamma: float = 1.0
  lam: float = 0.95
  vf_coef: float = 0.1
  cliprange: float = 0.2
  cliprange_value: float = 0.2
  entropy_coef: float = 0.0
  kl: losses.KlController = dataclasses.field(default_factory=lambda: losses.KlController(0.05))
  whiten: bool = True
  missing_stop_penalty: float = 0.0
  normalize_reward: bool = True

  @classmethod
  def from_config(cls, cfg) -> "PPO":
    r = cfg.rl
    return cls(**GRPO.fields_of(cfg), reward_model=r.reward_model, critic=r.critic,
               critic_lr=r.critic_lr or cfg.train.lr, gamma=r.gamma, lam=r.lam,
               vf_coef=r.vf_coef, cliprange=r.eps_low, cliprange_value=r.cliprange_value,
               entropy_coef=r.entropy_coef,
               kl=losses.KlController(r.kl_coef, r.kl_target, r.kl_horizon),
               whiten=r.whiten_advantages, missing_stop_penalty=r.missing_stop_penalty,
               normalize_reward=r.normalize_reward)

  @classmethod
  def problems(cls, cfg) -> list[tuple[str, str]]:
    r = cfg.rl
    out = [(k, m) for k, m in GRPO.problems(cfg) if k != "rl.group_size"]
    out = [(k, m.replace("grpo", "ppo")) for k, m in out]
    if r.group_size < 1:
      out.append(("rl.group_size", f"{r.group_size}: at least one completion per prompt"))
    if r.critic not in CRITIC_INIT:
      out.append(("rl.critic", f"{r.critic!r} is not one of {', '.join(CRITIC_INIT)}"))
    if r.reward_model:
      path = os.path.join(r.reward_model, "config.json")
      try:
        with open(path) as f:
          objective = json.load(f)["train"]["objective"]
      except (OSError, ValueError, KeyError) as e:
        out.append(("rl.reward_model", f"{r.reward_model!r} is not a training run's folder "
                    f"({e})"))
      else:
        if objective != "reward":
          out.append(("rl.reward_model", f"{r.reward_model} trained train.objective="
                      f"{objective}, not a reward model (train.objective=reward)"))
    elif r.critic == "reward":
      out.append(("rl.critic", "starts from the reward model: set rl.reward_model, or "
                  "rl.critic=policy"))
    if not 0 < r.gamma <= 1 or not 0 <= r.lam <= 1:
      out.append(("rl.gamma", f"gamma {r.gamma} must be in (0, 1] and rl.lam {r.lam} in [0, 1]"))
    for key in ("vf_coef", "cliprange_value", "entropy_coef", "kl_coef", "kl_target",
                "critic_lr", "missing_stop_penalty"):
      if r[key] < 0:
        out.append((f"rl.{key}", f"{r[key]} must be >= 0"))
    if r.kl_horizon < 1:
      out.append(("rl.kl_horizon", f"{r.kl_horizon} must be >= 1"))
    return out

  @property
  def normalizes(self) -> bool:
    """Whether a reward model's scores are standardised (`rl.normalize_reward`)."""
    return bool(self.reward_model) and self.normalize_reward

  @property
  def needs_reference(self) -> bool:
    return bool(self.kl.coef or self.kl.target)

  def models(self) -> tuple[Model, ...]:
    critic = Model("critic", self.reward_model if self.critic == "reward" else "",
                   value_head=True, lr=self.critic_lr, key="rl.reward_model")
    reward = Model("reward", self.reward_model, key="rl.reward_model")
    return (critic, reward) if self.reward_model else (critic,)

  # -- rollouts -------------------------------------------------------------------------------

  def prepare(self, run) -> None:
    super().prepare(run)
    if self.reward_model:  # it must read the prompts and replies as the policy writes them
      require_same_tokenizer(self.reward_model, run.data.tokenizer, "rl.reward_model")

  def _scorer(self, models: dict[str, Bound], compute_dtype):
    """jit(params by slot, batch) -> (reference log-probs, critic values) at the gathered
    positions and the reward model's scores at the completions' last tokens (or None)."""
    key = ("scorer", str(compute_dtype))
    if key not in self.state:
      handles = {k: b.handle for k, b in models.items()}

      def score(params, batch):
        bound = {k: Bound(handles[k], p, compute_dtype) for k, p in params.items()}
        take = lambda x: at_completions(x, batch["gather"])
        ref = None
        if self.needs_reference:
          ref = take(self.token_logps(self.reference(bound), batch)[0])
        critic, hidden = bound["critic"].forward(batch, shared_prompt=self.group)
        values = take(critic.values(hidden))
        scores = None
        if "reward" in bound:
          rm, hidden = bound["reward"].forward(batch, shared_prompt=self.group)
          scores = jnp.take_along_axis(rm.values(hidden), batch["last"], axis=1).reshape(-1)
        return ref, values, scores

      self.state[key] = jax.jit(score)
    return self.state[key]

  def rollout(self, models: dict[str, Bound], step: int, compute_dtype,
              previous: dict | None = None) -> tuple[dict, dict]:
    L = self.max_new_tokens
    chosen, outs, logps, checked, lengths = self.sample(models["policy"], step, compute_dtype)
    stopped = np.array([len(o) > 0 and o[-1] == self.state["stop"] for o in outs])
    # a finished reply is read by the reward model as it was trained: a whole turn
    host = self.layout(chosen, outs, logps, [self.state["suffix"] if s else [] for s in stopped])
    rows, c = host["last"].shape
    coef = self.kl.coef
    if previous is not None:  # the adaptive controller, from the previous rollout's KL
      coef = float(self.kl.update(np.float32(previous["kl_coef"][0, 0]),
                                  np.float32(previous["kl"][0, 0]), len(outs)))
    params = {k: b.params for k, b in models.items()}
    ref, values, scores = jax.device_get(self._scorer(models, compute_dtype)(
        params, {k: jnp.asarray(v) for k, v in host.items()}))
    raw = scores
    if scores is None:
      scores = checked.copy()
    elif self.normalizes:  # by the first rollout's statistics (module docstring)
      if previous is None:
        norm = np.array([scores.mean(), max(scores.std(), 1e-6)], np.float32)
      else:
        norm = np.asarray(previous["score_norm"][0], np.float32)
      host["score_norm"] = np.tile(norm, (rows, 1))
      scores = standardised(scores, norm)
      if self.critic == "reward":
        values = standardised(values, norm)
    scores = scores - self.length_penalty * lengths / L
    scores = scores - self.missing_stop_penalty * ~stopped  # a reply cut off at the limit
    mask = host["gather_mask"].reshape(rows * c, L)
    old = host["old_logps"].reshape(rows * c, L)
    rewards, kl = jax.device_get(losses.ppo_rewards(old, old if ref is None else ref, mask,
                                                    scores, coef))
    adv, returns = losses.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                              self.gamma, self.lam)
    if self.whiten:
      adv = losses.masked_whiten(adv, jnp.asarray(mask)) * mask
    shaped = lambda x: np.asarray(x, np.float32).reshape(rows, c, L)
    host.update(advantages=shaped(adv), returns=shaped(returns),
                old_values=shaped(np.asarray(values) * mask),
                kl_coef=np.full((rows, 1), coef, np.float32),
                kl=np.full((rows, 1), kl.sum(1).mean(), np.float32))
    metrics = {"reward": float(scores.mean()), "accuracy": float(checked.mean()),
               "kl": float(kl.sum(1).mean()), "kl_coef": coef,
               "non_score_reward": float(rewards.sum(1).mean() - scores.mean()),
               "value": float((values * mask).sum() / mask.sum()),
               "response_length": float(lengths.mean()), "stopped": float(stopped.mean())}
    if raw is not None:  # the reward model's own score, before normalising and penalties
      metrics["reward_model_score"] = float(raw.mean())
    return host, metrics

  def batch_shapes(self, rows: int):
    out = super().batch_shapes(rows)
    c, L = self.groups_per_row * self.group, self.max_new_tokens
    out.update(advantages=((rows, c, L), np.float32), returns=((rows, c, L), np.float32),
               old_values=((rows, c, L), np.float32), kl_coef=((rows, 1), np.float32),
               kl=((rows, 1), np.float32))
    if self.normalizes:
      out["score_norm"] = ((rows, 2), np.float32)  # the reward model's score mean and std
    return out

  # -- loss -----------------------------------------------------------------------------------

  def loss(self, models, batch):
    if "gather" not in batch:  # evaluation: the NLL of the held-out replies
      return LM().loss(models, batch)
    b, c, L = batch["gather"].shape
    take = lambda x: at_completions(x, batch["gather"])
    flat = lambda k: batch[k].reshape(b * c, L)
    mask = flat("gather_mask")
    count = mask.sum()
    logps, logits = self.token_logps(models["policy"], batch)
    pg, pm = losses.ppo_policy_loss(take(logps), flat("old_logps"), flat("advantages"), mask,
                                    self.cliprange)
    critic, hidden = models["critic"].forward(batch, shared_prompt=self.group)
    values = critic.values(hidden)
    if self.normalizes and self.critic == "reward":  # module docstring
      values = standardised(values, batch["score_norm"][0])
    vf, vm = losses.ppo_value_loss(take(values), flat("old_values"),
                                   flat("returns"), mask, self.cliprange_value)
    ent = losses.masked_mean(take(losses.entropy(logits)), mask)
    loss = pg + self.vf_coef * vf - self.entropy_coef * ent
    aux = {"policy_loss": pg, "value_loss": vf, "entropy": ent, **pm, **vm}
    return count * loss, count, {k: count * v for k, v in aux.items()}
