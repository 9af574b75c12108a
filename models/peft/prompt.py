"""Virtual-token methods: prompt tuning, P-tuning and prefix tuning (P-tuning v2).

  prompt   n trainable input embeddings placed before every sequence (Lester et al. 2021).
  ptuning  the same n embeddings passed through a trainable encoder first (Liu et al. 2021):
           an MLP (d -> h -> h -> d, ReLU) or a 2-layer bidirectional LSTM with an MLP head
           (2h -> 2h -> d), as Hugging Face PEFT's PromptEncoder.
  prefix   n trainable keys and values per layer placed before the sequence's own in every
           attention (Li and Liang 2021; P-tuning v2 is this on every layer), stored directly,
           or (`projection`) made by an MLP (kv_dim -> h, tanh, -> layers * 2 * kv_dim) from n
           embeddings, as PEFT's PrefixEncoder.
The decoder places the virtual tokens (models/decoder.py `hidden`, segment `VIRTUAL`: seen by
every segment of a packed row) and moves the real tokens' positions up by n, as PEFT does.
Nothing here folds into weights: these adapters cannot be merged.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from models.config import ModelConfig

METHODS = ("prompt", "ptuning", "prefix")
ENCODERS = ("mlp", "lstm")
INITS = ("vocab", "random")
LSTM_LAYERS = 2


@dataclasses.dataclass(frozen=True)
class Prompt:
  method: str
  mcfg: ModelConfig
  n: int  # virtual tokens
  encoder: str = "mlp"  # ptuning
  hidden: int = 0  # encoder width; 0: the token width (PEFT's default)
  projection: bool = False  # prefix: through an MLP
  init_kind: str = "vocab"  # prompt, ptuning: embeddings of random vocabulary tokens, or normal(0, 1)

  def check(self):
    if self.n < 1:
      raise ValueError(f"peft.num_virtual_tokens={self.n} must be positive")
    if self.encoder not in ENCODERS:
      raise ValueError(f"peft.ptuning_encoder={self.encoder!r} is not one of {', '.join(ENCODERS)}")
    if self.init_kind not in INITS:
      raise ValueError(f"peft.prompt_init={self.init_kind!r} is not one of {', '.join(INITS)}")
    if self.hidden < 0:
      raise ValueError(f"peft.encoder_hidden={self.hidden} must be 0 (token width) or positive")

  def check_impl(self, attention_impl: str):
    if attention_impl not in ("xla", "pallas"):
      raise ValueError(f"peft.method={self.method} (virtual tokens) works with "
                       f"model.attention_impl xla or pallas, not {attention_impl}")

  @property
  def token_dim(self) -> int:
    """Width of one virtual token: d_model, or for prefix one layer's keys (kv_heads x head_dim),
    as PEFT sets token_dim for grouped-query models."""
    c = self.mcfg
    return c.n_kv_heads * c.head_dim if self.method == "prefix" else c.d_model

  @property
  def width(self) -> int:
    return self.hidden or self.token_dim

  def shapes(self) -> dict:
    """name -> (shape, logical axes), stored under params["peft"]["prompt"]."""
    c, n, d, h = self.mcfg, self.n, self.token_dim, self.width
    if self.method == "prefix" and not self.projection:
      return {"kv": ((c.n_layers, 2, n, c.n_kv_heads, c.head_dim),
                     ("layers", None, None, None, None))}
    out = {"embedding": ((n, d), (None, None))}
    dense = lambda name, n_in, n_out: {name: ((n_in, n_out), (None, None)),
                                       name + "_bias": ((n_out,), (None,))}
    if self.method == "prefix":  # projection
      return {**out, **dense("w1", d, h), **dense("w2", h, c.n_layers * 2 * d)}
    if self.method == "ptuning" and self.encoder == "mlp":
      return {**out, **dense("w1", d, h), **dense("w2", h, h), **dense("w3", h, d)}
    if self.method == "ptuning":  # lstm: per layer and direction, gates i, f, g, o
      for layer in range(LSTM_LAYERS):
        n_in = d if layer == 0 else 2 * h
        for direction in ("fwd", "bwd"):
          at = f"lstm{layer}_{direction}_"
          out.update({at + "wi": ((n_in, 4 * h), (None, None)),
                      at + "wh": ((h, 4 * h), (None, None)), at + "b": ((4 * h,), (None,))})
      return {**out, **dense("head1", 2 * h, 2 * h), **dense("head2", 2 * h, d)}
    return out

  def init(self, embed_table: jax.Array, key: jax.Array) -> dict:
    """PEFT's initialisations: linear layers uniform(+-1/sqrt(in)); prefix keys and values and
    `init=random` embeddings normal(0, 1); `init=vocab` (prompt, ptuning) copies the embeddings
    of n random vocabulary tokens (PEFT's SAMPLE_VOCAB)."""
    out = {}
    keys = iter(jax.random.split(key, 64))
    for name, (shape, _) in self.shapes().items():
      k = next(keys)
      if name == "embedding" and self.init_kind == "vocab" and self.method != "prefix":
        ids = jax.random.randint(k, (self.n,), 0, embed_table.shape[0])
        out[name] = jnp.take(embed_table, ids, axis=0).astype(jnp.float32)
      elif name in ("embedding", "kv"):
        out[name] = jax.random.normal(k, shape)
      else:
        fan_in = self._fan_in(name)
        out[name] = jax.random.uniform(k, shape, minval=-1.0, maxval=1.0) / math.sqrt(fan_in)
    return out

  def _fan_in(self, name: str) -> int:
    shapes = self.shapes()
    if name.endswith("_bias"):
      return shapes[name[:-5]][0][0]
    if name.endswith("_b"):  # lstm biases: PyTorch draws them from +-1/sqrt(hidden)
      return self.width
    if name.endswith("_wi") or name.endswith("_wh"):
      return self.width
    return shapes[name][0][0]

  # --- what the decoder gets ----------------------------------------------------------------

  def embeddings(self, p: dict) -> jax.Array:
    """prompt, ptuning: the (n, d_model) virtual input embeddings."""
    x = p["embedding"]
    if self.method == "prompt":
      return x
    dense = lambda x, name: x @ p[name].astype(x.dtype) + p[name + "_bias"].astype(x.dtype)
    if self.encoder == "mlp":
      x = jax.nn.relu(dense(x, "w1"))
      return dense(jax.nn.relu(dense(x, "w2")), "w3")
    for layer in range(LSTM_LAYERS):
      fwd = _lstm(x, p, f"lstm{layer}_fwd_")
      bwd = _lstm(x[::-1], p, f"lstm{layer}_bwd_")[::-1]
      x = jnp.concatenate([fwd, bwd], axis=-1)
    return dense(jax.nn.relu(dense(x, "head1")), "head2")

  def prefix_kv(self, p: dict) -> jax.Array:
    """prefix: keys and values (layers, 2, n, kv_heads, head_dim)."""
    if not self.projection:
      return p["kv"]
    c = self.mcfg
    h = jnp.tanh(p["embedding"] @ p["w1"] + p["w1_bias"])
    flat = h @ p["w2"] + p["w2_bias"]  # (n, layers * 2 * kv_dim), PEFT's order
    return flat.reshape(self.n, c.n_layers, 2, c.n_kv_heads, c.head_dim).transpose(1, 2, 0, 3, 4)

  def flat(self, p: dict) -> jax.Array:
    """What PEFT saves as `prompt_embeddings` (inference mode): the encoder's output, for prefix
    (n, layers * 2 * kv_dim)."""
    if self.method != "prefix":
      return self.embeddings(p)
    return self.prefix_kv(p).transpose(2, 0, 1, 3, 4).reshape(self.n, -1)


def _lstm(x, p, at):
  """One direction of one LSTM layer over the n tokens (PyTorch's gate order i, f, g, o)."""
  h_dim = p[at + "wh"].shape[0]

  def step(carry, xt):
    h, c = carry
    z = xt @ p[at + "wi"] + h @ p[at + "wh"] + p[at + "b"]
    i, f, g, o = jnp.split(z, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((h_dim,), x.dtype)
  return jax.lax.scan(step, (zeros, zeros), x)[1]
