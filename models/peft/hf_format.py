"""Adapters in Hugging Face PEFT's format: adapter_config.json + adapter_model.safetensors.

    write(folder, peft, params)          # HF PEFT's PeftModel.from_pretrained(base, folder) loads it
    adapters = read(folder, peft)        # the same tensors back into our tree

Names follow PEFT for a *ForCausalLM base: base_model.model.model.layers.{i}.self_attn.q_proj.
lora_A.weight (r, in), lora_B.weight (out, r), lora_magnitude_vector (out) for DoRA, lora_E
(r, 1) for AdaLoRA (always at the initial rank: masked triplets are zeros),
vera_lambda_d (r) / vera_lambda_b (out) with the shared base_model.vera_A (r, max_in) and
vera_B (max_out, r), ia3_l (out, 1) or, for feed-forward modules, (1, in). Ours are the
transposes, stacked over layers (models/peft/__init__.py). Virtual-token methods are saved as PEFT
saves them for inference: `prompt_embeddings`, the encoder's output, (n, d_model) or, for prefix
tuning, (n, layers * 2 * kv_heads * head_dim).
"""

from __future__ import annotations

import json
import os

import numpy as np

from models import safetensors_io
from models.peft import IA3_FEEDFORWARD, LINEAR, Peft, _dims
from models.peft import prompt as prompt_lib

METHODS = ("lora", "dora", "adalora", "vera", "ia3", *prompt_lib.METHODS)  # that PEFT can load

PREFIX = "base_model.model.model.layers.{i}."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_SCOPE = {"attn": "self_attn", "mlp": "mlp"}


def _module(module: str, name: str) -> str:
  return f"{_SCOPE[module]}.{LINEAR[(module, name)][0]}"


def _pairs(peft: Peft):
  """(our module, weight, layer, PEFT name prefix, our leaf, PEFT leaf, to PEFT, from PEFT)."""
  for module, name in peft.targets:
    n_in, n_out = _dims(peft.mcfg, module, name)
    for i in range(peft.mcfg.n_layers):
      at = PREFIX.format(i=i) + _module(module, name) + "."
      if peft.method in ("lora", "dora"):
        yield module, name, i, at + "lora_A.weight", "lora_a", lambda a: a.T, lambda t: t.T
        yield module, name, i, at + "lora_B.weight", "lora_b", lambda b: b.T, lambda t: t.T
        if peft.method == "dora":
          yield module, name, i, at + "lora_magnitude_vector", "magnitude", lambda m: m, lambda t: t
      elif peft.method == "adalora":
        yield module, name, i, at + "lora_A", "lora_a", lambda a: a.T, lambda t: t.T
        yield module, name, i, at + "lora_E", "lora_e", lambda e: e[:, None], lambda t: t[:, 0]
        yield module, name, i, at + "lora_B", "lora_b", lambda b: b.T, lambda t: t.T
      elif peft.method == "vera":
        yield module, name, i, at + "vera_lambda_d", "lambda_d", lambda x: x, lambda t: t
        yield module, name, i, at + "vera_lambda_b", "lambda_b", lambda x: x, lambda t: t
      elif peft.method == "ia3":
        ff = LINEAR[(module, name)][0] in IA3_FEEDFORWARD
        yield (module, name, i, at + "ia3_l", "ia3",
               (lambda x: x[None, :]) if ff else (lambda x: x[:, None]), lambda t: t.reshape(-1))


def adapter_config(peft: Peft) -> dict:
  """PEFT's adapter_config.json. A PiSSA adapter is written as a plain LoRA of twice the rank
  (see `write`), with alpha raised to keep the same scale."""
  modules = sorted({LINEAR[t][0] for t in peft.targets})
  common = {"target_modules": modules, "base_model_name_or_path": None, "task_type": "CAUSAL_LM",
            "inference_mode": True, "fan_in_fan_out": False, "modules_to_save": None}
  if peft.method in ("lora", "dora"):
    pissa = peft.init_kind == "pissa"
    rank = 2 * peft.rank if pissa else peft.rank
    alpha = peft.alpha * ((2 ** 0.5 if peft.rslora else 2.0) if pissa else 1.0)
    return {**common, "peft_type": "LORA", "r": rank, "lora_alpha": alpha,
            "lora_dropout": 0.0, "use_rslora": peft.rslora, "use_dora": peft.method == "dora",
            "bias": "none", "init_lora_weights": True}
  if peft.method == "adalora":
    a = peft.allocator
    return {**common, "peft_type": "ADALORA", "init_r": peft.rank, "target_r": a.target_rank,
            "lora_alpha": peft.alpha, "lora_dropout": peft.dropout, "tinit": a.tinit,
            "tfinal": a.tfinal, "deltaT": a.delta_t, "beta1": a.beta1, "beta2": a.beta2,
            "orth_reg_weight": peft.orth_weight, "rank_pattern": None, "bias": "none",
            "total_step": max(a.total_steps, a.tinit + a.tfinal + 1)}
  if peft.prompt is not None:
    return _prompt_config(peft)
  if peft.method == "vera":
    return {**common, "peft_type": "VERA", "r": peft.vera_rank, "d_initial": peft.vera_d_initial,
            "projection_prng_key": 0, "save_projection": True, "vera_dropout": 0.0, "bias": "none"}
  if peft.method == "ia3":
    ff = sorted({LINEAR[t][0] for t in peft.targets} & set(IA3_FEEDFORWARD))
    return {**common, "peft_type": "IA3", "feedforward_modules": ff, "init_ia3_weights": True}
  raise ValueError(f"peft.method={peft.method} has no Hugging Face PEFT format here")


def _prompt_config(peft: Peft) -> dict:
  p, c = peft.prompt, peft.mcfg
  config = {"task_type": "CAUSAL_LM", "inference_mode": True, "base_model_name_or_path": None,
            "num_virtual_tokens": p.n, "token_dim": p.token_dim, "num_transformer_submodules": 1,
            "num_attention_heads": c.n_kv_heads if p.method == "prefix" else c.n_heads,
            "num_layers": c.n_layers}
  if p.method == "prompt":
    return {**config, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM"}
  if p.method == "ptuning":
    return {**config, "peft_type": "P_TUNING", "encoder_hidden_size": p.width,
            "encoder_reparameterization_type": p.encoder.upper(), "encoder_num_layers": 2,
            "encoder_dropout": 0.0}
  # the keys and values themselves: PEFT loads them without the projection
  return {**config, "peft_type": "PREFIX_TUNING", "encoder_hidden_size": p.width,
          "prefix_projection": False}


def write(folder: str, peft: Peft, params: dict, dtype=np.float32) -> list[str]:
  """The adapters as PEFT files, to be loaded onto the original base model. PiSSA trains
  against a residual base W - s*A0@B0; as PEFT's own conversion does, it is written as the
  rank-2r LoRA [A, A0] @ [B; -B0], whose product is the change s*(A@B - A0@B0) from W."""
  os.makedirs(folder, exist_ok=True)
  adapters = params["peft"]
  pissa = peft.init_kind == "pissa" and peft.method in ("lora", "dora")
  tensors = []
  if peft.prompt is not None:
    tensors.append(("prompt_embeddings", np.asarray(peft.prompt.flat(adapters["prompt"]), dtype)))
  for module, name, i, key, leaf, to_peft, _ in _pairs(peft):
    entry = adapters[module][name]
    value = np.asarray(entry[leaf][i], np.float32)
    if pissa and leaf == "lora_a":
      value = np.concatenate([value, np.asarray(entry["lora_a_init"][i], np.float32)], axis=1)
    elif pissa and leaf == "lora_b":
      value = np.concatenate([value, -np.asarray(entry["lora_b_init"][i], np.float32)], axis=0)
    tensors.append((key, np.asarray(to_peft(value), dtype)))
  if peft.method == "vera":
    tensors += [("base_model.vera_A", np.asarray(adapters["vera_shared"]["a"], dtype)),
                ("base_model.vera_B", np.asarray(adapters["vera_shared"]["b"], dtype))]
  safetensors_io.write(os.path.join(folder, WEIGHTS), tensors)
  with open(os.path.join(folder, CONFIG), "w") as f:
    json.dump(adapter_config(peft), f, indent=1)
  return [CONFIG, WEIGHTS]


def read(folder: str, peft: Peft) -> dict:
  """Adapters from a PEFT folder, for a `peft` of the same method and targets."""
  tensors = safetensors_io.SafetensorsFile(os.path.join(folder, WEIGHTS))
  if peft.prompt is not None:
    p = peft.prompt
    if p.method == "ptuning" or p.projection:
      raise ValueError("PEFT saves only the encoder's output: a P-tuning or projected prefix "
                       "adapter reads back as prompt tuning or a plain prefix")
    flat = np.asarray(tensors.get("prompt_embeddings"), np.float32)
    if p.method == "prompt":
      return {"prompt": {"embedding": flat}}
    c = peft.mcfg
    kv = flat.reshape(p.n, c.n_layers, 2, c.n_kv_heads, c.head_dim).transpose(1, 2, 0, 3, 4)
    return {"prompt": {"kv": kv}}
  layers: dict = {}
  for module, name, i, key, leaf, _, from_peft in _pairs(peft):
    layers.setdefault((module, name, leaf), {})[i] = from_peft(np.asarray(tensors.get(key),
                                                                          np.float32))
  adapters: dict = {}
  for (module, name, leaf), by_layer in layers.items():
    stacked = np.stack([by_layer[i] for i in range(peft.mcfg.n_layers)])
    adapters.setdefault(module, {}).setdefault(name, {})[leaf] = stacked
  if peft.method == "vera":
    adapters["vera_shared"] = {"a": np.asarray(tensors.get("base_model.vera_A"), np.float32),
                               "b": np.asarray(tensors.get("base_model.vera_B"), np.float32)}
  return adapters
