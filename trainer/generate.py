"""Sampling from a trained model, for batches of prompts of different lengths.

This first version recomputes the full forward pass over a fixed-size buffer for each new token
(one compiled program for every step): simple and exact, meant for the short samples and
evaluations a run does. Greedy at temperature 0.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trainer.state import ModelHandle, cast_floating


def sample_batch(handle: ModelHandle, params, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int, *, buffer_len: int, temperature: float = 0.0,
                 seed: int = 0, stop_ids: Sequence[int] = (), compute_dtype=jnp.float32
                 ) -> list[list[int]]:
  """New token ids after each prompt (at most `max_new_tokens`, ending at a stop id, which is
  not returned). Prompts are cut from the left to leave room in `buffer_len`."""
  room = buffer_len - max_new_tokens
  if room < 1:
    raise ValueError(f"buffer_len={buffer_len} leaves no room for a prompt before "
                     f"{max_new_tokens} new tokens")
  prompts = [list(p)[-room:] for p in prompts]
  tokens = np.zeros((len(prompts), buffer_len), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)

  @jax.jit
  def step(params, tokens, lengths, done, key):
    logits = handle.bind(cast_floating(params, compute_dtype))(tokens)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    nxt = (jax.random.categorical(key, last / temperature) if temperature > 0
           else jnp.argmax(last, axis=-1)).astype(jnp.int32)
    done = done | jnp.isin(nxt, stops)
    write = jnp.where(done, tokens[jnp.arange(len(lengths)), lengths], nxt)
    tokens = tokens.at[jnp.arange(len(lengths)), lengths].set(write)
    return tokens, lengths + (~done).astype(jnp.int32), done

  done = jnp.zeros(len(prompts), bool)
  key = jax.random.PRNGKey(seed)
  tokens_d, lengths_d = jnp.asarray(tokens), jnp.asarray(lengths)
  for i in range(max_new_tokens):
    tokens_d, lengths_d, done = step(params, tokens_d, lengths_d, done, jax.random.fold_in(key, i))
  tokens, new_lengths = np.asarray(tokens_d), np.asarray(lengths_d)
  return [tokens[i, lengths[i]:new_lengths[i]].tolist() for i in range(len(prompts))]


def sample(handle: ModelHandle, params, prompt_ids: Sequence[int], max_new_tokens: int,
           **kwargs) -> list[int]:
  """One prompt; keyword arguments as `sample_batch`."""
  return sample_batch(handle, params, [prompt_ids], max_new_tokens, **kwargs)[0]
