"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): LoRA in SVD form, W + s * P diag(lambda) Q, whose
rank is reallocated during training from the most to the least important matrices.

Per targeted weight and layer: P = `lora_a` (in, r), lambda = `lora_e` (r), Q = `lora_b` (r, out),
s = alpha / r (as PEFT: alpha / (r + 1e-5)); r starts at `init_rank` everywhere. Training
  - adds an orthogonality penalty, `orth_weight` times the mean over matrices of
    ||P^T P - I||_F and ||Q Q^T - I||_F, to the loss (`orthogonality`);
  - after every optimizer update (`Allocator.update`) smooths each entry's sensitivity
    |theta * grad| (EMA beta1) and its uncertainty |sensitivity - EMA| (EMA beta2), scores each
    triplet (P column i, lambda_i, Q row i) as the score of lambda_i plus the mean scores of
    its P column and Q row (score = smoothed sensitivity x uncertainty), and zeroes the
    lambda_i of the lowest-scoring triplets, over all matrices at once, down to a budget:
    every matrix at full rank for `tinit` steps, then a cubic decrease to `target_rank` per
    matrix (on average) at step total - tfinal, masking every `delta_t` steps; the final rank
    pattern then stays fixed for the last `tfinal` steps.
This follows Hugging Face PEFT's RankAllocator step for step (tests/test_peft.py compares the
two), with `step` the number of optimizer updates done.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LEAVES = ("lora_a", "lora_e", "lora_b")


@dataclasses.dataclass(frozen=True)
class Allocator:
  init_rank: int
  target_rank: int
  total_steps: int
  tinit: int = 0
  tfinal: int = 0
  delta_t: int = 1
  beta1: float = 0.85
  beta2: float = 0.85

  def check(self):
    if not 0 < self.target_rank <= self.init_rank:
      raise ValueError(f"peft.adalora_target_rank={self.target_rank} must be in 1..peft.rank "
                       f"({self.init_rank})")
    if self.total_steps <= self.tinit + self.tfinal:
      raise ValueError(f"AdaLoRA needs train.steps ({self.total_steps}) > peft.adalora_tinit + "
                       f"peft.adalora_tfinal ({self.tinit} + {self.tfinal})")
    if self.delta_t < 1 or not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
      raise ValueError("peft.adalora_delta_t must be positive and the betas in (0, 1)")

  def budget(self, step, n_matrices: int):
    """(total rank kept over all matrices, whether to re-mask at this step): PEFT's cubic
    schedule."""
    initial, target = self.init_rank * n_matrices, self.target_rank * n_matrices
    end = self.total_steps - self.tfinal
    coeff = 1.0 - (step - self.tinit) / max(end - self.tinit, 1)
    middle = jnp.floor((initial - target) * coeff ** 3 + target).astype(jnp.int32)
    budget = jnp.where(step <= self.tinit, initial, jnp.where(step > end, target, middle))
    remask = ((step > self.tinit) & (step < end) & (step % self.delta_t == 0)) | (step == end)
    return budget, remask

  def init_state(self, adapters: dict) -> dict:
    """Zero EMAs of every adapter entry; `keep`: the rank pattern (every triplet kept)."""
    zeros = jax.tree.map(jnp.zeros_like, adapters)
    keep = jax.tree.map(lambda e: jnp.ones(e.shape, bool), lambdas(adapters))
    return {"ipt": zeros, "unc": zeros, "keep": keep}

  def update(self, step, adapters: dict, grads: dict, state: dict) -> tuple[dict, dict]:
    """After optimizer update number `step` (1-based): the adapters with the unimportant
    triplets' lambda zeroed, and the new allocator state. `adapters` are the updated values,
    `grads` the gradients of that update (as PEFT reads p and p.grad after optimizer.step())."""
    end = self.total_steps - self.tfinal
    learning = step < end
    ipt = jax.tree.map(lambda p, g: jnp.abs(p * g).astype(jnp.float32), adapters, grads)
    ema = jax.tree.map(lambda old, new: jnp.where(learning, self.beta1 * old + (1 - self.beta1)
                                                  * new, old), state["ipt"], ipt)
    unc = jax.tree.map(lambda old, new, avg: jnp.where(
        learning, self.beta2 * old + (1 - self.beta2) * jnp.abs(new - avg), old),
        state["unc"], ipt, ema)
    # a triplet's score: lambda_i's, plus the mean over P's column i and over Q's row i
    score = jax.tree.map(lambda a, b: a * b, ema, unc)
    triplets = jax.tree.map(lambda s: s["lora_e"] + s["lora_a"].mean(axis=-2)
                            + s["lora_b"].mean(axis=-1), score, is_leaf=_is_entry)
    flat = jnp.concatenate([t.reshape(-1) for t in jax.tree.leaves(triplets)])
    budget, remask = self.budget(step, flat.size // self.init_rank)
    # PEFT: threshold = the k-th smallest score, k = initial - budget; masked: score <= it
    k = flat.size - budget
    threshold = jnp.where(k > 0, jnp.sort(flat)[jnp.maximum(k - 1, 0)], -jnp.inf)
    keep = jax.tree.map(lambda t, old: jnp.where(remask, t > threshold, old), triplets,
                        state["keep"])
    apply = remask | (step > end)

    def mask(entry, kept):
      return {**entry, "lora_e": jnp.where(apply & ~kept, 0, entry["lora_e"])}
    adapters = jax.tree.map(mask, adapters, keep, is_leaf=_is_entry)
    return adapters, {"ipt": ema, "unc": unc, "keep": keep}


def orthogonality(adapters: dict) -> jax.Array:
  """Mean over every layer's P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F (float32)."""
  total, count = jnp.zeros((), jnp.float32), 0
  for entry in jax.tree.leaves(adapters, is_leaf=_is_entry):
    a, b = entry["lora_a"].astype(jnp.float32), entry["lora_b"].astype(jnp.float32)
    eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
    for gram in (jnp.swapaxes(a, -1, -2) @ a, b @ jnp.swapaxes(b, -1, -2)):  # (layers, r, r)
      total += jnp.sqrt(jnp.sum((gram - eye) ** 2, axis=(-2, -1))).sum()
      count += gram.shape[0]
  return total / count


def _is_entry(x) -> bool:
  return isinstance(x, dict) and "lora_e" in x


def lambdas(adapters: dict) -> dict:
  """The `lora_e` leaf of every entry (any tree shaped like the adapters)."""
  return jax.tree.map(lambda entry: entry["lora_e"], adapters, is_leaf=_is_entry)
