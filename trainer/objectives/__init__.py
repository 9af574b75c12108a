"""Training objectives (`train.objective`), one module each, registered in `REGISTRY`.

  lm      every weighted token's NLL (lm.py).
  sft     the same on chat data, per token or per sequence (sft.py).
  dpo     preference pairs: DPO (cDPO), IPO, SimPO, ORPO (dpo.py).
  reward  a scalar score per answer, Bradley-Terry loss (reward.py).
  grpo    online RL: GRPO, Dr. GRPO, DAPO, GSPO on the project's own rollouts (grpo.py).
  ppo     online RL with actor, critic, reference and reward model (ppo.py).
  distill a frozen teacher's distribution: forward / reverse KL, generalized JSD, off- or
          on-policy (distill.py).

An objective is a small class (base.py: `Objective`) whose `loss(models, batch)` gives
(sum, count, aux sums) over the step's named models; trainer/step.py calls it and names none.
To add one: a module here with its class, and its line in `REGISTRY`.
"""

from __future__ import annotations

from trainer.objectives.base import Bound, Model, Objective
from trainer.objectives.distill import Distill
from trainer.objectives.dpo import DPO
from trainer.objectives.grpo import GRPO
from trainer.objectives.lm import LM
from trainer.objectives.ppo import PPO
from trainer.objectives.reward import Reward
from trainer.objectives.sft import SFT

REGISTRY: dict[str, type[Objective]] = {"lm": LM, "sft": SFT, "dpo": DPO, "reward": Reward,
                                        "grpo": GRPO, "ppo": PPO,
                                        "distill": Distill}
OBJECTIVES = tuple(REGISTRY)
DEFAULT = "lm"  # train.objective's default, and a bare loss function's (trainer/step.py)


def default() -> Objective:
  return REGISTRY[DEFAULT]()


def from_config(cfg) -> Objective:
  """The objective `train.objective` names, with its section of the config."""
  return REGISTRY[cfg.train.objective].from_config(cfg)
