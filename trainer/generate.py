"""Sampling from a trained model.

This first version recomputes the full forward pass over a fixed-size buffer for each new token
(one compiled program for every step); it is meant for the short sample a run prints at its end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from trainer.state import ModelHandle, cast_floating


def sample(handle: ModelHandle, params, prompt_ids: list[int], max_new_tokens: int, *,
           buffer_len: int, temperature: float = 0.0, seed: int = 0,
           stop_ids: tuple[int, ...] = (), compute_dtype=jnp.float32) -> list[int]:
  """New token ids after `prompt_ids` (at most `max_new_tokens`, ending early at a stop id).

  temperature 0 is greedy. The prompt is cut from the left to leave room in `buffer_len`.
  """
  room = buffer_len - max_new_tokens
  if room < 1:
    raise ValueError(f"buffer_len={buffer_len} leaves no room for a prompt before "
                     f"{max_new_tokens} new tokens")
  prompt = list(prompt_ids)[-room:]

  @jax.jit
  def next_token(params, tokens_1t, length, key):
    logits = handle.bind(cast_floating(params, compute_dtype))(tokens_1t)
    last = logits[0, length - 1]
    if temperature > 0:
      return jax.random.categorical(key, last / temperature)
    return jnp.argmax(last)

  tokens = np.zeros((1, buffer_len), np.int32)
  tokens[0, :len(prompt)] = prompt
  key = jax.random.PRNGKey(seed)
  out = []
  for i in range(max_new_tokens):
    length = len(prompt) + i
    tok = int(next_token(params, tokens, length, jax.random.fold_in(key, i)))
    if tok in stop_ids:
      break
    tokens[0, length] = tok
    out.append(tok)
  return out
