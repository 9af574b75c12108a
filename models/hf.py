"""Hugging Face checkpoints in and out: Llama (1/2/3, 3.1 rope scaling), Mistral, Qwen2, Qwen3,
Gemma, Gemma 2, and the mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE.

    cfg, params = hf.load(folder, shardings)   # config.json + *.safetensors (sharded or not)
    hf.save(folder, cfg, params)               # the same layout back, transformers loads it

Loading streams: each parameter is built with `jax.make_array_from_callback`, so a process reads
only the slices its devices hold, one Hugging Face tensor at a time (a stacked layer parameter
reads the layers its shard covers, an expert parameter the experts). Saving brings one tensor at
a time to the host.

Our layout versus Hugging Face's (torch Linear weights are (out, in)):
  q (d, heads, hd) <- q_proj (heads*hd, d) transposed;  k, v likewise with kv_heads
  o (heads, hd, d) <- o_proj (d, heads*hd) transposed;  gate/up (d, f), down (f, d) transposed
  q_norm, k_norm (hd,) (Qwen3) <- self_attn.q_norm / k_norm
  layer parameters are stacked along a leading `layers` axis (the decoder scans over them).
Rotary embeddings use the same half-split convention, so no permutation is needed.

Mixtures of experts (models/moe.py): router (d, E) <- the router's (E, d) transposed; expert e's
slice of gate/up (E, d, f) and down (E, f, d) <- that expert's own (out, in) matrices
transposed, as transformers writes them and as the published checkpoints hold them: Mixtral's
`block_sparse_moe.experts.{e}.w1` (gate), `w3` (up), `w2` (down) and `block_sparse_moe.gate`;
Qwen's `mlp.experts.{e}.gate_proj` / `up_proj` / `down_proj` and `mlp.gate`. (transformers 5
fuses them in memory, `mlp.experts.gate_up_proj` (E, 2f, d) gate rows first and `down_proj`
(E, d, f), and a file holding that layout loads too.) Qwen2-MoE's shared expert is our `shared`
MLP, its `shared_expert_gate` (1, d) our `shared_gate` (d, 1). A model that mixes dense and MoE
layers (Qwen2-MoE's `decoder_sparse_step`, `mlp_only_layers`) keeps its MoE layers in `layers`
and its dense ones in `dense_layers` (models/decoder.py): Hugging Face layer i goes to the stack
of its kind (`ModelConfig.layer_kinds`), in order.

Router losses: transformers adds `router_aux_loss_coef` times its load-balancing loss only when
`output_router_logits` is set (off in the published configs), so that is when
`router_aux_loss_weight` takes the coefficient; export writes it back the same way. The two
losses are the Switch loss alike but for how they meet the layers: ours is the mean over MoE
layers of each layer's loss, transformers' the product of the shares and probabilities pooled
over all layers (and without the padding it masks), so their values differ slightly. Mixtral's
`router_jitter_noise` is `router_jitter`. The router z-loss has no Hugging Face setting.

A routing bias (`router_bias_update_rate`, models/moe.py) has no place in these families either:
export leaves it out, so the exported model picks its experts without it (by the unbiased
probabilities it combines with), and import (with the rate given, a run's
`model.init_from`) starts it at zero.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from models import moe, safetensors_io
from models.config import Execution, ModelConfig
from models.handle import model_handle
from models.quant import model as quant_model

# architecture -> family; a family is its transformers model_type (config.json's)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Phi3ForCausalLM": "phi3", "Olmo2ForCausalLM": "olmo2",
                 "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
                 "Gemma3ForCausalLM": "gemma3", "BloomForCausalLM": "bloom",
                 "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                 "Qwen3MoeForCausalLM": "qwen3_moe"}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
QK_NORM_FAMILIES = ("qwen3", "qwen3_moe", "olmo2", "gemma3")
GEMMAS = ("gemma", "gemma2", "gemma3")  # (1 + w) norms, scaled embeddings, tied by default
MODEL_TYPES = {"gemma3": "gemma3_text"}  # config.json's model_type where it is not the family
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
  `rope_scaling`). Gemma 3's are per layer type: the full-attention layers' (with any scaling)
  and the sliding-window layers' own base (`rope_local_base_freq` in older files)."""
  params = dict(hf.get("rope_parameters") or {})
  if "full_attention" in params or "rope_local_base_freq" in hf:
    local = params.get("sliding_attention") or {"rope_theta": hf.get("rope_local_base_freq")}
    if local.get("rope_type", "default") != "default":
      raise UnsupportedModel(f"rope scaling {local['rope_type']!r} on sliding-window layers is "
                             "not supported")
    out = _rope({**hf, "rope_parameters": params.get("full_attention") or {}})
    return {**out, "rope_local_theta": float(local.get("rope_theta") or 10000.0)}
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if hf.get("model_type") == "phi3" and kind in ("su", "yarn"):  # as transformers reads Phi-3
    kind = "longrope"
  info = {**scaling, **params}
  partial = info.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise UnsupportedModel(f"partial_rotary_factor={partial}: rope over part of each head is "
                           "not supported")
  out = dict(rope_theta=float(theta))
  if kind == "default":
    return out
  if kind not in ("linear", "dynamic", "llama3", "yarn", "longrope"):
    raise UnsupportedModel(f"rope scaling {kind!r} is not supported (linear, dynamic, llama3, "
                           "yarn, longrope are)")
  max_len = hf.get("max_position_embeddings")
  orig = info.get("original_max_position_embeddings") or hf.get(
      "original_max_position_embeddings")
  factor = info.get("factor")
  if factor is None and kind in ("yarn", "longrope") and orig:  # transformers' default
    factor = max_len / orig
  out.update(rope_scaling=kind, rope_factor=float(factor))
  if kind == "dynamic":  # transformers grows the base past max_position_embeddings
    out["rope_original_max_len"] = int(max_len)
  elif kind in ("llama3", "yarn", "longrope"):
    out["rope_original_max_len"] = int(orig or max_len)
  if kind == "llama3":
    out.update(rope_low_freq_factor=float(info["low_freq_factor"]),
               rope_high_freq_factor=float(info["high_freq_factor"]))
  attention = info.get("attention_factor")
  if kind == "yarn":
    out.update(rope_beta_fast=float(info.get("beta_fast") or 32),
               rope_beta_slow=float(info.get("beta_slow") or 1),
               rope_truncate=bool(info.get("truncate", True)))
    mscale, mscale_all = info.get("mscale"), info.get("mscale_all_dim")
    if attention is None and mscale and mscale_all and factor > 1:  # DeepSeek's form
      attention = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all * math.log(factor) + 1)
  if kind == "longrope":
    out.update(rope_long_factor=tuple(info["long_factor"]),
               rope_short_factor=tuple(info["short_factor"]))
  if attention is not None:
    out["rope_attention_factor"] = float(attention)
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
  if family == "bloom":
    return _bloom_from_hf(hf, value_head, overrides)
  n_layers = hf["num_hidden_layers"]
  c = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers,
           n_heads=hf["num_attention_heads"],
           n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
           head_dim=hf.get("head_dim") or 0, d_ff=hf["intermediate_size"],
           max_seq_len=hf.get("max_position_embeddings", 8192), norm_eps=hf.get("rms_norm_eps", 1e-6),
           tie_embeddings=bool(hf.get("tie_word_embeddings", family in GEMMAS)),
           qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
           qk_norm=family in QK_NORM_FAMILIES, family=family, value_head=value_head, **_rope(hf))
  if family == "qwen2_moe":
    c["qkv_bias"] = bool(hf.get("qkv_bias", True))
  if family == "olmo2":  # norms on the outputs only; query and key norms over all heads
    c.update(pre_norms=False, post_norms=True, qk_norm_full=True)
  if family in QK_NORM_FAMILIES and c["qkv_bias"]:
    raise UnsupportedModel(f"{family} with attention_bias=true is not supported (it also biases "
                           "o_proj, which our attention has no bias for)")
  if family in MOE_FAMILIES:
    c.update(_moe_from_hf(hf, family, n_layers))
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  if act not in ("silu", "gelu_pytorch_tanh", "gelu"):
    raise UnsupportedModel(f"hidden activation {act!r} is not supported")
  c["mlp_activation"] = "silu" if act == "silu" else "gelu_tanh"  # HF runs Gemma's gelu as tanh
  window = hf.get("sliding_window") or 0
  types = hf.get("layer_types")
  if family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window",
                                                                           False):
    window, types = 0, None
  if window and not types and family in ("qwen2_moe", "qwen3"):  # a file older than layer_types
    local = ((lambda i: (i + 1) % 2 and i < hf.get("max_window_layers", 28)) if family == "qwen2_moe"
             else lambda i: i >= hf.get("max_window_layers", 28))  # transformers' rules
    types = ["sliding_attention" if local(i) else "full_attention" for i in range(n_layers)]
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
    elif family == "gemma3":  # a file older than layer_types: every 6th layer global
      pattern = int(hf.get("sliding_window_pattern") or 6)
      c["sliding_window_layers"] = tuple(i for i in range(n_layers) if (i + 1) % pattern)
  if family in GEMMAS:
    c.update(norm_offset=True, embed_scale=True)
  if family in ("gemma2", "gemma3"):
    c.update(post_norms=True, query_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
             attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
             logit_softcap=float(hf.get("final_logit_softcapping") or 0.0))
  c.update(overrides)
  return ModelConfig(**c)


# BLOOM: what sets it apart, fixed for the family; BLOOM_ONLY: the settings no other family has
BLOOM = dict(alibi=True, layer_norm=True, embed_norm=True, mlp_gated=False, out_bias=True,
             qkv_bias=True, mlp_activation="gelu_tanh", family="bloom")
BLOOM_ONLY = ("alibi", "layer_norm", "embed_norm", "mlp_gated", "out_bias")


def _bloom_from_hf(hf: dict, value_head: bool, overrides: dict) -> ModelConfig:
  """A BloomConfig (n_layer, n_head, layer_norm_epsilon; 4 x hidden MLP; no positions limit:
  seq_length, else 2048, is the model's max_seq_len)."""
  if hf.get("apply_residual_connection_post_layernorm"):
    raise UnsupportedModel("apply_residual_connection_post_layernorm=true is not supported")
  d, heads = hf["hidden_size"], hf.get("n_head") or hf["num_attention_heads"]
  c = dict(vocab_size=hf["vocab_size"], d_model=d,
           n_layers=hf.get("n_layer") or hf["num_hidden_layers"], n_heads=heads,
           n_kv_heads=heads, d_ff=4 * d, max_seq_len=int(hf.get("seq_length") or 2048),
           norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
           tie_embeddings=bool(hf.get("tie_word_embeddings", True)), value_head=value_head,
           **BLOOM)
  c.update(overrides)
  return ModelConfig(**c)


def _moe_from_hf(hf: dict, family: str, n_layers: int) -> dict:
  """The ModelConfig expert fields of a Mixtral, Qwen2-MoE or Qwen3-MoE config.json."""
  aux = dict(router_aux_loss_weight=float(hf.get("router_aux_loss_coef") or 0.0)
             if hf.get("output_router_logits") else 0.0)
  if family == "mixtral":  # every layer MoE, the top k always renormalised
    return dict(n_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"],
                expert_d_ff=hf["intermediate_size"], router_norm_topk=True,
                router_jitter=float(hf.get("router_jitter_noise") or 0.0), **aux)
  n = hf.get("num_experts") or hf.get("num_local_experts") or 0
  step = int(hf.get("decoder_sparse_step") or 1)
  only = sorted(set(hf.get("mlp_only_layers") or []))
  moe = [i for i in range(n_layers) if i not in only and (i + 1) % step == 0]
  if not n or not moe:
    raise UnsupportedModel(f"{family} without MoE layers (num_experts={n}, decoder_sparse_step="
                           f"{step}, mlp_only_layers={only}) is not supported")
  first = min(moe) if only else 0  # our dense layers: the first ones and those off the step
  if moe != [i for i in range(first, n_layers) if (i + 1) % step == 0]:
    raise UnsupportedModel(f"mlp_only_layers={only} with decoder_sparse_step={step} is not "
                           "supported: only the first layers can be dense besides the step's")
  c = dict(n_experts=n, experts_per_token=hf["num_experts_per_tok"],
           expert_d_ff=hf["moe_intermediate_size"], moe_every=step, moe_first_dense=first,
           router_norm_topk=bool(hf.get("norm_topk_prob", False)), **aux)
  if family == "qwen2_moe":  # always a shared expert, always gated
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    c.update(shared_expert_d_ff=shared, shared_expert_gate=shared > 0)
  return c


def _moe_to_hf(cfg: ModelConfig) -> dict:
  """config.json's expert settings, or UnsupportedModel for what the family cannot hold."""
  kinds, family = cfg.layer_kinds(), cfg.family
  problems = []
  if cfg.router_order != "softmax_topk":
    problems.append(f"router_order={cfg.router_order} (transformers: softmax_topk)")
  if family == "qwen2_moe" and not (cfg.shared_expert_d_ff and cfg.shared_expert_gate):
    problems.append("no gated shared expert (Qwen2-MoE has one: shared_expert_d_ff and "
                    "shared_expert_gate)")
  if family != "qwen2_moe" and cfg.shared_expert_d_ff:
    problems.append(f"shared_expert_d_ff={cfg.shared_expert_d_ff} (only qwen2_moe has one)")
  if family == "mixtral" and "mlp" in kinds:
    problems.append("dense layers (every Mixtral layer is MoE: moe_every=1, moe_first_dense=0)")
  if family == "mixtral" and not cfg.router_norm_topk:
    problems.append("router_norm_topk=False (Mixtral always renormalises)")
  if family == "mixtral" and len(set(cfg.layer_windows())) > 1:
    problems.append("sliding windows on some layers only (Mixtral: all or none)")
  if family == "qwen3_moe" and len(set(cfg.layer_windows())) > 1:
    problems.append("sliding windows on some layers only (Qwen3-MoE: all or none)")
  if problems:
    raise UnsupportedModel(f"family={family} cannot hold {'; '.join(problems)}")
  aux = dict(output_router_logits=cfg.router_aux_loss_weight > 0,
             router_aux_loss_coef=cfg.router_aux_loss_weight)
  if family == "mixtral":
    return dict(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                intermediate_size=cfg.expert_d_ff, router_jitter_noise=cfg.router_jitter, **aux)
  if cfg.router_jitter:
    raise UnsupportedModel(f"family={family} cannot hold router_jitter={cfg.router_jitter} "
                           "(only Mixtral has it)")
  hf = dict(num_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
            moe_intermediate_size=cfg.expert_d_ff, decoder_sparse_step=cfg.moe_every,
            mlp_only_layers=list(range(cfg.moe_first_dense)), norm_topk_prob=cfg.router_norm_topk,
            **aux)
  if family == "qwen2_moe":
    hf.update(shared_expert_intermediate_size=cfg.shared_expert_d_ff, qkv_bias=cfg.qkv_bias)
  return hf


def _check_family(cfg: ModelConfig):
  """UnsupportedModel when the weights need what `cfg.family`'s Hugging Face model lacks."""
  family, problems = cfg.family, []
  if cfg.n_experts and family not in MOE_FAMILIES:
    problems.append(f"n_experts={cfg.n_experts}: experts need family one of "
                    f"{', '.join(MOE_FAMILIES)}")
  if family in MOE_FAMILIES and not cfg.n_experts:
    problems.append("n_experts=0: a dense model needs a dense family")
  if cfg.qk_norm != (family in QK_NORM_FAMILIES):
    problems.append(f"qk_norm={cfg.qk_norm}: only {', '.join(QK_NORM_FAMILIES)} have it, always")
  if cfg.qk_norm_full != (family == "olmo2") or (not cfg.pre_norms) != (family == "olmo2"):
    problems.append(f"qk_norm_full={cfg.qk_norm_full}, pre_norms={cfg.pre_norms}: OLMo 2's "
                    "norms, which only olmo2 has (always)")
  if family == "bloom":
    problems += [f"{k}={getattr(cfg, k)}" for k, v in BLOOM.items()
                 if k != "family" and getattr(cfg, k) != v]
    if cfg.n_kv_heads != cfg.n_heads or cfg.d_ff != 4 * cfg.d_model or cfg.sliding_window:
      problems.append(f"n_kv_heads={cfg.n_kv_heads}, d_ff={cfg.d_ff}, sliding_window="
                      f"{cfg.sliding_window} (BLOOM: all heads, 4 x d_model, no window)")
  else:
    problems += [f"{k}={getattr(cfg, k)} (BLOOM's)" for k in BLOOM_ONLY
                 if getattr(cfg, k) == BLOOM[k]]
  if bool(cfg.rope_local_theta) != (family == "gemma3"):
    problems.append(f"rope_local_theta={cfg.rope_local_theta}: only gemma3 has a local base "
                    "(always)")
  if family == "phi3" and len(set(cfg.layer_windows())) > 1:
    problems.append("sliding_window_layers: Phi-3's window is on every layer or none")
  if cfg.qkv_bias and family in QK_NORM_FAMILIES + ("mixtral", "phi3"):
    problems.append("qkv_bias=True (no bias on q, k, v alone)")
  if problems:
    raise UnsupportedModel(f"family={family} cannot hold {'; '.join(problems)}")


def _rope_to_hf(cfg: ModelConfig) -> dict:
  """The rope_scaling of a config.json (transformers reads rope_type, factor and the rest)."""
  kind = cfg.rope_scaling
  if kind == "ntk":
    raise UnsupportedModel("rope_scaling=ntk (static NTK-aware) has no transformers rope_type; "
                           "use dynamic or yarn to export")
  if kind == "dynamic" and cfg.rope_original_max_len != cfg.max_seq_len:
    raise UnsupportedModel(f"rope_scaling=dynamic from rope_original_max_len="
                           f"{cfg.rope_original_max_len}: transformers grows the base past "
                           f"max_position_embeddings, which is max_seq_len={cfg.max_seq_len}")
  scaling = dict(rope_type=kind, factor=cfg.rope_factor)
  if kind in ("llama3", "yarn", "longrope"):
    scaling["original_max_position_embeddings"] = cfg.rope_original_max_len
  if kind == "llama3":
    scaling.update(low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor)
  if kind == "yarn":
    scaling.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                   truncate=cfg.rope_truncate)
  if kind == "longrope":
    scaling.update(long_factor=list(cfg.rope_long_factor),
                   short_factor=list(cfg.rope_short_factor))
  if cfg.rope_attention_factor and kind in ("yarn", "longrope"):
    scaling["attention_factor"] = cfg.rope_attention_factor
  return scaling


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
  _check_family(cfg)
  arch = next(a for a, f in (CLASSIFIERS if cfg.value_head else ARCHITECTURES).items()
              if f == cfg.family)
  if cfg.family == "bloom":
    return dict(architectures=[arch], model_type="bloom", vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                layer_norm_epsilon=cfg.norm_eps, seq_length=cfg.max_seq_len,
                tie_word_embeddings=cfg.tie_embeddings, torch_dtype=dtype, dtype=dtype,
                apply_residual_connection_post_layernorm=False, hidden_dropout=0.0,
                attention_dropout=0.0, pretraining_tp=1, slow_but_exact=False,
                **(dict(num_labels=1, pad_token_id=0) if cfg.value_head else {}))
  windows = cfg.layer_windows()
  hf = dict(architectures=[arch], model_type=MODEL_TYPES.get(cfg.family, cfg.family),
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, torch_dtype=dtype, dtype=dtype,
            hidden_act="silu" if cfg.mlp_activation == "silu" else "gelu_pytorch_tanh",
            rope_theta=cfg.rope_theta, attention_dropout=0.0)
  if cfg.rope_scaling != "none":
    hf["rope_scaling"] = _rope_to_hf(cfg)
  if cfg.family == "gemma3":  # transformers 5's per-layer-type form, and the older keys
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta, **hf.get("rope_scaling", {})}
    hf.update(rope_local_base_freq=cfg.rope_local_theta, rope_parameters={
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}})
  if cfg.family in ("llama", "mistral"):
    hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
  if cfg.family == "phi3":  # its original length is a top-level key; no padding row
    hf.update(original_max_position_embeddings=cfg.rope_original_max_len, pad_token_id=None)
  if cfg.family in QK_NORM_FAMILIES:
    hf["attention_bias"] = False
  if cfg.family in MOE_FAMILIES:
    hf.update(_moe_to_hf(cfg))
  if cfg.value_head:  # read by *ForSequenceClassification at the last token that is not padding
    hf.update(num_labels=1, pad_token_id=0)
  if cfg.family in ("gemma2", "gemma3"):
    scalar = cfg.scale ** -2  # scale = query_pre_attn_scalar ** -0.5; transformers wants an int
    hf.update(hidden_activation=hf["hidden_act"],
              query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
              attn_logit_softcapping=cfg.attn_softcap or None,
              final_logit_softcapping=cfg.logit_softcap or None)
  if cfg.sliding_window:
    hf["sliding_window"] = cfg.sliding_window
    hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
    if cfg.family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
      hf.update(use_sliding_window=True,
                max_window_layers=min([i for i, w in enumerate(windows) if w] or [cfg.n_layers]))
  elif cfg.family in ("mistral", "qwen2", "gemma2", "gemma3", "qwen3", "phi3", "mixtral",
                      "qwen2_moe", "qwen3_moe"):
    hf["sliding_window"] = None
  return hf


# ----------------------------------------------------------------------------------------------
# Tensor names and layouts
# ----------------------------------------------------------------------------------------------

# (our path, HF name, HF -> ours, ours -> HF). Shapes: see the docstring. A path starting with a
# layer stack (`stacks`) is stacked over layers and its name has {i} for the Hugging Face layer;
# a name with {e} too is one expert's tensor, our array's next axis the expert's.
Transform = Callable[[np.ndarray], np.ndarray]


def stacks(cfg: ModelConfig) -> dict[str, list[int]]:
  """The Hugging Face layer of each entry of each stack of layers (models/decoder.py): all in
  `layers`, or, in a model mixing dense and MoE layers, the MoE ones in `layers` and the dense
  ones in `dense_layers`, in order."""
  kinds = cfg.layer_kinds()
  if len(set(kinds)) == 1:
    return {"layers": list(range(cfg.n_layers))}
  return {"layers": [i for i, k in enumerate(kinds) if k == "moe"],
          "dense_layers": [i for i, k in enumerate(kinds) if k == "mlp"]}


def _bloom_layouts(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, Transform, Transform]]:
  """BLOOM's names: transformer.h.{i}..., LayerNorms with biases, one query_key_value matrix
  whose rows interleave q, k and v head by head (see _split_fused), tied head."""
  d, h, hd, ident, t = cfg.d_model, cfg.n_heads, cfg.head_dim, _ident, _t
  p = "transformer.h.{i}."
  qkv = p + "self_attention.query_key_value."
  layer = [(("attn", n), qkv + "weight|" + n, lambda w: w.T.reshape(d, h, hd),
            lambda w: w.reshape(d, h * hd).T) for n in ("q", "k", "v")]
  layer += [(("attn", f"{n}_bias"), qkv + "bias|" + n, lambda w: w.reshape(h, hd),
             lambda w: w.reshape(-1)) for n in ("q", "k", "v")]
  layer += [(("attn", "o"), p + "self_attention.dense.weight", lambda w: w.T.reshape(h, hd, d),
             lambda w: w.reshape(h * hd, d).T),
            (("attn", "o_bias"), p + "self_attention.dense.bias", ident, ident),
            (("mlp", "up"), p + "mlp.dense_h_to_4h.weight", t, t),
            (("mlp", "up_bias"), p + "mlp.dense_h_to_4h.bias", ident, ident),
            (("mlp", "down"), p + "mlp.dense_4h_to_h.weight", t, t),
            (("mlp", "down_bias"), p + "mlp.dense_4h_to_h.bias", ident, ident)]
  norms = [("attn_norm", p + "input_layernorm"), ("mlp_norm", p + "post_attention_layernorm")]
  layer += [((ours, kind), f"{name}.{theirs}", ident, ident) for ours, name in norms
            for kind, theirs in (("scale", "weight"), ("bias", "bias"))]
  out = [(("embed",), "transformer.word_embeddings.weight", ident, ident)]
  out += [((ours, kind), f"transformer.{name}.{theirs}", ident, ident)
          for ours, name in (("embed_norm", "word_embeddings_layernorm"), ("final_norm", "ln_f"))
          for kind, theirs in (("scale", "weight"), ("bias", "bias"))]
  out += [(("layers", *path), name, a, b) for path, name, a, b in layer]
  if cfg.value_head:
    out.append((("score",), "score.weight", t, t))
  elif not cfg.tie_embeddings:
    out.append((("head",), "lm_head.weight", t, t))
  return out


def _layouts(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, Transform, Transform]]:
  if cfg.family == "bloom":
    return _bloom_layouts(cfg)
  out = [(("final_norm", "scale"), "model.norm.weight", _ident, _ident),
         (("embed",), "model.embed_tokens.weight", _ident, _ident)]
  for stack in stacks(cfg):
    moe = stack == "layers" and "moe" in cfg.layer_kinds()
    out += [((stack, *path), name, a, b) for path, name, a, b in _layer_layouts(cfg, moe)]
  if cfg.value_head:  # a sequence classifier: its score head, no lm_head
    out.append((("score",), "score.weight", _t, _t))
  elif not cfg.tie_embeddings:
    out.append((("head",), "lm_head.weight", _t, _t))
  return out


def _ident(w):
  return w


def _t(w):
  return w.T


def _layer_layouts(cfg: ModelConfig, moe: bool):
  """One layer's (path in the Block, HF name, HF -> ours, ours -> HF); `moe`: its FFN is a
  mixture of experts."""
  d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  ident, t = _ident, _t
  p = "model.layers.{i}."
  # Phi-3 fuses q, k and v into one matrix, and gate and up: "fused|part" names (_split_fused)
  qkv = {n: (p + "self_attn.qkv_proj.weight|" + n if cfg.family == "phi3"
             else p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")}
  out = [
      (("attn", "q"), qkv["q"],
       lambda w: w.T.reshape(d, h, hd), lambda w: w.reshape(d, h * hd).T),
      (("attn", "k"), qkv["k"],
       lambda w: w.T.reshape(d, kv, hd), lambda w: w.reshape(d, kv * hd).T),
      (("attn", "v"), qkv["v"],
       lambda w: w.T.reshape(d, kv, hd), lambda w: w.reshape(d, kv * hd).T),
      (("attn", "o"), p + "self_attn.o_proj.weight",
       lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T),
  ]
  if cfg.pre_norms:
    out.append((("attn_norm", "scale"), p + "input_layernorm.weight", ident, ident))
  if moe and cfg.family == "mixtral":
    m = p + "block_sparse_moe."
    names = dict(router=m + "gate.weight", gate=m + "experts.{e}.w1.weight",
                 up=m + "experts.{e}.w3.weight", down=m + "experts.{e}.w2.weight")
  elif moe:
    m = p + "mlp."
    names = dict(router=m + "gate.weight", gate=m + "experts.{e}.gate_proj.weight",
                 up=m + "experts.{e}.up_proj.weight", down=m + "experts.{e}.down_proj.weight")
    if cfg.shared_expert_d_ff:
      names.update({("shared", n): m + f"shared_expert.{n}_proj.weight"
                    for n in ("gate", "up", "down")})
      if cfg.shared_expert_gate:
        names["shared_gate"] = m + "shared_expert_gate.weight"
  elif cfg.family == "phi3":
    names = {"gate": p + "mlp.gate_up_proj.weight|gate", "up": p + "mlp.gate_up_proj.weight|up",
             "down": p + "mlp.down_proj.weight"}
  else:
    names = {n: p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
  for name, hf_name in names.items():  # all (out, in) Linear weights, ours (in, out)
    out.append((("mlp", *((name,) if isinstance(name, str) else name)), hf_name, t, t))
  if cfg.post_norms:  # Gemma 2's four norms per layer; OLMo 2's two after
    out += [(("post_attn_norm", "scale"), p + "post_attention_layernorm.weight", ident, ident),
            (("post_mlp_norm", "scale"), p + "post_feedforward_layernorm.weight", ident, ident)]
    if cfg.pre_norms:
      out.append((("mlp_norm", "scale"), p + "pre_feedforward_layernorm.weight", ident, ident))
  else:
    out.append((("mlp_norm", "scale"), p + "post_attention_layernorm.weight", ident, ident))
  if cfg.qkv_bias:
    for name, heads in (("q", h), ("k", kv), ("v", kv)):
      out.append((("attn", f"{name}_bias"), p + f"self_attn.{name}_proj.bias",
                  lambda w, heads=heads: w.reshape(heads, hd), lambda w: w.reshape(-1)))
  if cfg.qk_norm_full:  # (heads * head_dim,) in the file, (heads, head_dim) here
    out += [(("attn", f"{n}_norm", "scale"), p + f"self_attn.{n}_norm.weight",
             lambda w, heads=heads: w.reshape(heads, hd), lambda w: w.reshape(-1))
            for n, heads in (("q", h), ("k", kv))]
  elif cfg.qk_norm:
    out += [(("attn", f"{n}_norm", "scale"), p + f"self_attn.{n}_norm.weight", ident, ident)
            for n in ("q", "k")]
  return out


def _split_fused(cfg: ModelConfig, fused: str, full: np.ndarray) -> dict[str, np.ndarray]:
  """A fused Hugging Face tensor's parts by name, in their order: Phi-3's qkv_proj (q, k, v
  rows one after the other) and gate_up_proj (gate rows, then up), BLOOM's query_key_value
  (q, k and v rows interleaved head by head: (heads, 3, head_dim, ...))."""
  h, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  if ".query_key_value." in fused:
    heads = full.reshape(h, 3, hd, *full.shape[1:])
    return {n: heads[:, i].reshape(h * hd, *full.shape[1:]) for i, n in enumerate("qkv")}
  rows = ({"q": h * hd, "k": kv * hd, "v": kv * hd} if fused.endswith("qkv_proj.weight")
          else {"gate": cfg.d_ff, "up": cfg.d_ff})
  bounds = np.cumsum([0, *rows.values()])
  return {n: full[bounds[i]:bounds[i + 1]] for i, n in enumerate(rows)}


def _merge_fused(cfg: ModelConfig, fused: str, parts: dict[str, np.ndarray]) -> np.ndarray:
  """`_split_fused` undone."""
  if ".query_key_value." in fused:
    h, hd = cfg.n_heads, cfg.head_dim
    rest = parts["q"].shape[1:]
    return np.stack([parts[n].reshape(h, hd, *rest) for n in "qkv"], axis=1).reshape(
        3 * h * hd, *rest)
  return np.concatenate(list(parts.values()))


def _read(ckpt: "_Checkpoint", cfg: ModelConfig, name: str) -> np.ndarray:
  """A tensor by its layout name; "fused|part" is that part of the fused tensor."""
  if "|" not in name:
    return ckpt.get(name)
  fused, part = name.split("|")
  return _split_fused(cfg, fused, ckpt.get(fused))[part]


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

# One expert's tensor by its per-expert name, and where transformers 5's fused layout keeps it.
_EXPERT = re.compile(r"(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                     r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")


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
      fused = self._fused(name)
      if fused is not None:
        return fused
      raise KeyError(f"tensor {name} is not in the checkpoint")
    path = self.files[name]
    if path not in self._open:
      self._open[path] = safetensors_io.SafetensorsFile(path)
    return self._open[path].get(name)

  def _fused(self, name: str) -> np.ndarray | None:
    """An expert's (out, in) matrix or a Mixtral router from the fused layout (a view), if the
    file has it."""
    if name.endswith(".block_sparse_moe.gate.weight"):
      other = name.replace(".block_sparse_moe.", ".mlp.")
      return self.get(other) if other in self.files else None
    match = _EXPERT.fullmatch(name)
    if match is None:
      return None
    layer, e, kind = match[1], int(match[2]), match[3]
    if kind in ("w2", "down_proj"):
      fused = layer + ".mlp.experts.down_proj"
      return self.get(fused)[e] if fused in self.files else None
    fused = layer + ".mlp.experts.gate_up_proj"  # (E, 2f, d): gate rows, then up rows
    if fused not in self.files:
      return None
    gate_up = self.get(fused)[e]
    f = gate_up.shape[0] // 2
    return gate_up[:f] if kind in ("w1", "gate_proj") else gate_up[f:]


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
  layer_ids = stacks(cfg)
  params: dict[str, Any] = {}
  for path, hf_name, to_ours, _ in _layouts(cfg):
    shape = _get(abstract, path).shape
    sharding = (_get(shardings, path) if shardings is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    if path == ("score",) and hf_name not in ckpt.files:  # a reward model from a causal LM
      fresh = np.random.default_rng(0).normal(0.0, run.init_std, shape).astype(dtype)
      _set(params, path, jax.make_array_from_callback(shape, sharding, lambda i, x=fresh: x[i]))
      continue

    def one(name, index, to_ours=to_ours):
      return np.asarray(to_ours(_read(ckpt, cfg, name)), dtype)[index]

    def read(index, hf_name=hf_name, layers=layer_ids.get(path[0]), shape=shape, one=one):
      if layers is None:
        return one(hf_name, index)
      rows = [layers[j] for j in range(*index[0].indices(shape[0]))]
      if "{e}" not in hf_name:
        return np.stack([one(hf_name.format(i=i), index[1:]) for i in rows])
      experts = range(*index[1].indices(shape[1]))
      return np.stack([np.stack([one(hf_name.format(i=i, e=e), index[2:]) for e in experts])
                       for i in rows])

    _set(params, path, jax.make_array_from_callback(shape, sharding, read))
  if cfg.router_bias_update_rate:  # no Hugging Face tensor: the routing bias starts at zero
    path = ("layers", "mlp", moe.BIAS_STEPS)
    sharding = (_get(shardings, path) if shardings is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    zeros = np.zeros(_get(abstract, path).shape, np.int32)
    _set(params, path, jax.device_put(zeros, sharding))
  return cfg, params


def load_quantized(folder: str) -> tuple[ModelConfig, quant_model.Quantized, dict]:
  """(ModelConfig, Quantized, params) of a folder trainer/quantize.py wrote: its config.json is
  a Hugging Face config, its model.safetensors our parameter tree (integers and scales for the
  quantized weights, models/quant/model.py)."""
  quant = quant_model.read(folder)
  if quant is None:
    raise ValueError(f"{folder} holds no {quant_model.FILE}: not a quantized model")
  cfg = config_from_hf(read_config(folder))
  tensors = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
  return cfg, quant, jax.tree.map(jnp.asarray, quant_model.unflat(tensors))


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def save_quantized(folder: str, cfg: ModelConfig, quant: quant_model.Quantized,
                   params: dict) -> list[str]:
  """The folder `load_quantized` reads: config.json (a Hugging Face config), model.safetensors
  (our parameter tree: integers, scales and zero points, and the float weights) and
  quantization.json."""
  tensors = quant_model.flat(jax.tree.map(np.asarray, params))
  safetensors_io.write(os.path.join(folder, "model.safetensors"), sorted(tensors.items()))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, "float32"), f, indent=1)
  quant_model.write(folder, quant)
  return ["config.json", "model.safetensors", quant_model.FILE]


def save(folder: str, cfg: ModelConfig, params: dict, dtype=np.float32,
         max_shard_bytes: int = 2 << 30) -> list[str]:
  """Write config.json and safetensors (sharded with an index above `max_shard_bytes`).
  UnsupportedModel (before writing anything) when `cfg.family`'s Hugging Face model cannot hold
  the weights."""
  hf_config = config_to_hf(cfg, np.dtype(dtype).name)
  os.makedirs(folder, exist_ok=True)
  layer_ids = stacks(cfg)
  tensors = []  # (hf name, lazy array)
  for path, hf_name, _, to_hf in _layouts(cfg):
    value = _get(params, path)
    if path[0] not in layer_ids:
      tensors.append((hf_name, _Lazy(value, (), to_hf, dtype)))
      continue
    for j, i in enumerate(layer_ids[path[0]]):
      if "{e}" in hf_name:
        tensors += [(hf_name.format(i=i, e=e), _Lazy(value, (j, e), to_hf, dtype))
                    for e in range(cfg.n_experts)]
      else:
        tensors.append((hf_name.format(i=i), _Lazy(value, (j,), to_hf, dtype)))
  tensors = _fuse(cfg, tensors)
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
    json.dump(hf_config, f, indent=1)
  return names


def _fuse(cfg: ModelConfig, tensors: list) -> list:
  """The "fused|part" entries of `tensors` joined into their fused tensor."""
  out, parts = [], {}
  for name, t in tensors:
    if "|" not in name:
      out.append((name, t))
      continue
    fused, part = name.split("|")
    if fused not in parts:
      parts[fused] = {}
      out.append((fused, None))  # its place; filled below
    parts[fused][part] = t
  return [(name, t if t is not None else _Fused(cfg, name, parts[name])) for name, t in out]


class _Fused:
  """A fused tensor of lazy parts (`_merge_fused`), fetched when written."""

  def __init__(self, cfg: ModelConfig, name: str, parts: dict):
    self.cfg, self.name, self.parts = cfg, name, parts
    first = next(iter(parts.values()))
    self.dtype = first.dtype
    self.shape = (sum(p.shape[0] for p in parts.values()), *first.shape[1:])
    self.nbytes = sum(p.nbytes for p in parts.values())

  def __array__(self, dtype=None, copy=None):
    return _merge_fused(self.cfg, self.name, {n: np.asarray(p) for n, p in self.parts.items()})


class _Lazy:
  """One Hugging Face tensor of a (possibly stacked, sharded) parameter, fetched when written:
  `index`, its entry of the stacked axes (layer, and expert)."""

  def __init__(self, value, index: tuple, to_hf, dtype):
    self.value, self.index, self.to_hf, self.dtype = value, index, to_hf, np.dtype(dtype)
    self.shape = to_hf(np.empty(value.shape[len(index):], np.bool_)).shape
    self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

  def __array__(self, dtype=None, copy=None):
    value = self.value[self.index] if self.index else self.value
    host = np.asarray(jax.device_get(value))
    return np.asarray(self.to_hf(host), self.dtype)
