"""A decoder whose projection weights are stored as integers (trainer/quantize.py writes them),
or trained through quantization (`quant.mode`).

`Quantized` says which weights and how. Stored (post-training): each targeted weight of the
layer stack (attention q, k, v, o; MLP gate, up, down; dense models) becomes a dict of
models/quant/uniform.py's arrays over (layers, in, out), plus, where a method found
per-input-channel scales (AWQ, SmoothQuant), `smooth` (layers, in): the stored integers quantize
diag(smooth) W, read back as diag(1 / smooth) x that. With `act_scale` (layers,) (SmoothQuant's
W8A8) the inputs are divided by `smooth` instead and quantized to int8 with that static scale
before the matmul (models/layers.py `ActQuant`); `activations="token"` quantizes them with a
scale per token.

In training the weights stay float (`fake`): `quant.mode=qat` passes them through
quantize-dequantize in the forward with a straight-through gradient (trainer/quantize.py
--method=qat then stores them as integers that compute what the run trained), `quant.mode=qt`
runs each projection's matmul as qwix's quantized dot_general, forward and backward
(models/layers.py `QtDot`).

`QuantModel` makes each layer's weights inside the decoder's scan (a `LayerSource`), so the
float weights of the whole stack never exist at once; embeddings, norms and the LM head stay in
floating point, as in GPTQ and AWQ.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.decoder import Context, Decoder, LayerSource
from models.layers import ActQuant, QtDot
from models.quant import uniform

Params = dict[str, Any]
FILE = "quantization.json"
EXTRA = ("smooth", "act_scale")  # stored beside a weight's integers and scales
LINEAR = (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"),
          ("mlp", "gate"), ("mlp", "up"), ("mlp", "down"))


def dims(mcfg: ModelConfig, module: str, name: str) -> tuple[int, int]:
  """(in, out) of a projection weight, flattened (attention heads into one axis)."""
  d, h, kv, hd = mcfg.d_model, mcfg.n_heads, mcfg.n_kv_heads, mcfg.head_dim
  return {"q": (d, h * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (h * hd, d),
          "gate": (d, mcfg.d_ff), "up": (d, mcfg.d_ff), "down": (mcfg.d_ff, d)}[name]


@dataclasses.dataclass(frozen=True)
class Quantized:
  """How a model's projection weights are stored: one `Scheme` for all of `targets`."""
  scheme: uniform.Scheme
  method: str = "rtn"
  targets: tuple[tuple[str, str], ...] = LINEAR
  smooth: bool = False  # per-input-channel scales stored with each weight (AWQ, SmoothQuant)
  # inputs quantized to int8 too: "static" (SmoothQuant's W8A8, a stored scale per weight) or
  # "token" (one scale per token, from its own absmax); "": float inputs
  activations: str = ""
  fake: bool = False  # weights stored float (training): fake-quantized in the forward (qat)
  qt: str = ""  # ... or as they are, every projection's matmul qwix's int8 dot (qt)

  def to_json(self) -> dict:
    return {"method": self.method, "bits": self.scheme.bits, "symmetric": self.scheme.symmetric,
            "group_size": self.scheme.group, "targets": ["/".join(t) for t in self.targets],
            "smooth": self.smooth, "activations": self.activations, "fake": self.fake,
            "qt": self.qt}

  @classmethod
  def from_json(cls, d: dict) -> "Quantized":
    return cls(uniform.Scheme(d["bits"], d["symmetric"], d["group_size"]), d["method"],
               tuple(tuple(t.split("/")) for t in d["targets"]), d.get("smooth", False),
               d.get("activations", ""), d.get("fake", False), d.get("qt", ""))

  def check(self, mcfg: ModelConfig) -> None:
    """ValueError naming the weight when a target's shape cannot take the scheme."""
    if mcfg.n_experts:
      raise ValueError("quantizing a mixture-of-experts model's weights is not supported yet")
    if not mcfg.mlp_gated or mcfg.out_bias:
      raise ValueError("quantizing BLOOM's MLP (no gate, biases) is not supported yet")
    for module, name in self.targets:
      n_in, n_out = dims(mcfg, module, name)
      self.scheme.check((n_in, n_out), f"{module}.{name} (in {n_in})")

  # -- the stored tree -----------------------------------------------------------------------

  def quantize_layers(self, mcfg: ModelConfig, layers: Params, found: dict | None = None):
    """The layer stack with every target stored quantized: round to nearest, or with the
    parameters (and smoothing scales) another method `found`: {(module, name): dict of
    quantize()'s arrays, [smooth]} over the stacked layers."""
    out = layers
    for module, name in self.targets:
      if found and (module, name) in found:
        stored = found[(module, name)]
      else:
        w = layers[module][name]
        n_in, n_out = dims(mcfg, module, name)
        stored = uniform.quantize(w.reshape(w.shape[0], n_in, n_out), self.scheme)
        if self.smooth:  # (the layout of a method that found scales: none found here)
          stored["smooth"] = jnp.ones((w.shape[0], n_in), jnp.float32)
        if self.activations == "static":
          stored["act_scale"] = jnp.ones((w.shape[0],), jnp.float32)
      out = {**out, module: {**out[module], name: dict(stored)}}
    return out

  def dequantize_layer(self, mcfg: ModelConfig, layer: Params, dtype=jnp.float32,
                       float_inputs: bool = False) -> Params:
    """One layer's parameters (no layer axis) with float weights of their usual shapes; W8A8's
    as its quantized inputs see them (smoothing left to the inputs), unless `float_inputs`."""
    out = layer
    for module, name in self.targets:
      stored = layer[module][name]
      if self.qt:  # quantized training: the weight as it is; the matmul quantizes it
        continue
      if self.fake:  # QAT: the float weight through quantize-dequantize, straight through
        n_in, n_out = dims(mcfg, module, name)
        w = uniform.fake_quant_weight(stored.reshape(n_in, n_out), self.scheme)
        out = {**out, module: {**out[module], name: w.reshape(stored.shape).astype(dtype)}}
        continue
      w = uniform.dequantize({k: v for k, v in stored.items() if k not in EXTRA}, self.scheme,
                             jnp.float32)
      if "smooth" in stored and (float_inputs or "act_scale" not in stored):
        w = w / stored["smooth"][:, None]
      out = {**out, module: {**out[module], name: w.reshape(_shape(mcfg, module, name))
                             .astype(dtype)}}
    return out


QAT_MODES = ("none", "qat", "qt")
QT_DTYPES = {"int8": jnp.int8}
ACTIVATIONS = ("", "token")


def from_config(qc) -> Quantized | None:
  """The `quant` section of a run's config: how training quantizes (qat, qt), or None.
  ValueError naming the key on a bad value."""
  if qc.mode not in QAT_MODES:
    raise ValueError(f"quant.mode={qc.mode!r} is not one of {', '.join(QAT_MODES)}")
  if qc.mode == "none":
    return None
  if qc.mode == "qt":
    if qc.bits != 8:  # (qwix's int4 dot_general fails to compile on XLA:CPU)
      raise ValueError(f"quant.bits={qc.bits}: qt runs int8 matmuls; set quant.bits=8")
    return Quantized(uniform.Scheme(8), "qt", fake=True, qt="int8")
  if qc.activations not in ACTIVATIONS:
    raise ValueError(f"quant.activations={qc.activations!r} is not \"token\" or \"\" (float)")
  try:
    scheme = uniform.Scheme(qc.bits, qc.symmetric, qc.group_size)
  except ValueError as e:
    raise ValueError(f"quant.bits / quant.group_size: {e}") from None
  return Quantized(scheme, "qat", activations=qc.activations, fake=True)


def _shape(mcfg: ModelConfig, module: str, name: str) -> tuple[int, ...]:
  d, h, kv, hd, f = mcfg.d_model, mcfg.n_heads, mcfg.n_kv_heads, mcfg.head_dim, mcfg.d_ff
  return {"q": (d, h, hd), "k": (d, kv, hd), "v": (d, kv, hd), "o": (h, hd, d),
          "gate": (d, f), "up": (d, f), "down": (f, d)}[name]


def dequantize(mcfg: ModelConfig, quant: Quantized, params: Params) -> Params:
  """Float parameters of the whole model, for float inputs (tests, and the calibration passes;
  `QuantModel` dequantizes layer by layer)."""
  return {**params, "layers": jax.vmap(
      lambda l: quant.dequantize_layer(mcfg, l, float_inputs=True))(params["layers"])}


class QuantModel:
  """A decoder whose layers' weights are dequantized one layer at a time in its scan. Its
  methods are the decoder's (`ModelHandle.bind` with `quant`)."""

  def __init__(self, decoder: Decoder, quant: Quantized, params: Params):
    self.decoder, self.cfg, self.quant = decoder, decoder.cfg, quant
    self._layers = params["layers"]
    self._dtype = params["embed"].dtype  # the float weights' dtype as stored
    self.n_virtual = 0

  def _layer(self, layer):
    deltas: dict = {}
    if self.quant.qt:
      for module, name in self.quant.targets:
        deltas.setdefault(module, {})[name] = QtDot(QT_DTYPES[self.quant.qt])
    if self.quant.activations:  # W8A8: each projection's inputs (smoothed and) quantized
      for module, name in self.quant.targets:
        stored = layer[module][name]
        smooth = stored.get("smooth") if isinstance(stored, dict) else None
        deltas.setdefault(module, {})[name] = ActQuant(
            None if smooth is None else 1.0 / smooth,
            stored["act_scale"] if self.quant.activations == "static" else None)
    extras = {"deltas": deltas} if deltas else {}
    return self.quant.dequantize_layer(self.cfg, layer, self._dtype), extras

  def _context(self, ctx: Context | None) -> Context:
    return dataclasses.replace(ctx or Context(), layers=LayerSource(self._layers, self._layer))

  def hidden(self, tokens_bt, positions_bt=None, segment_ids_bt=None, ctx: Context | None = None):
    return self.decoder.hidden(tokens_bt, positions_bt, segment_ids_bt, self._context(ctx))

  def forward(self, tokens_bt, positions_bt=None, segment_ids_bt=None,
              ctx: Context | None = None):
    return self.decoder.forward(tokens_bt, positions_bt, segment_ids_bt, self._context(ctx))

  def logits(self, h):
    return self.decoder.logits(h)

  def values(self, h):
    return self.decoder.values(h)

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> dict:
    return self.decoder.init_cache(batch, length, dtype)

  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
    return self.logits(self.hidden(tokens_bt, positions_bt, segment_ids_bt))


def integers(quant: Quantized | None) -> Quantized | None:
  """`quant` when the parameters hold its integers and scales; None for float weights (no
  quantization, or QAT's and qt's, which train floats)."""
  return quant if quant is not None and not quant.fake else None


def stored_frozen(quant: Quantized, params: Params) -> Params:
  """Optimizer labels of a model whose targets are stored as integers (a run starting from a
  folder trainer/quantize.py wrote): their integers, scales and zero points "frozen", the float
  parameters (embeddings, norms, head) "trainable"."""
  targets = set(quant.targets)

  def label(path, _):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    return "frozen" if keys[0] == "layers" and keys[1:3] in targets else "trainable"
  return jax.tree_util.tree_map_with_path(label, params)


def read(folder: str) -> Quantized | None:
  """The folder's quantization, or None when it holds a float model."""
  path = os.path.join(folder, FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return Quantized.from_json(json.load(f))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a quantization description ({e})") from None


def write(folder: str, quant: Quantized) -> None:
  with open(os.path.join(folder, FILE), "w") as f:
    json.dump(quant.to_json(), f, indent=1)


def flat(params: Params, prefix: str = "") -> dict[str, np.ndarray]:
  """{"layers/attn/q/qweight": array, ...}: a tree as safetensors names."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def unflat(tensors: dict[str, np.ndarray]) -> Params:
  out: Params = {}
  for name, v in tensors.items():
    node = out
    *path, leaf = name.split("/")
    for k in path:
      node = node.setdefault(k, {})
    node[leaf] = v
  return out
