"""The adapter variants and unified methods in activation space: what `PeftModel` hands each
Block (models/decoder.py) for AdapterFusion, MAM adapters and UniPELT. Each function takes one
layer's arrays (no layer axis).

  fusion    AdapterFusion (Pfeiffer et al. 2021), stage 2. N frozen Houlsby adapters see the
            sublayer output h; with z_n = h + up_n(gelu(down_n(h))) the output is
            sum_n softmax_n((h Q) . (z_n K)) (z_n V), per token. Q and K start normal(0, 0.02),
            V at the identity, so training starts from the mean of the adapters' outputs.
  parallel  MAM's FFN adapter (He et al. 2022): the FFN's output plus
            s * up(relu(down(u))), u the FFN's input; `up` starts at 0.
  gated     UniPELT (Mao et al. 2022): each piece behind a gate sigma(x w + b), x the piece's
            input, per token. LoRA: x W + g * s * x A B, a gate per targeted matrix from its
            input. Adapter: h + g * up(gelu(down(h))) on the FFN's output h. Prefix: the prefix
            keys and values multiplied by the gate of each query, computed from the attention's
            input (models/layers.py `gated_attend`). Gates start at w = 0, b = 0: 0.5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.decoder import bottleneck, bottleneck_delta
from models.layers import dense


def fusion(h_btd, adapters: dict, p: dict):
  """AdapterFusion over N adapters (each leaf with a leading N axis) at one sublayer output."""
  z = jax.vmap(lambda a: bottleneck(h_btd, a))(adapters)  # (N, b, t, d)
  q = dense(h_btd, p["query"].astype(h_btd.dtype))
  k = jnp.einsum("nbtd,de->nbte", z, p["key"].astype(z.dtype))
  v = jnp.einsum("nbtd,de->nbte", z, p["value"].astype(z.dtype))
  weights = jax.nn.softmax(jnp.einsum("btd,nbtd->btn", q, k,
                                      preferred_element_type=jnp.float32), axis=-1)
  return jnp.einsum("btn,nbtd->btd", weights.astype(v.dtype), v)


def parallel_adapter(u_btd, p: dict, scale: float):
  """MAM's parallel FFN adapter: s * up(relu(down(u)))."""
  return jnp.asarray(scale, u_btd.dtype) * bottleneck_delta(u_btd, p, jax.nn.relu)


def gate(x, w, b):
  """sigma(x w + b) over the last axis of x, float32: one gate per token."""
  return jax.nn.sigmoid(jnp.einsum("...d,d->...", x, w.astype(x.dtype),
                                   preferred_element_type=jnp.float32) + b)


def gated_adapter(h_btd, p: dict):
  """UniPELT's adapter: h + g(h) * up(gelu(down(h)))."""
  g = gate(h_btd, p["gate"], p["gate_bias"])
  return h_btd + g[..., None].astype(h_btd.dtype) * bottleneck_delta(h_btd, p)


def gated_low_rank(entry: dict, scale: float):
  """UniPELT's LoRA on one matrix, as a projection's delta: x (tokens, in) -> g(x) * s x A B."""
  def delta(x):
    g = gate(x, entry["gate"], entry["gate_bias"])[:, None].astype(x.dtype)
    low = (x @ entry["lora_a"].astype(x.dtype)) @ entry["lora_b"].astype(x.dtype)
    return g * jnp.asarray(scale, x.dtype) * low
  return delta


def prefix_gate(p: dict):
  """UniPELT's prefix gate, fn(attention input (b, t, d)) -> (b, t)."""
  return lambda x: gate(x, p["w"], p["b"])
