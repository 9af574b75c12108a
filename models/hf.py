"""Hugging Face checkpoints in and out: Llama (1/2/3, 3.1 rope scaling), Mistral, Qwen2, Gemma,
Gemma 2.

    cfg, params = hf.load(folder, shardings)   # config.json + *.safetensors (sharded or not)
    hf.save(folder, cfg, params)               # the same layout back, transformers loads it

Loading streams: each parameter is built with `jax.make_array_from_callback`, so a process reads
only the slices its devices hold, one Hugging Face tensor at a time (a stacked layer parameter
reads the layers its shard covers). Saving brings one parameter at a time to the host.

Our layout versus Hugging Face's (torch Linear weights are (out, in)):
  q (d, heads, hd) <- q_proj (heads*hd, d) transposed;  k, v likewise with kv_heads
  o (heads, hd, d) <- o_proj (d, heads*hd) transposed;  gate/up (d, f), down (f, d) transposed
  layer parameters are stacked along a leading `layers` axis (the decoder scans over them).
Rotary embeddings use the same half-split convention, so no permutation is needed.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable

import jax
import numpy as np

from models import safetensors_io
from models.config import Execution, ModelConfig
from models.handle import model_handle

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "GemmaForCausalLM": "gemma",
                 "Gemma2ForCausalLM": "gemma2"}
MODEL_TYPES = {v: k.removesuffix("ForCausalLM").lower() for k, v in ARCHITECTURES.items()}
# reward models: the same decoders with a one-output `score` head (value_head) instead of lm_head
CLASSIFIERS = {k.replace("ForCausalLM", "ForSequenceClassification"): v
               for k, v in ARCHITECTURES.items()}


class UnsupportedModel(ValueError):
  pass


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------


def _rope(hf: dict) -> dict:
  """Rope settings from either transformers 5 (`rope_parameters`) or older files (`rope_theta` +
  `rope_scaling`)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  info = {**scaling, **params}
  out = dict(rope_theta=float(theta))
  if kind == "default":
    return out
  if kind not in ("linear", "dynamic", "llama3"):
    raise UnsupportedModel(f"rope scaling {kind!r} is not supported (linear, dynamic, llama3 are)")
  out.update(rope_scaling=kind, rope_factor=float(info["factor"]))
  if kind in ("dynamic", "llama3"):
    out["rope_original_max_len"] = int(info.get("original_max_position_embeddings")
                                       or hf.get("max_position_embeddings"))
  if kind == "llama3":
    out.update(rope_low_freq_factor=float(info["low_freq_factor"]),
               rope_high_freq_factor=float(info["high_freq_factor"]))
  return out


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  archs = hf.get("architectures") or []
  family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
  value_head = family is None and any(a in CLASSIFIERS for a in archs)
  if value_head:
    family = next(CLASSIFIERS[a] for a in archs if a in CLASSIFIERS)
    if hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
      raise UnsupportedModel("sequence classifiers load as reward models: num_labels must be 1")
  if family is None:
    raise UnsupportedModel(
        f"architectures={archs} is not supported; supported: "
        f"{', '.join([*ARCHITECTURES, *CLASSIFIERS])}")
  n_layers = hf["num_hidden_layers"]
  c = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers,
           n_heads=hf["num_attention_heads"],
           n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
           head_dim=hf.get("head_dim") or 0, d_ff=hf["intermediate_size"],
           max_seq_len=hf.get("max_position_embeddings", 8192), norm_eps=hf.get("rms_norm_eps", 1e-6),
           tie_embeddings=bool(hf.get("tie_word_embeddings", family in ("gemma", "gemma2"))),
           qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
           family=family, value_head=value_head, **_rope(hf))
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  if act not in ("silu", "gelu_pytorch_tanh", "gelu"):
    raise UnsupportedModel(f"hidden activation {act!r} is not supported")
  c["mlp_activation"] = "silu" if act == "silu" else "gelu_tanh"  # HF runs Gemma's gelu as tanh
  window = hf.get("sliding_window") or 0
  types = hf.get("layer_types")
  if family == "qwen2" and not hf.get("use_sliding_window", False):
    window, types = 0, None
  if window:
    c["sliding_window"] = int(window)
    if types:
      local = [i for i, t in enumerate(types) if t == "sliding_attention"]
      if not local:
        c["sliding_window"] = 0
      elif len(local) < n_layers:
        c["sliding_window_layers"] = tuple(local)
    elif family == "gemma2":
      c["sliding_window_layers"] = tuple(range(0, n_layers, 2))
  if family in ("gemma", "gemma2"):
    c.update(norm_offset=True, embed_scale=True)
  if family == "gemma2":
    c.update(post_norms=True, query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
             attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
             logit_softcap=float(hf.get("final_logit_softcapping") or 0.0))
  c.update(overrides)
  return ModelConfig(**c)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
  arch = next(a for a, f in (CLASSIFIERS if cfg.value_head else ARCHITECTURES).items()
              if f == cfg.family)
  windows = cfg.layer_windows()
  hf = dict(architectures=[arch], model_type=MODEL_TYPES[cfg.family], vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, torch_dtype=dtype, dtype=dtype,
            hidden_act="silu" if cfg.mlp_activation == "silu" else "gelu_pytorch_tanh",
            rope_theta=cfg.rope_theta, attention_dropout=0.0)
  if cfg.rope_scaling != "none":
    scaling = dict(rope_type=cfg.rope_scaling, factor=cfg.rope_factor)
    if cfg.rope_scaling in ("dynamic", "llama3"):
      scaling["original_max_position_embeddings"] = cfg.rope_original_max_len
    if cfg.rope_scaling == "llama3":
      scaling.update(low_freq_factor=cfg.rope_low_freq_factor,
                     high_freq_factor=cfg.rope_high_freq_factor)
    hf["rope_scaling"] = scaling
  if cfg.family in ("llama", "mistral"):
    hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
  if cfg.value_head:  # read by *ForSequenceClassification at the last token that is not padding
    hf.update(num_labels=1, pad_token_id=0)
  if cfg.family == "gemma2":
    scalar = cfg.scale ** -2  # scale = query_pre_attn_scalar ** -0.5; transformers wants an int
    hf.update(hidden_activation=hf["hidden_act"],
              query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
              attn_logit_softcapping=cfg.attn_softcap or None,
              final_logit_softcapping=cfg.logit_softcap or None)
  if cfg.sliding_window:
    hf["sliding_window"] = cfg.sliding_window
    hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
    if cfg.family == "qwen2":
      hf.update(use_sliding_window=True,
                max_window_layers=min([i for i, w in enumerate(windows) if w] or [cfg.n_layers]))
  elif cfg.family in ("mistral", "qwen2", "gemma2"):
    hf["sliding_window"] = None
  return hf


# ----------------------------------------------------------------------------------------------
# Tensor names and layouts
# ----------------------------------------------------------------------------------------------

# (our path, HF name with {i} for the layer, HF -> ours, ours -> HF). Shapes: see the docstring.
Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _layouts(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, Transform, Transform]]:
  d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  ident = lambda w: w
  t = lambda w: w.T
  p = "model.layers.{i}."
  out = [
      (("layers", "attn", "q"), p + "self_attn.q_proj.weight",
       lambda w: w.T.reshape(d, h, hd), lambda w: w.reshape(d, h * hd).T),
      (("layers", "attn", "k"), p + "self_attn.k_proj.weight",
       lambda w: w.T.reshape(d, kv, hd), lambda w: w.reshape(d, kv * hd).T),
      (("layers", "attn", "v"), p + "self_attn.v_proj.weight",
       lambda w: w.T.reshape(d, kv, hd), lambda w: w.reshape(d, kv * hd).T),
      (("layers", "attn", "o"), p + "self_attn.o_proj.weight",
       lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T),
      (("layers", "mlp", "gate"), p + "mlp.gate_proj.weight", t, t),
      (("layers", "mlp", "up"), p + "mlp.up_proj.weight", t, t),
      (("layers", "mlp", "down"), p + "mlp.down_proj.weight", t, t),
      (("layers", "attn_norm", "scale"), p + "input_layernorm.weight", ident, ident),
      (("final_norm", "scale"), "model.norm.weight", ident, ident),
      (("embed",), "model.embed_tokens.weight", ident, ident),
  ]
  if cfg.post_norms:  # Gemma 2's four norms per layer
    out += [(("layers", "post_attn_norm", "scale"), p + "post_attention_layernorm.weight", ident, ident),
            (("layers", "mlp_norm", "scale"), p + "pre_feedforward_layernorm.weight", ident, ident),
            (("layers", "post_mlp_norm", "scale"), p + "post_feedforward_layernorm.weight", ident, ident)]
  else:
    out.append((("layers", "mlp_norm", "scale"), p + "post_attention_layernorm.weight", ident, ident))
  if cfg.qkv_bias:
    for name, heads in (("q", h), ("k", kv), ("v", kv)):
      out.append((("layers", "attn", f"{name}_bias"), p + f"self_attn.{name}_proj.bias",
                  lambda w, heads=heads: w.reshape(heads, hd), lambda w: w.reshape(-1)))
  if cfg.value_head:  # a sequence classifier: its score head, no lm_head
    out.append((("score",), "score.weight", t, t))
  elif not cfg.tie_embeddings:
    out.append((("head",), "lm_head.weight", t, t))
  return out


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


class _Checkpoint:
  """Every tensor name of a folder's safetensors files, opened lazily."""

  def __init__(self, folder: str):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = {name: os.path.join(folder, fn) for name, fn in weight_map.items()}
    else:
      paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
      if not paths:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
      files = {n: p for p in paths for n in safetensors_io.SafetensorsFile(p).names()}
    self.files = files
    self._open: dict[str, safetensors_io.SafetensorsFile] = {}

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise KeyError(f"tensor {name} is not in the checkpoint")
    path = self.files[name]
    if path not in self._open:
      self._open[path] = safetensors_io.SafetensorsFile(path)
    return self._open[path].get(name)


def read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {folder}")
  with open(path) as f:
    return json.load(f)


def load(folder: str, shardings=None, dtype=np.float32, run: Execution | None = None,
         **overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from a Hugging Face folder. `shardings`: a params-shaped tree of
  shardings (default: all on the first device); `overrides`: ModelConfig fields to change, e.g.
  `value_head=True`: a causal LM read as the start of a reward model (its lm_head left out, a
  new score head drawn from normal(0, run.init_std)). How the model runs (remat,
  attention_impl) is no part of the checkpoint: give it to `model_handle`."""
  run = run or Execution()
  cfg = config_from_hf(read_config(folder), **overrides)
  ckpt = _Checkpoint(folder)
  abstract = model_handle(cfg).abstract_params()
  params: dict[str, Any] = {}
  for path, hf_name, to_ours, _ in _layouts(cfg):
    shape = _get(abstract, path).shape
    sharding = (_get(shardings, path) if shardings is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    stacked = path[0] == "layers"
    if path == ("score",) and hf_name not in ckpt.files:  # a reward model from a causal LM
      fresh = np.random.default_rng(0).normal(0.0, run.init_std, shape).astype(dtype)
      _set(params, path, jax.make_array_from_callback(shape, sharding, lambda i, x=fresh: x[i]))
      continue

    def read(index, hf_name=hf_name, to_ours=to_ours, stacked=stacked, shape=shape):
      if not stacked:
        return np.asarray(to_ours(ckpt.get(hf_name)), dtype)[index]
      layers = range(*index[0].indices(shape[0]))
      return np.stack([np.asarray(to_ours(ckpt.get(hf_name.format(i=i))), dtype)[index[1:]]
                       for i in layers])

    _set(params, path, jax.make_array_from_callback(shape, sharding, read))
  return cfg, params


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def save(folder: str, cfg: ModelConfig, params: dict, dtype=np.float32,
         max_shard_bytes: int = 2 << 30) -> list[str]:
  """Write config.json and safetensors (sharded with an index above `max_shard_bytes`)."""
  os.makedirs(folder, exist_ok=True)
  tensors = []  # (hf name, lazy array)
  for path, hf_name, _, to_hf in _layouts(cfg):
    value = _get(params, path)
    if path[0] == "layers":
      for i in range(cfg.n_layers):
        tensors.append((hf_name.format(i=i), _Lazy(value, i, to_hf, dtype)))
    else:
      tensors.append((hf_name, _Lazy(value, None, to_hf, dtype)))
  shards, size = [[]], 0
  for name, t in tensors:
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, t))
    size += t.nbytes
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {n: fn for fn, shard in zip(names, shards) for n, _ in shard}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(t.nbytes for _, t in tensors)},
                 "weight_map": weight_map}, f, indent=1)
  for fn, shard in zip(names, shards):
    safetensors_io.write(os.path.join(folder, fn), shard)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, np.dtype(dtype).name), f, indent=1)
  return names


class _Lazy:
  """One Hugging Face tensor of a (possibly stacked, sharded) parameter, fetched when written."""

  def __init__(self, value, layer, to_hf, dtype):
    self.value, self.layer, self.to_hf, self.dtype = value, layer, to_hf, np.dtype(dtype)
    shape = value.shape[1:] if layer is not None else value.shape
    self.shape = to_hf(np.empty(shape, np.bool_)).shape
    self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

  def __array__(self, dtype=None, copy=None):
    value = self.value if self.layer is None else self.value[self.layer]
    host = np.asarray(jax.device_get(value))
    return np.asarray(self.to_hf(host), self.dtype)
