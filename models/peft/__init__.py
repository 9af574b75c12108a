"""Parameter-efficient fine-tuning in weight space: adapters live beside the base weights in the
params tree (under "peft"), and are folded into the weights the model multiplies by.

    peft = Peft.from_config(run_config.peft, model_config)
    base, adapters = peft.init(base_params, key)          # PiSSA and QLoRA also rewrite the base
    layer = peft.fold_layer(layer_params, layer_adapters)  # per layer, inside the decoder's scan
    merged = peft.merge({**base, "peft": adapters})        # all layers at once (export)
    labels = peft.labels(params)                           # optax.multi_transform labels

Methods (per targeted linear map W, seen as (in, out) per layer):
  lora    W + s * A @ B, A (in, r), B (r, out); s = alpha / r, or alpha / sqrt(r) (rsLoRA).
          init: A uniform(+-1/sqrt(in)) and B = 0 (default), A normal(1/r) (gaussian), or PiSSA
          (A, B from the top-r singular triplets of W, W replaced by the residual; the initial
          A, B stay beside them, frozen, so that an export can express the change against the
          original W). `pissa_niter` > 0: a randomized SVD with that many subspace iterations
          instead of the exact one (seconds instead of minutes on 8B-sized matrices).
  adalora W + s * (P * lambda) @ Q (models/peft/adalora.py), s = alpha / r; a rank allocator
          zeroes the lambda of the least important triplets down to a budget during training.
  dora    m * V / ||V||, V = W + s * A @ B, the norm per output column (not differentiated, as
          in the DoRA paper and PEFT), m initialised to ||W||.
  vera    W + (A^T diag(d)) @ (B^T diag(b)), with A = A_s[:, :in] and B = B_s[:out]: A_s (r, max_in)
          and B_s (max_out, r) random, frozen, shared by every layer and module; d (r) and
          b (out) train per layer.
  ia3     W * l: l scales the output features of k and v, the input features of down (PEFT's
          "feedforward" modules), starting at 1.
  bitfit  the base model's biases train, nothing else (models with biases: Qwen2).
  adapter Houlsby bottleneck adapters: h + up(gelu(down(h))) on the attention and on the MLP
          output of every block, before the residual sum; up starts at 0 (identity). These act on
          activations: the decoder applies them (models/decoder.py Block), nothing is folded.
          `adapter_drop` n (AdapterDrop, Rueckle et al. 2021): none in the lowest n layers,
          which then run apart, without a backward pass (models/decoder.py LayerSource).
  fusion  AdapterFusion's second stage (models/peft/unified.py): the Houlsby adapters of
          several runs (`fusion_sources`, folders trainer.export --format=adapters wrote)
          frozen, and per layer and sublayer an attention over their outputs that trains.
          `adapter_drop` as for adapter.
  mam     MAM adapter: prefix tuning plus a parallel FFN adapter scaled by `mam_scale`.
  unipelt UniPELT: LoRA on the targets, prefix tuning and a Houlsby adapter on the FFN output,
          each behind a learned gate (per token). Gated LoRA acts on activations too.
  prompt, ptuning, prefix: virtual tokens before the sequence, as input embeddings or as every
          layer's keys and values (models/peft/prompt.py); the decoder places them.
  QLoRA   (`base_quant="nf4"`, with lora or dora): the targeted base weights are stored as NF4
          (models/quant/nf4.py) and dequantized layer by layer before the fold.
LISA trains whole layers and lives in trainer/lisa.py. Folding in weight space is exact for all
of the above and costs one (in x r) @ (r x out) per targeted matrix and step; evaluation,
generation and export fold. Training steps of lora and adalora keep the low-rank path apart
(`split_layer`), which spares the backward pass the full-size weight gradients: with LoRA
dropout (`dropout` > 0) on activations, x W + s * dropout(x) A B; without, one matmul with the
folded weight whose backward pass takes A's and B's gradients directly
(models/layers.py `low_rank_dense`).

Targets are matched on module names: ours ("attn.q", "mlp.down") or Hugging Face's ("q_proj",
"down_proj"), by a regular expression (full match), or "all-linear".

Mixture-of-experts models (every layer MoE: a model that mixes dense and MoE layers takes no
adapters) have no dense MLP ("mlp.*"); their targets are, besides attention:
  experts.gate, experts.up, experts.down  the routed experts, one LoRA per expert: A (E, in, r),
          B (E, r, out) per layer, folded per expert before the dispatch (models/moe.py). Hugging
          Face's names are the parameters of transformers 5's fused experts, which PEFT targets
          with `target_parameters`: "experts.gate_up_proj" (or "gate_up_proj") selects gate and
          up, "experts.down_proj" down. A bare "down_proj" keeps PEFT's `target_modules`
          meaning: linear modules, i.e. the shared expert's.
  shared.gate, shared.up, shared.down  the shared expert (Qwen2-MoE's "shared_expert.gate_proj",
          or "gate_proj" ...), an ordinary gated MLP: every method works on it.
"all-linear" takes all of these (PEFT's "all-linear" leaves out the experts, which are no
nn.Linear there). Only lora (rsLoRA, LoRA+, gaussian init) and QLoRA (the expert weights stored
as NF4 per expert) reach the routed experts, as in PEFT, whose expert LoRA has no DoRA and no
dropout; PiSSA, DoRA, AdaLoRA, VeRA, IA3 and dropout there are refused naming the key. The
routers (d, E) are frozen by default: fine-tuning adapts what the experts compute, not which
ones a token reaches, so the load balance the base model learned stays (and no router loss is
needed). `train_router` (the run config's `peft.train_router`, read when present) trains them
whole beside the adapters, a small matrix per layer; the PEFT export then saves them as
`modules_to_save` (models/peft/hf_format.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.layers import LowRank
from models.peft import adalora
from models.peft import prompt as prompt_lib
from models.peft import saved
from models.quant import nf4

METHODS = ("none", "lora", "relora", "dora", "adalora", "vera", "ia3", "bitfit", "adapter",
           "fusion", "mam", "unipelt", *prompt_lib.METHODS, "lisa")  # lisa: trainer/lisa.py
# the methods whose adapters act on activations (nothing folds into weights) besides the
# virtual-token ones, each with bottleneck adapters of `adapter_dim`; those AdapterDrop applies to
ACTIVATION_METHODS = ("adapter", "fusion", "mam", "unipelt")
DROP_METHODS = ("adapter", "fusion")
INITS = ("default", "gaussian", "pissa")

# (module, weight): (Hugging Face module name, number of input dims in our layout)
LINEAR = {("attn", "q"): ("q_proj", 1), ("attn", "k"): ("k_proj", 1), ("attn", "v"): ("v_proj", 1),
          ("attn", "o"): ("o_proj", 2), ("mlp", "gate"): ("gate_proj", 1),
          ("mlp", "up"): ("up_proj", 1), ("mlp", "down"): ("down_proj", 1)}
# Mixtures of experts: the routed experts' weights, (E, in, out) per layer, and the shared
# expert's. (module, weight): (Hugging Face names; the first is the parameter's, or module's)
EXPERTS = {("experts", "gate"): ("experts.gate_up_proj", "gate_up_proj"),
           ("experts", "up"): ("experts.gate_up_proj", "gate_up_proj"),
           ("experts", "down"): ("experts.down_proj",)}
SHARED = {("shared", "gate"): ("shared_expert.gate_proj", "gate_proj"),
          ("shared", "up"): ("shared_expert.up_proj", "up_proj"),
          ("shared", "down"): ("shared_expert.down_proj", "down_proj")}
# where a target module's weights sit in a layer's parameters (and its deltas in Block's)
PATHS = {"attn": ("attn",), "mlp": ("mlp",), "experts": ("mlp",), "shared": ("mlp", "shared")}
IA3_FEEDFORWARD = ("down_proj",)
TRAINABLE, FROZEN, LORA_B = "trainable", "frozen", "lora_b"


def _dims(mcfg: ModelConfig, module: str, name: str) -> tuple[int, int]:
  """(in, out) of a targeted weight, flattened as the adapter sees it (per expert)."""
  d, h, kv, hd = mcfg.d_model, mcfg.n_heads, mcfg.n_kv_heads, mcfg.head_dim
  f = {"experts": mcfg.expert_d_ff, "shared": mcfg.shared_expert_d_ff}.get(module, mcfg.d_ff)
  return {"q": (d, h * hd), "k": (d, kv * hd), "v": (d, kv * hd), "o": (h * hd, d),
          "gate": (d, f), "up": (d, f), "down": (f, d)}[name]


def _lead(mcfg: ModelConfig, module: str) -> tuple[int, ...]:
  """The axes a targeted weight has per layer before (in, out): the routed experts'."""
  return (mcfg.n_experts,) if module == "experts" else ()


def linear(mcfg: ModelConfig | None) -> dict[tuple[str, str], tuple[str, ...]]:
  """The targets this model has: (module, weight) -> Hugging Face names. None: a dense model."""
  dense = {k: (hf,) for k, (hf, _) in LINEAR.items()
           if mcfg is None or mcfg.mlp_gated or k != ("mlp", "gate")}
  if mcfg is None or not mcfg.n_experts:
    return dense
  out = {k: v for k, v in dense.items() if k[0] == "attn"}
  out.update(EXPERTS)
  if mcfg.shared_expert_d_ff:
    out.update(SHARED)
  return out


def hf_name(module: str, name: str) -> str:
  """The Hugging Face module (or, for the routed experts, parameter) name of a target."""
  return {**EXPERTS, **SHARED}.get((module, name), (None,))[0] or LINEAR[(module, name)][0]


def _feedforward(module: str, name: str) -> bool:
  """IA3: whether the target scales its inputs (PEFT's feedforward modules) or its outputs."""
  return hf_name(module, name).rsplit(".", 1)[-1] in IA3_FEEDFORWARD


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _replace(tree: dict, path, value) -> dict:
  """A copy of `tree` with tree[path] = value, the dicts on the way copied, nothing else."""
  if not path:
    return value
  return {**tree, path[0]: _replace(tree.get(path[0], {}), path[1:], value)}


def _with_method(pc, method: str):
  """The peft config section with another method (ReLoRA runs as LoRA)."""
  pc = pc.copy_and_resolve_references()
  pc.method = method
  return pc


@dataclasses.dataclass(frozen=True)
class Peft:
  method: str
  targets: tuple[tuple[str, str], ...]  # (module, weight) pairs, e.g. ("attn", "q")
  mcfg: ModelConfig
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  init_kind: str = "default"
  vera_rank: int = 256
  vera_d_initial: float = 0.1
  lora_plus_scale: float = 1.0
  base_quant: str = "none"  # "nf4": targeted base weights stored as NF4 (QLoRA)
  adapter_dim: int = 16  # Houlsby adapters' bottleneck
  pissa_niter: int = 0  # PiSSA: 0 exact SVD, > 0 randomized SVD with this many power iterations
  dropout: float = 0.0  # LoRA dropout on the low-rank path's inputs (training only)
  allocator: adalora.Allocator | None = None  # AdaLoRA's rank allocator
  orth_weight: float = 0.0  # AdaLoRA's orthogonality penalty weight
  prompt: prompt_lib.Prompt | None = None  # virtual-token methods
  train_router: bool = False  # mixtures of experts: the routers train beside the adapters
  # ReLoRA (method "relora", run as "lora"): every `restart_every` steps the adapters merge into
  # the base and start again (trainer/relora.py); 0: never
  restart_every: int = 0
  adapter_drop: int = 0  # adapter, fusion: the lowest layers without adapters (AdapterDrop)
  fusion_sources: tuple[str, ...] = ()  # fusion: the adapter folders fused (stage 1's runs)
  mam_scale: float = 4.0  # mam: the parallel adapter's scale s

  @classmethod
  def from_config(cls, pc, mcfg: ModelConfig, total_steps: int = 0) -> "Peft | None":
    """From the run config's `peft` section; None for method "none". `total_steps`
    (train.steps) sets AdaLoRA's budget schedule; 0 leaves it unchecked (no training)."""
    if pc.method == "none":
      return None
    if pc.method not in METHODS:
      raise ValueError(f"peft.method={pc.method!r} is not one of {', '.join(METHODS)}")
    if pc.method == "lisa":  # full-parameter training of a few layers: no adapters
      if not 0 < pc.lisa_activated_layers <= mcfg.n_layers:
        raise ValueError(f"peft.lisa_activated_layers={pc.lisa_activated_layers} must be in "
                         f"1..{mcfg.n_layers} (model.n_layers)")
      if pc.lisa_step_interval < 1:
        raise ValueError(f"peft.lisa_step_interval={pc.lisa_step_interval} must be positive")
      return None
    restart_every = 0
    if pc.method == "relora":  # LoRA whose adapters merge into the base every K steps
      if pc.relora_every < 1:
        raise ValueError(f"peft.relora_every={pc.relora_every} must be positive (steps between "
                         "merges)")
      if not 0.0 <= pc.relora_prune < 1.0:
        raise ValueError(f"peft.relora_prune={pc.relora_prune} must be in [0, 1)")
      if pc.relora_warmup < 0 or pc.relora_warmup >= pc.relora_every:
        raise ValueError(f"peft.relora_warmup={pc.relora_warmup} must be in [0, "
                         f"peft.relora_every={pc.relora_every})")
      if pc.base_quant != "none" or pc.init == "pissa" or pc.dropout:
        raise ValueError("peft.method=relora merges into float base weights from the default "
                         "init: not with base_quant, init=pissa or dropout")
      restart_every = int(pc.relora_every)
      pc = _with_method(pc, "lora")
    if pc.init not in INITS:
      raise ValueError(f"peft.init={pc.init!r} is not one of {', '.join(INITS)}")
    if pc.init == "pissa" and pc.method != "lora":
      raise ValueError(f"peft.init=pissa is for method lora, not {pc.method}")
    if pc.pissa_niter < 0:
      raise ValueError(f"peft.pissa_niter={pc.pissa_niter} must be 0 (exact SVD) or positive")
    if pc.base_quant not in ("none", "nf4"):
      raise ValueError(f"peft.base_quant={pc.base_quant!r} is not one of none, nf4")
    if pc.base_quant == "nf4" and (pc.method not in ("lora", "dora") or pc.init == "pissa"):
      raise ValueError("peft.base_quant=nf4 (QLoRA) goes with method lora or dora, not PiSSA")
    if pc.method in ("lora", "dora", "adalora") and pc.rank < 1:
      raise ValueError(f"peft.rank={pc.rank} must be positive")
    if not 0.0 <= pc.dropout < 1.0:
      raise ValueError(f"peft.dropout={pc.dropout} must be in [0, 1)")
    if pc.dropout and pc.method not in ("lora", "adalora"):
      raise ValueError(f"peft.dropout is implemented for methods lora and adalora, not "
                       f"{pc.method}")
    allocator = None
    if pc.method == "adalora":
      allocator = adalora.Allocator(pc.rank, pc.adalora_target_rank, total_steps,
                                    pc.adalora_tinit, pc.adalora_tfinal, pc.adalora_delta_t,
                                    pc.adalora_beta1, pc.adalora_beta2)
      if total_steps:
        allocator.check()
      if pc.init != "default":
        raise ValueError(f"peft.init={pc.init} is for lora; adalora starts as PEFT does")
    activations_only = pc.method in ("adapter", "fusion", "mam", *prompt_lib.METHODS)
    if len(set(mcfg.layer_kinds())) > 1:  # the decoder takes one layer source for one stack
      raise ValueError(f"peft.method={pc.method} needs every layer of one kind: model.moe_every="
                       f"{mcfg.moe_every} and model.moe_first_dense={mcfg.moe_first_dense} mix "
                       "dense and MoE layers")
    targets_key = "peft.targets" if pc.method != "ia3" else "peft.ia3_targets"
    spec = pc.targets if pc.method != "ia3" else pc.ia3_targets
    targets = () if activations_only else select_targets(spec, mcfg)
    _check_experts(pc, targets_key, spec, targets)
    prompt = None
    if pc.method in (*prompt_lib.METHODS, "mam", "unipelt"):  # MAM, UniPELT: prefix tuning
      kind = pc.method if pc.method in prompt_lib.METHODS else "prefix"
      prompt = prompt_lib.Prompt(kind, mcfg, pc.num_virtual_tokens, pc.ptuning_encoder,
                                 pc.encoder_hidden, pc.prefix_projection, pc.prompt_init)
      prompt.check()
    if pc.method in ACTIVATION_METHODS and pc.adapter_dim < 1:
      raise ValueError(f"peft.adapter_dim={pc.adapter_dim} must be positive")
    adapter_drop, sources = _check_unified(pc, mcfg)
    if not targets and pc.method not in ("bitfit", "adapter", "fusion", "mam",
                                         *prompt_lib.METHODS):
      raise ValueError(f"{targets_key}={spec!r} matches no linear module; names: "
                       + ", ".join(f"{m}.{n} ({' or '.join(hf)})"
                                   for (m, n), hf in linear(mcfg).items()))
    if pc.method == "bitfit" and not mcfg.qkv_bias:
      raise ValueError("peft.method=bitfit trains biases, and this model has none")
    peft = cls(pc.method, targets, mcfg, pc.rank, pc.alpha, pc.rslora, pc.init, pc.vera_rank,
               pc.vera_d_initial, pc.lora_plus_scale, pc.base_quant, pc.adapter_dim,
               pc.pissa_niter, pc.dropout, allocator,
               pc.adalora_orth_weight if pc.method == "adalora" else 0.0, prompt,
               bool(pc.train_router), restart_every, adapter_drop, sources,
               float(pc.get("mam_scale", 4.0)))
    if peft.train_router and not mcfg.n_experts:
      raise ValueError("peft.train_router=True needs a mixture of experts (model.n_experts)")
    if peft.train_router and prompt is not None:
      raise ValueError(f"peft.train_router=True goes with weight adapters, not {pc.method}")
    if peft.base_quant == "nf4":
      for module, name in targets:
        nf4.check(_dims(mcfg, module, name)[0], f"{module}.{name}")
    return peft

  def check_run(self, run) -> None:
    """ValueError naming the key when the model's Execution cannot run these adapters."""
    if self.prompt is not None:
      self.prompt.check_impl(run.attention_impl)
    if self.method == "unipelt" and run.attention_impl != "xla":
      raise ValueError("peft.method=unipelt gates its prefix per query, which runs with "
                       f"model.attention_impl=xla, not {run.attention_impl}")

  @property
  def adapted_layers(self) -> int:
    """The layers that hold adapters: all, or with AdapterDrop the top ones."""
    return self.mcfg.n_layers - self.adapter_drop

  @property
  def scale(self) -> float:
    if self.method == "adalora":  # PEFT: alpha / (ranknum + 1e-5), ranknum = the initial r
      return self.alpha / (self.rank + 1e-5)
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  @property
  def splits_in_training(self) -> bool:
    """Whether training steps keep the low-rank path apart (`split_layer`) instead of folding it
    into the weights under autodiff: lora and adalora. Folded, the backward pass computes the
    full (in x out) gradient of every targeted weight only to project it onto A and B; kept
    apart it computes x^T (dy B^T) and (x A)^T dy, rank-r products, and the frozen weights get
    no gradient at all (configs/medium.py, LoRA r=16 on every linear layer: BENCHMARKS.md)."""
    return self.method in ("lora", "adalora")

  # --- parameters --------------------------------------------------------------------------

  def _shapes(self) -> dict[str, Any]:
    """name -> (shape, logical axes) of every adapter array (tree as stored under "peft")."""
    L, r, out = self.mcfg.n_layers, self.rank, {}
    d, m = self.mcfg.d_model, self.adapter_dim
    bottleneck = {"down": ((L, d, m), ("layers", "embed", None)),
                  "down_bias": ((L, m), ("layers", None)),
                  "up": ((L, m, d), ("layers", None, "embed")),
                  "up_bias": ((L, d), ("layers", "embed"))}
    for module, name in self.targets:
      n_in, n_out = _dims(self.mcfg, module, name)
      if module == "experts":  # lora only (from_config): one pair per expert
        lead = _lead(self.mcfg, module)
        out.setdefault(module, {})[name] = {
            "lora_a": ((L, *lead, n_in, r), ("layers", "expert", None, None)),
            "lora_b": ((L, *lead, r, n_out), ("layers", "expert", None, None))}
        continue
      if self.method in ("lora", "dora", "unipelt"):
        entry = {"lora_a": ((L, n_in, r), ("layers", None, None)),
                 "lora_b": ((L, r, n_out), ("layers", None, None))}
        if self.method == "unipelt":  # the gate sigma(x w + b) from the matrix's input
          entry.update(gate=((L, n_in), ("layers", None)), gate_bias=((L,), ("layers",)))
        if self.method == "dora":
          entry["magnitude"] = ((L, n_out), ("layers", None))
        if self.init_kind == "pissa":  # kept frozen: exporting to PEFT needs the start point
          entry["lora_a_init"], entry["lora_b_init"] = entry["lora_a"], entry["lora_b"]
      elif self.method == "adalora":
        entry = {"lora_a": ((L, n_in, r), ("layers", None, None)),
                 "lora_e": ((L, r), ("layers", None)),
                 "lora_b": ((L, r, n_out), ("layers", None, None))}
      elif self.method == "vera":
        entry = {"lambda_d": ((L, self.vera_rank), ("layers", None)),
                 "lambda_b": ((L, n_out), ("layers", None))}
      else:  # ia3
        size = n_in if _feedforward(module, name) else n_out
        entry = {"ia3": ((L, size), ("layers", None))}
      out.setdefault(module, {})[name] = entry
    top = self.adapted_layers  # AdapterDrop: only the top layers hold adapters
    at_top = lambda spec: ((top, *spec[0][1:]), spec[1])
    if self.method == "adapter":
      out["adapter"] = {where: {k: at_top(v) for k, v in bottleneck.items()}
                        for where in ("attn", "mlp")}
    if self.method == "fusion":  # N frozen adapters per layer, then the fusion attention
      n = len(self.fusion_sources)
      stacked = {k: ((top, n, *shape[1:]), (names[0], None, *names[1:]))
                 for k, (shape, names) in bottleneck.items()}
      square = ((top, d, d), ("layers", "embed", None))
      out["adapter"] = {where: dict(stacked) for where in ("attn", "mlp")}
      out["fusion"] = {where: {"query": square, "key": square, "value": square}
                       for where in ("attn", "mlp")}
    if self.method == "mam":
      out["parallel"] = dict(bottleneck)
    if self.method == "unipelt":
      gate = {"gate": ((L, d), ("layers", "embed")), "gate_bias": ((L,), ("layers",))}
      out["adapter"] = {"mlp": {**bottleneck, **gate}}
      out["prefix_gate"] = {"w": ((L, d), ("layers", "embed")), "b": ((L,), ("layers",))}
    if self.prompt is not None:
      out["prompt"] = self.prompt.shapes()
    if self.method == "vera":
      dims = [_dims(self.mcfg, m, n) for m, n in self.targets]
      out["vera_shared"] = {"a": ((self.vera_rank, max(i for i, _ in dims)), (None, None)),
                            "b": ((max(o for _, o in dims), self.vera_rank), (None, None))}
    return out

  def axes(self) -> dict[str, Any]:
    return jax.tree.map(lambda x: x[1], self._shapes(), is_leaf=_is_spec)

  def base_abstract(self, abstract: dict, axes: dict | None) -> tuple[dict, dict | None]:
    """The model's abstract params and (when given) axes with NF4-stored targets in place of the
    weights. The codes keep the weight's first input and first output axis names (flattened)."""
    if self.base_quant != "nf4":
      return abstract, axes
    abstract = _copy(abstract)
    axes = None if axes is None else _copy(axes)
    for module, name in self.targets:
      n_in, n_out = _dims(self.mcfg, module, name)
      path = ("layers", *PATHS[module], name)
      w, lead = _get(abstract, path), _lead(self.mcfg, module)
      _get(abstract, path[:-1])[name] = nf4.abstract((w.shape[0], *lead, n_in, n_out))
      if axes is None:
        continue
      names = _get(axes, path)
      k = 1 + len(lead)  # the layer axis, then the experts'
      in_axis, out_axis = names[k], names[k + LINEAR.get((module, name), (None, 1))[1]]
      _get(axes, path[:-1])[name] = {"nf4_codes": (*names[:k], in_axis, out_axis),
                                     "nf4_absmax": (*names[:k], None, out_axis),
                                     "nf4_scale": (*names[:k], None, out_axis)}
    return abstract, axes

  def abstract(self, dtype=jnp.float32) -> dict[str, Any]:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x[0], dtype), self._shapes(),
                        is_leaf=_is_spec)

  def load_fixed(self) -> dict | None:
    """What `init` takes from files, read on the host: AdapterFusion's stage-1 adapters, the
    folders' Houlsby adapters stacked per leaf along a second axis (layers, N, ...), the top
    `adapted_layers` layers of each. None for the other methods. ValueError naming the key."""
    if self.method != "fusion":
      return None
    trees = []
    for folder in self.fusion_sources:
      trees.append(fusion_source(folder, self.mcfg, self.adapter_dim, self.adapted_layers))
    return jax.tree.map(lambda *xs: np.stack(xs, axis=1), *trees)

  def init(self, base: dict, key: jax.Array, fixed: dict | None = None) -> tuple[dict, dict]:
    """(base, adapters): adapters as PEFT initialises them; PiSSA also returns the residual
    base; `fixed`, what `load_fixed` read (AdapterFusion's adapters). Runs under jit (shapes
    are static)."""
    adapters: dict[str, Any] = {}
    if self.method == "bitfit":
      return base, adapters
    base = jax.tree.map(lambda x: x, base)  # shallow copies we may rewrite
    keys = iter(jax.random.split(key, 2 * len(self.targets) + 4))
    for module, name in self.targets:
      n_in, n_out = _dims(self.mcfg, module, name)
      path = (*PATHS[module], name)
      w = _get(base["layers"], path)
      L, lead = w.shape[0], _lead(self.mcfg, module)  # lead: the experts' axis, if any
      entry: dict[str, jax.Array] = {}
      if self.method in ("lora", "dora", "unipelt"):
        if self.init_kind == "pissa":
          a, b, residual = _pissa(w.reshape(L, n_in, n_out).astype(jnp.float32), self.rank,
                                  self.scale, self.pissa_niter, next(keys))
          base["layers"] = _replace(base["layers"], path,
                                    residual.reshape(w.shape).astype(w.dtype))
        else:  # per expert as PEFT's ParamWrapper: A over each expert's inputs, B = 0
          ka = next(keys)
          if self.init_kind == "gaussian":
            a = jax.random.normal(ka, (L, *lead, n_in, self.rank)) / self.rank
          else:  # kaiming-uniform with a = sqrt(5), PEFT's default: bound 1 / sqrt(in)
            bound = 1.0 / math.sqrt(n_in)
            a = jax.random.uniform(ka, (L, *lead, n_in, self.rank), minval=-bound,
                                   maxval=bound)
          b = jnp.zeros((L, *lead, self.rank, n_out))
        entry = {"lora_a": a, "lora_b": b}
        if self.method == "unipelt":  # gates at 0.5
          entry.update(gate=jnp.zeros((L, n_in)), gate_bias=jnp.zeros((L,)))
        if self.init_kind == "pissa":
          entry.update(lora_a_init=a, lora_b_init=b)
        if self.method == "dora":
          w2 = _get(base["layers"], path).reshape(L, n_in, n_out).astype(jnp.float32)
          entry["magnitude"] = jnp.linalg.norm(w2 + self.scale * a @ b, axis=1)
      elif self.method == "adalora":  # PEFT: P, Q normal(0, 0.02), lambda 0
        ka, kb = jax.random.split(next(keys))
        entry = {"lora_a": 0.02 * jax.random.normal(ka, (L, n_in, self.rank)),
                 "lora_e": jnp.zeros((L, self.rank)),
                 "lora_b": 0.02 * jax.random.normal(kb, (L, self.rank, n_out))}
      elif self.method == "vera":
        entry = {"lambda_d": jnp.full((L, self.vera_rank), self.vera_d_initial),
                 "lambda_b": jnp.zeros((L, n_out))}
      else:  # ia3
        (shape, _), = self._shapes()[module][name].values()
        entry = {"ia3": jnp.ones(shape)}
      adapters.setdefault(module, {})[name] = entry
    shapes = self._shapes()
    if self.method in ("adapter", "unipelt"):  # down small and random, up zero: the identity
      adapters["adapter"] = {
          where: {"down": 1e-3 * jax.random.normal(next(keys), spec["down"][0]),
                  **{k: jnp.zeros(v[0]) for k, v in spec.items() if k != "down"}}
          for where, spec in shapes["adapter"].items()}
    if self.method == "fusion":  # Q, K normal(0, 0.02), V the identity (Pfeiffer et al.)
      top, d = self.adapted_layers, self.mcfg.d_model
      eye = jnp.broadcast_to(jnp.eye(d), (top, d, d))
      adapters["adapter"] = jax.tree.map(jnp.asarray, fixed)
      adapters["fusion"] = {
          where: {"query": 0.02 * jax.random.normal(next(keys), (top, d, d)),
                  "key": 0.02 * jax.random.normal(next(keys), (top, d, d)), "value": eye}
          for where in ("attn", "mlp")}
    if self.method == "mam":  # He et al.: LoRA's init, down kaiming-uniform and up zero
      spec = shapes["parallel"]
      bound = 1.0 / math.sqrt(self.mcfg.d_model)
      adapters["parallel"] = {
          "down": jax.random.uniform(next(keys), spec["down"][0], minval=-bound, maxval=bound),
          **{k: jnp.zeros(v[0]) for k, v in spec.items() if k != "down"}}
    if self.method == "unipelt":
      adapters["prefix_gate"] = {k: jnp.zeros(v[0]) for k, v in shapes["prefix_gate"].items()}
    if self.prompt is not None:
      adapters["prompt"] = self.prompt.init(base["embed"], next(keys))
    if self.method == "vera":
      (a_shape, _), (b_shape, _) = self._shapes()["vera_shared"].values()
      adapters["vera_shared"] = {"a": _kaiming(next(keys), a_shape),
                                 "b": _kaiming(next(keys), b_shape)}
    if self.base_quant == "nf4":
      for module, name in self.targets:  # the experts' per expert: (L, E, in, out)
        n_in, n_out = _dims(self.mcfg, module, name)
        path = (*PATHS[module], name)
        w = _get(base["layers"], path)
        q = nf4.quantize(w.reshape(w.shape[0], *_lead(self.mcfg, module), n_in, n_out))
        base["layers"] = _replace(base["layers"], path, q)
        if self.method == "dora":  # the magnitude of what the forward pass will see
          entry = adapters[module][name]
          w2 = nf4.dequantize(q) + self.scale * entry["lora_a"] @ entry["lora_b"]
          entry["magnitude"] = jnp.linalg.norm(w2, axis=1)
    return base, adapters

  # --- the forward weights -----------------------------------------------------------------

  def merge(self, params: dict) -> dict:
    """Model parameters with the adapters folded in for good, every layer at once (export).
    The trainer folds layer by layer inside the decoder's scan instead (`fold_layer`)."""
    base = {k: v for k, v in params.items() if k != "peft"}
    if self.method in ACTIVATION_METHODS or self.prompt is not None:
      raise ValueError(f"peft.method={self.method} acts on activations (bottleneck adapters, "
                       "gates, virtual tokens): it cannot be merged into weights")
    if self.method == "bitfit" or ("peft" not in params and self.base_quant == "none"):
      return base
    adapters = params.get("peft", {})
    layer_adapters = {m: v for m, v in adapters.items() if m != "vera_shared"}
    shared = adapters.get("vera_shared")
    fold = lambda layer, a: self.fold_layer(layer, a, shared)
    return {**base, "layers": jax.vmap(fold)(base["layers"], layer_adapters)}

  def fold_layer(self, layer: dict, adapters: dict, shared: dict | None = None) -> dict:
    """One layer's parameters (no layer axis) with its adapters folded into the targeted weights
    and NF4-stored weights dequantized."""
    if self.method in ("bitfit", *ACTIVATION_METHODS):  # unipelt: its LoRA is gated
      return layer
    for module, name in self.targets:
      path = (*PATHS[module], name)
      entry = adapters.get(module, {}).get(name) if adapters else None
      layer = _replace(layer, path, self._fold(module, name, _get(layer, path), entry, shared))
    return layer

  def split_layer(self, layer: dict, adapters: dict, key: jax.Array) -> tuple[dict, dict]:
    """Training steps of lora and adalora: (one layer's parameters with only NF4 weights
    dequantized, {module: {weight: fn}}) where fn(x) = s * dropout(x) @ A @ B, x (tokens, in),
    a fresh dropout mask per targeted weight; without dropout a `LowRank` (a, b, s) instead,
    which `project` applies as one matmul with the folded weight whose backward pass still
    skips the weight's own gradient (models/layers.py `low_rank_dense`). The routed experts'
    deltas are `LowRank`s with a leading expert axis, which the MoE block folds per expert
    (models/moe.py; from_config refuses dropout there). The deltas' tree follows the layer's:
    {"attn": ..., "mlp": {"gate": experts' delta, ..., "shared": {...}}}."""
    deltas: dict = {}
    for i, (module, name) in enumerate(self.targets):
      path = (*PATHS[module], name)
      layer = _replace(layer, path, self._fold(module, name, _get(layer, path), None, None))
      a, b = self._low_rank(adapters[module][name])
      delta = (_dropout_delta(a, b, self.scale, self.dropout, jax.random.fold_in(key, i))
               if self.dropout else LowRank(a, b, self.scale))
      deltas = _replace(deltas, path, delta)
    return layer, deltas

  def _low_rank(self, entry):
    """(A, B) of a LoRA-type entry: s * A @ B is its change to W."""
    if self.method == "adalora":
      return entry["lora_a"] * entry["lora_e"][None, :], entry["lora_b"]
    return entry["lora_a"], entry["lora_b"]

  def _fold(self, module, name, w, entry, shared):
    n_in, n_out = _dims(self.mcfg, module, name)
    if nf4.is_quantized(w):
      dtype = entry["lora_a"].dtype if entry is not None and "lora_a" in entry else jnp.float32
      w2 = nf4.dequantize(w, dtype)
      shape = self._weight_shape(module, name)
    else:
      dtype, shape = w.dtype, w.shape
      w2 = w.reshape(*_lead(self.mcfg, module), n_in, n_out)
    if entry is None:
      return w2.reshape(shape)
    if self.method in ("lora", "dora", "adalora"):
      a, b = (x.astype(dtype) for x in self._low_rank(entry))
      w2 = w2 + jnp.asarray(self.scale, dtype) * (a @ b)
      if self.method == "dora":
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w2.astype(jnp.float32), axis=0))
        w2 = w2 * (entry["magnitude"] / norm).astype(dtype)[None, :]
    elif self.method == "vera":
      a = shared["a"][:, :n_in].T.astype(dtype)  # (in, r)
      b = shared["b"][:n_out].T.astype(dtype)  # (r, out)
      d, bb = entry["lambda_d"].astype(dtype), entry["lambda_b"].astype(dtype)
      w2 = w2 + (a * d[None, :]) @ (b * bb[None, :])
    else:  # ia3
      scale = entry["ia3"].astype(dtype)
      feedforward = _feedforward(module, name)
      w2 = w2 * (scale[:, None] if feedforward else scale[None, :])
    return w2.reshape(shape)

  def _weight_shape(self, module, name) -> tuple[int, ...]:
    """The per-layer shape of a targeted weight in the model (without the layer axis)."""
    c = self.mcfg
    d, h, kv, hd = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    if module in ("mlp", "experts", "shared"):
      return (*_lead(c, module), *_dims(c, module, name))
    return {"q": (d, h, hd), "k": (d, kv, hd), "v": (d, kv, hd), "o": (h, hd, d)}[name]

  def reference_params(self, params: dict) -> dict:
    """The model before fine-tuning (DPO's reference) from the same parameters, without a second
    copy of the weights: the adapters switched off; for PiSSA, whose base is a residual, the
    initial A and B folded back in."""
    base = {k: v for k, v in params.items() if k != "peft"}
    if self.init_kind != "pissa":
      return base
    initial = {m: {n: {"lora_a": e["lora_a_init"], "lora_b": e["lora_b_init"]}
                   for n, e in entries.items()} for m, entries in params["peft"].items()}
    return {**base, "peft": initial}

  # --- what trains ---------------------------------------------------------------------------

  def labels(self, params: dict) -> dict:
    """TRAINABLE / LORA_B (LoRA+: a larger learning rate) / FROZEN for every leaf."""
    def label(path, _):
      keys = [str(getattr(p, "key", p)) for p in path]
      if self.method == "bitfit":
        return TRAINABLE if keys[-1].endswith("_bias") else FROZEN
      if self.train_router and keys[:3] == ["layers", "mlp", "router"]:
        return TRAINABLE
      if keys[0] != "peft" or keys[1] == "vera_shared" or keys[-1].endswith("_init"):
        return FROZEN
      if self.method == "fusion" and keys[1] == "adapter":  # stage 1's adapters
        return FROZEN
      return LORA_B if keys[-1] == "lora_b" and self.lora_plus_scale != 1.0 else TRAINABLE
    return jax.tree_util.tree_map_with_path(label, params)


def _check_experts(pc, key: str, spec: str, targets) -> None:
  """ValueError naming the key when routed-expert targets meet what only lora can do there."""
  experts = [f"{m}.{n}" for m, n in targets if m == "experts"]
  if not experts:
    return
  picked = f"{key}={spec!r} selects {', '.join(experts)}"
  if pc.method != "lora":
    raise ValueError(f"peft.method={pc.method} cannot adapt the routed experts ({picked}); "
                     "lora and QLoRA can, or leave experts.* out of the targets")
  if pc.init == "pissa":
    raise ValueError(f"peft.init=pissa is not implemented for the routed experts ({picked})")
  if pc.dropout:
    raise ValueError(f"peft.dropout={pc.dropout}: LoRA on the routed experts has no dropout, "
                     f"as in PEFT ({picked}); set it to 0 or leave experts.* out")


def _check_unified(pc, mcfg: ModelConfig) -> tuple[int, tuple[str, ...]]:
  """(adapter_drop, AdapterFusion's folders) of the peft section, checked."""
  drop = int(pc.get("adapter_drop", 0))
  if drop and pc.method not in DROP_METHODS:
    raise ValueError(f"peft.adapter_drop={drop} applies to methods {', '.join(DROP_METHODS)}, "
                     f"not {pc.method}")
  if not 0 <= drop < mcfg.n_layers:
    raise ValueError(f"peft.adapter_drop={drop} must be in 0..{mcfg.n_layers - 1} "
                     "(model.n_layers - 1)")
  listed = str(pc.get("fusion_adapters", ""))
  sources = tuple(s.strip() for s in listed.split(",") if s.strip())
  if pc.method == "fusion" and len(sources) < 2:
    raise ValueError(f"peft.fusion_adapters={listed!r}: AdapterFusion fuses two or "
                     "more adapter folders (comma-separated; trainer.export --format=adapters "
                     "of peft.method=adapter runs)")
  if sources and pc.method != "fusion":
    raise ValueError(f"peft.fusion_adapters is for method fusion, not {pc.method}")
  if pc.method == "mam" and pc.get("mam_scale", 4.0) <= 0:
    raise ValueError(f"peft.mam_scale={pc.mam_scale} must be positive")
  if pc.method == "unipelt" and pc.dropout:
    raise ValueError("peft.method=unipelt has no LoRA dropout: set peft.dropout=0")
  return drop, sources


def fusion_source(folder: str, mcfg: ModelConfig, adapter_dim: int, top: int) -> dict:
  """One folder's Houlsby adapters for AdapterFusion, the top `top` layers; ValueError naming
  peft.fusion_adapters when the folder holds something else."""
  key = f"peft.fusion_adapters: {folder}"
  try:
    section, fields, tree = saved.read(folder)
  except ValueError as e:
    raise ValueError(f"{key}: {e}") from None
  if section.get("method") != "adapter":
    raise ValueError(f"{key} holds peft.method={section.get('method')} adapters; AdapterFusion "
                     "fuses Houlsby adapters (peft.method=adapter)")
  for field in ("n_layers", "d_model"):
    if fields.get(field) != getattr(mcfg, field):
      raise ValueError(f"{key} belongs to a model with {field}={fields.get(field)}, this one "
                       f"has {getattr(mcfg, field)}")
  if section.get("adapter_dim") != adapter_dim:
    raise ValueError(f"{key} has adapter_dim={section.get('adapter_dim')}: set "
                     f"peft.adapter_dim={section.get('adapter_dim')}")
  held = mcfg.n_layers - int(section.get("adapter_drop", 0))
  if held < top:
    raise ValueError(f"{key} holds adapters for the top {held} layers, and "
                     f"peft.adapter_drop leaves {top}: set peft.adapter_drop >= "
                     f"{mcfg.n_layers - held}")
  try:
    return {where: {k: np.asarray(tree["adapter"][where][k], np.float32)[held - top:]
                    for k in ("down", "down_bias", "up", "up_bias")} for where in ("attn", "mlp")}
  except KeyError as e:
    raise ValueError(f"{key}: tensor {e} missing") from None


def _dropout_delta(a, b, scale: float, rate: float, key):
  def delta(x):
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
    return jnp.asarray(scale, x.dtype) * ((x @ a.astype(x.dtype)) @ b.astype(x.dtype))
  return delta


def _copy(tree):
  return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _is_spec(x) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def _kaiming(key, shape):
  """PyTorch's kaiming_uniform_(a=sqrt(5)) of an (out, in) matrix: bound 1 / sqrt(in)."""
  bound = 1.0 / math.sqrt(shape[1])
  return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def _pissa(w, rank: int, scale: float, niter: int = 0, key=None):
  """PiSSA per layer: w (L, in, out) = U S Vt; A = U_r sqrt(S_r / s), B = sqrt(S_r / s) Vt_r,
  residual w - s A B (PEFT's `init_lora_weights="pissa"`, transposed to our layout). With
  `niter`, U S Vt come from `randomized_svd` (PEFT's "pissa_niter_N")."""
  if niter:
    u, sv, vt = randomized_svd(w, rank, niter, key)
  else:
    u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
  root = jnp.sqrt(sv[:, :rank] / scale)
  a = u[:, :, :rank] * root[:, None, :]
  b = root[:, :, None] * vt[:, :rank, :]
  return a, b, w - scale * a @ b


def randomized_svd(w, rank: int, niter: int, key, oversample: int = 8):
  """The top `rank` singular triplets of each matrix of w (..., m, n), approximately, as
  (u (..., m, rank), s (..., rank), vt (..., rank, n)): a Gaussian sketch of the range of w,
  `niter` subspace (power) iterations with re-orthonormalisation, then the exact SVD of the
  small projected matrix (Halko, Martinsson and Tropp 2011, algorithms 4.4 and 5.1). Costs
  O(m n (rank + oversample) niter) instead of the full SVD's O(m n min(m, n))."""
  m, n = w.shape[-2:]
  k = min(rank + oversample, m, n)
  y = w @ jax.random.normal(key, (*w.shape[:-2], n, k), w.dtype)
  q, _ = jnp.linalg.qr(y)
  for _ in range(niter):
    z, _ = jnp.linalg.qr(jnp.swapaxes(w, -1, -2) @ q)
    q, _ = jnp.linalg.qr(w @ z)
  u_small, s, vt = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ w, full_matrices=False)
  return (q @ u_small)[..., :rank], s[..., :rank], vt[..., :rank, :]


def select_targets(spec: str, mcfg: ModelConfig | None = None) -> tuple[tuple[str, str], ...]:
  """(module, weight) pairs of `mcfg`'s model (None: a dense one) whose names (ours, "attn.q",
  or one of Hugging Face's, "q_proj") fully match the regular expression `spec`; "all-linear"
  is every one."""
  names = linear(mcfg)
  if spec == "all-linear":
    return tuple(names)
  try:
    pattern = re.compile(spec)
  except re.error as e:
    raise ValueError(f"peft.targets={spec!r} is not a regular expression ({e})") from None
  return tuple(k for k, hf in names.items()
               if pattern.fullmatch(f"{k[0]}.{k[1]}") or any(pattern.fullmatch(n) for n in hf))


def count(params: dict, labels: dict) -> tuple[int, int]:
  """(trainable, total) parameter counts; VeRA's frozen shared projections count as total."""
  sizes = jax.tree.leaves(jax.tree.map(lambda x, l: (int(np.prod(x.shape)), l != FROZEN),
                                       params, labels), is_leaf=lambda x: isinstance(x, tuple))
  return sum(s for s, t in sizes if t), sum(s for s, _ in sizes)
