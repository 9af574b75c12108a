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

Mixtures of experts. The shared expert is an ordinary module, ...mlp.shared_expert.gate_proj.
The routed experts are transformers 5's fused parameters, mlp.experts.gate_up_proj (E, 2f, d),
gate rows first, and mlp.experts.down_proj (E, d, f), which PEFT adapts with LoRA through
`target_parameters` (its ParamWrapper): per layer one lora_A.weight (E * R, in) and
lora_B.weight (out, E * R) per parameter, expert e's A the rows e*R .. e*R + R - 1 and its B the
columns e, E + e, ..., (R - 1) * E + e (PEFT's layout), the change to expert e's (out, in)
weight scale * B_e @ A_e. PEFT nests one ParamWrapper per parameter on the experts module in the
order the module defines them, gate_up_proj inside, so with both targeted gate_up_proj's
tensors are ...mlp.experts.base_layer.lora_A.weight and down_proj's ...mlp.experts.lora_A.weight;
with one, ...mlp.experts.lora_A.weight.
Our gate and up adapters are two pairs per expert where PEFT has one over the fused output; both
are written as the one pair of rank R = 2r
    A_e = [a_gate^T; a_up^T] (2r, d),   B_e = [[b_gate^T, 0], [0, b_up^T]] (2f, 2r),
exact, with rank_pattern and alpha_pattern {"experts.gate_up_proj": 2r, 2 alpha (rsLoRA:
sqrt(2) alpha)} keeping the scale; one of the two alone is a pair of rank r whose other half of B
is zero. `read` takes these back, and also PEFT's own rank-r pair over gate_up (A shared by gate
and up, exact as well).
With `train_router`, each layer's router goes along whole as PEFT's `modules_to_save`
["mlp.gate"] (transformers' router; PEFT matches names by suffix, and a bare "gate" would catch
Qwen2-MoE's shared_expert_gate too): ...layers.{i}.mlp.gate.weight (E, d). `read` returns the
adapters only; the routers are model weights.
"""

from __future__ import annotations

import json
import os

import numpy as np

from models import safetensors_io
from models.peft import Peft, _feedforward, hf_name
from models.peft import prompt as prompt_lib

METHODS = ("lora", "dora", "adalora", "vera", "ia3", *prompt_lib.METHODS)  # that PEFT can load

PREFIX = "base_model.model.model.layers.{i}."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_SCOPE = {"attn": "self_attn", "mlp": "mlp", "shared": "mlp"}
GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"
FUSED_FAMILIES = ("phi3", "bloom")  # fused q, k, v: no PEFT names for our adapters


def _module(module: str, name: str) -> str:
  return f"{_SCOPE[module]}.{hf_name(module, name)}"


def _pairs(peft: Peft):
  """(our module, weight, layer, PEFT name prefix, our leaf, PEFT leaf, to PEFT, from PEFT)."""
  for module, name in peft.targets:
    if module == "experts":  # fused in PEFT: `_expert_tensors`
      continue
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
        ff = _feedforward(module, name)
        yield (module, name, i, at + "ia3_l", "ia3",
               (lambda x: x[None, :]) if ff else (lambda x: x[:, None]), lambda t: t.reshape(-1))


def _experts(peft: Peft) -> dict[str, tuple[str, ...]]:
  """PEFT's targeted expert parameters -> our expert weights each holds, in its order."""
  ours = [n for m, n in peft.targets if m == "experts"]
  out = {GATE_UP: tuple(n for n in ("gate", "up") if n in ours)}
  if "down" in ours:
    out[DOWN] = ("down",)
  return {k: v for k, v in out.items() if v}


def _expert_at(peft: Peft, i: int, param: str) -> str:
  """The name prefix of `param`'s pair in layer i: PEFT nests a ParamWrapper per parameter,
  gate_up_proj's inside down_proj's when both are targeted."""
  nested = param == GATE_UP and DOWN in _experts(peft)
  return PREFIX.format(i=i) + "mlp.experts." + ("base_layer." if nested else "")


def _to_peft_pair(a, b):
  """Per-expert a (E, in, R), b (E, R, out) -> PEFT's lora_A (E * R, in), lora_B (out, R * E)."""
  e, n_in, r = a.shape
  return a.transpose(0, 2, 1).reshape(e * r, n_in), b.transpose(2, 1, 0).reshape(-1, r * e)


def _from_peft_pair(lora_a, lora_b, e: int):
  """`_to_peft_pair`'s inverse: (a (E, in, R), b (E, R, out))."""
  r = lora_a.shape[0] // e
  return (lora_a.reshape(e, r, -1).transpose(0, 2, 1),
          lora_b.reshape(lora_b.shape[0], r, e).transpose(2, 1, 0))


def _expert_tensors(peft: Peft, adapters: dict, i: int):
  """(name, array) of layer i's routed-expert LoRA in PEFT's form (module docstring)."""
  f = peft.mcfg.expert_d_ff
  for param, names in _experts(peft).items():
    pairs = [(np.asarray(adapters[n]["lora_a"][i], np.float32),
              np.asarray(adapters[n]["lora_b"][i], np.float32)) for n in names]
    if param == GATE_UP:  # (E, d, R) and (E, R, 2f): gate's outputs first, block-diagonal B
      a = np.concatenate([a for a, _ in pairs], axis=-1)
      b = np.zeros((a.shape[0], a.shape[-1], 2 * f), np.float32)
      r = peft.rank
      for k, (name, (_, b_n)) in enumerate(zip(names, pairs)):
        cols = slice(0, f) if name == "gate" else slice(f, 2 * f)
        b[:, k * r:(k + 1) * r, cols] = b_n
    else:
      (a, b), = pairs
    lora_a, lora_b = _to_peft_pair(a, b)
    at = _expert_at(peft, i, param)
    yield at + "lora_A.weight", lora_a
    yield at + "lora_B.weight", lora_b


def _read_experts(peft: Peft, tensors) -> dict:
  """Our routed-expert adapters from PEFT's tensors: as `write` makes them or, for gate and up,
  PEFT's own rank-r pair over the fused output (A shared by the two halves)."""
  c, r = peft.mcfg, peft.rank
  f = c.expert_d_ff
  by_layer: dict = {}
  for i in range(c.n_layers):
    for param, names in _experts(peft).items():
      at = _expert_at(peft, i, param)
      a, b = _from_peft_pair(np.asarray(tensors.get(at + "lora_A.weight"), np.float32),
                             np.asarray(tensors.get(at + "lora_B.weight"), np.float32),
                             c.n_experts)
      if param == DOWN:
        by_layer.setdefault("down", []).append((a, b))
        continue
      cols, rank = {"gate": slice(0, f), "up": slice(f, 2 * f)}, a.shape[-1]
      if rank == r:  # one pair: A shared by the halves targeted, B zero on the others
        rows = {n: slice(0, r) for n in names}
        stray = [b[:, :, cols[n]] for n in cols if n not in names]
      elif rank == 2 * r and len(names) == 2:  # as `write` makes it: B block-diagonal
        rows = {"gate": slice(0, r), "up": slice(r, 2 * r)}
        stray = [b[:, :r, cols["up"]], b[:, r:, cols["gate"]]]
      else:
        rows, stray = {}, [np.ones(1)]
      if any(np.any(x != 0) for x in stray):
        raise ValueError(f"{at}lora_B.weight (rank {rank}) is no LoRA of rank {r} on "
                         f"{' and '.join(names)} alone: it cannot be read into this peft")
      for name in names:
        by_layer.setdefault(name, []).append((a[..., rows[name]], b[:, rows[name], cols[name]]))
  return {name: {"lora_a": np.stack([a for a, _ in pairs]),
                 "lora_b": np.stack([b for _, b in pairs])} for name, pairs in by_layer.items()}


def adapter_config(peft: Peft) -> dict:
  """PEFT's adapter_config.json. A PiSSA adapter is written as a plain LoRA of twice the rank
  (see `write`), with alpha raised to keep the same scale."""
  modules = sorted({hf_name(*t) for t in peft.targets if t[0] != "experts"})
  common = {"target_modules": modules or None, "base_model_name_or_path": None,
            "task_type": "CAUSAL_LM", "inference_mode": True, "fan_in_fan_out": False,
            "modules_to_save": ["mlp.gate"] if peft.train_router else None}
  if peft.method in ("lora", "dora"):
    pissa = peft.init_kind == "pissa"
    rank = 2 * peft.rank if pissa else peft.rank
    alpha = peft.alpha * ((2 ** 0.5 if peft.rslora else 2.0) if pissa else 1.0)
    config = {**common, "peft_type": "LORA", "r": rank, "lora_alpha": alpha,
              "lora_dropout": 0.0, "use_rslora": peft.rslora, "use_dora": peft.method == "dora",
              "bias": "none", "init_lora_weights": True}
    experts = _experts(peft)
    if experts:
      config["target_parameters"] = sorted(experts)
      fused = experts.get(GATE_UP, ())
      if len(fused) == 2:  # gate and up: one pair of rank 2r, the same scale
        config["rank_pattern"] = {GATE_UP: 2 * peft.rank}
        config["alpha_pattern"] = {GATE_UP: peft.alpha * (2 ** 0.5 if peft.rslora else 2.0)}
    return config
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
    ff = sorted({hf_name(*t) for t in peft.targets if _feedforward(*t)})
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
  for i in range(peft.mcfg.n_layers if peft.method == "lora" else 0):
    tensors += [(k, np.asarray(v, dtype)) for k, v in _expert_tensors(peft, adapters.get(
        "experts", {}), i)]
  if peft.train_router:  # trained whole: PEFT's modules_to_save copy of each router
    routers = np.asarray(params["layers"]["mlp"]["router"], np.float32)
    tensors += [(PREFIX.format(i=i) + "mlp.gate.weight", np.asarray(routers[i].T, dtype))
                for i in range(peft.mcfg.n_layers)]
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
  if peft.method == "lora" and _experts(peft):
    adapters["experts"] = _read_experts(peft, tensors)
  if peft.method == "vera":
    adapters["vera_shared"] = {"a": np.asarray(tensors.get("base_model.vera_A"), np.float32),
                               "b": np.asarray(tensors.get("base_model.vera_B"), np.float32)}
  return adapters
