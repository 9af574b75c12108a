"""Online RL and distillation (issue 26). `losses.py`: advantages, the GRPO family's and PPO's
losses, KL estimators and controllers, distillation divergences."""
