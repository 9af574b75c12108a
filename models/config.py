"""ModelConfig: what a decoder language model's weights are; Execution: how it runs.

One frozen ModelConfig covers the Llama family (Llama 1/2/3, Mistral, Qwen2, Qwen3), Gemma 1/2
and the mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE: the differences between them are
values here (qkv bias, query/key norms, tied embeddings, rope scaling, sliding windows, norm
offset, GeGLU, embedding scale, soft-caps, sandwich norms, experts), not code paths.
Rematerialisation, the attention implementation and the init scale change neither the weights'
shapes nor the function they compute, so they live apart, in `Execution`: a checkpoint restores
under any of them. The user's run config keeps all of them under `model.` (`split_fields`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

ROPE_SCALINGS = ("none", "linear", "ntk", "dynamic", "llama3", "yarn", "longrope")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "ring")
# the Hugging Face layout on export (models/hf.py); each is its transformers model_type
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma", "gemma2", "gemma3",
            "bloom", "mixtral", "qwen2_moe", "qwen3_moe")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
ROUTER_ORDERS = ("softmax_topk", "topk_softmax")
MOE_IMPLS = ("dropless", "capacity", "dense")
GROUPED_MATMULS = ("auto", "blocks", "ragged_dot", "tokamax")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 32000
  d_model: int = 4096
  n_layers: int = 32
  n_heads: int = 32
  n_kv_heads: int = 8
  head_dim: int = 0  # 0: d_model // n_heads
  d_ff: int = 14336
  max_seq_len: int = 8192  # positions the model was built (or pretrained) for
  norm_eps: float = 1e-5
  alibi: bool = False  # BLOOM: scores biased by -slope_h * distance, instead of rope
  rope_theta: float = 500000.0
  rope_local_theta: float = 0.0  # Gemma 3: sliding-window layers' own base, unscaled; 0: as all
  rope_scaling: str = "none"  # one of ROPE_SCALINGS (models/layers.py rope_inv_freq)
  rope_factor: float = 1.0  # how many times the context grows
  rope_original_max_len: int = 8192  # llama3 / yarn / longrope: the pretraining context length
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_beta_fast: float = 32.0  # yarn: rotations above which a frequency is kept as it is
  rope_beta_slow: float = 1.0  # yarn: rotations below which it is interpolated (/ factor)
  rope_truncate: bool = True  # yarn: round the ramp's ends to whole dimensions
  rope_attention_factor: float = 0.0  # yarn / longrope: cos and sin times this; 0: the default
  rope_long_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors past original
  rope_short_factor: tuple[float, ...] = ()  # longrope: the same within it
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys, before rope
  qk_norm_full: bool = False  # OLMo 2: ... over all their heads at once (heads * head_dim)
  tie_embeddings: bool = False
  sliding_window: int = 0  # Mistral: attend to at most this many previous tokens (0: off)
  sliding_window_layers: tuple[int, ...] = ()  # layers that use it (Gemma 2: even); (): all
  family: str = "llama"  # one of FAMILIES
  norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight), weights start at 0
  mlp_activation: str = "silu"  # one of MLP_ACTIVATIONS (Gemma: gelu_tanh, i.e. GeGLU)
  embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
  query_scale: float = 0.0  # attention scores scale; 0: head_dim ** -0.5 (Gemma 2: its own)
  attn_softcap: float = 0.0  # Gemma 2: scores -> cap * tanh(scores / cap); 0: off
  logit_softcap: float = 0.0  # Gemma 2: the same on the output logits
  post_norms: bool = False  # Gemma 2: also normalise attention and MLP outputs (sandwich)
  pre_norms: bool = True  # normalise the attention and MLP inputs (OLMo 2: no, outputs only)
  layer_norm: bool = False  # BLOOM: LayerNorm (mean removed, a bias) wherever RMSNorm would be
  embed_norm: bool = False  # BLOOM: a norm on the embeddings before the first layer
  mlp_gated: bool = True  # False (BLOOM): down(act(up(x))), no gate
  out_bias: bool = False  # BLOOM: biases on the attention output and the MLP's projections
  value_head: bool = False  # reward models: a scalar score per position (`score`, d_model x 1)
  # Mixture of experts (models/moe.py); n_experts = 0: every layer has the dense MLP.
  n_experts: int = 0  # routed experts per MoE layer
  experts_per_token: int = 2  # top-k
  expert_d_ff: int = 0  # hidden width of each routed expert; 0: d_ff
  shared_expert_d_ff: int = 0  # an always-on expert of this width (Qwen2-MoE, DeepSeek); 0: none
  shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert scaled by sigmoid(x @ w)
  moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0 (Qwen2-MoE decoder_sparse_step)
  moe_first_dense: int = 0  # ... and i >= moe_first_dense (DeepSeek first_k_dense_replace)
  router_order: str = "softmax_topk"  # one of ROUTER_ORDERS
  router_norm_topk: bool = True  # renormalise the k weights to sum 1 (Mixtral yes, Qwen2-MoE no)
  router_jitter: float = 0.0  # training: inputs times uniform(1 - j, 1 + j) (Mixtral's jitter)
  router_aux_loss_weight: float = 0.0  # Switch load-balancing loss weight
  router_z_loss_weight: float = 0.0  # router z-loss weight (ST-MoE)
  # auxiliary-loss-free balancing (DeepSeek-V3): a per-expert routing bias, used only to pick
  # the top k, moved by this much after each training step towards the less loaded experts
  router_bias_update_rate: float = 0.0  # 0: no routing bias
  # training: each batch's routing balanced across the experts by per-expert offsets solved on
  # that batch in this many rounds (models/moe.py `balanced_offsets`; 0: off); evaluation and
  # generation route by the logits (and the routing bias) alone
  router_batch_balance: int = 0

  def __post_init__(self):
    problems = []
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
                 "moe_every"):
      if getattr(self, name) <= 0:
        problems.append(f"{name}={getattr(self, name)} must be positive")
    if problems:  # the checks below divide by these
      raise ValueError("; ".join(problems))
    if self.head_dim == 0:
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.expert_d_ff == 0:
      object.__setattr__(self, "expert_d_ff", self.d_ff)
    object.__setattr__(self, "sliding_window_layers", tuple(int(i) for i in self.sliding_window_layers))
    for name in ("rope_long_factor", "rope_short_factor"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    if self.n_heads % self.n_kv_heads:
      problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim <= 0 or self.head_dim % 2:
      problems.append(f"head_dim={self.head_dim} must be positive and even for rotary embeddings")
    problems += _choices(self, (("rope_scaling", ROPE_SCALINGS), ("family", FAMILIES),
                                ("mlp_activation", MLP_ACTIVATIONS),
                                ("router_order", ROUTER_ORDERS)))
    for name in ("n_experts", "expert_d_ff", "shared_expert_d_ff"):
      if getattr(self, name) < 0:
        problems.append(f"{name}={getattr(self, name)} must be >= 0")
    if problems:  # the checks below assume these are counts
      raise ValueError("; ".join(problems))
    if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
      problems.append(f"experts_per_token={self.experts_per_token} must be in 1..n_experts="
                      f"{self.n_experts}")
    if self.n_experts and "moe" not in self.layer_kinds():
      problems.append(f"no layer is MoE with moe_every={self.moe_every} and moe_first_dense="
                      f"{self.moe_first_dense} over {self.n_layers} layers")
    for name in ("router_jitter", "router_aux_loss_weight", "router_z_loss_weight",
                 "router_bias_update_rate", "router_batch_balance"):
      if not getattr(self, name) >= 0:
        problems.append(f"{name}={getattr(self, name)} must be >= 0")
    problems += self._rope_problems()
    if self.alibi and (self.rope_scaling != "none" or self.rope_local_theta):
      problems.append("alibi=True takes no rope settings (rope_scaling, rope_local_theta): "
                      "ALiBi replaces the rotary embeddings")
    if self.rope_local_theta and not self.sliding_window:
      problems.append(f"rope_local_theta={self.rope_local_theta} is for sliding-window layers; "
                      "the model has none (sliding_window=0)")
    if not self.mlp_gated and self.n_experts:
      problems.append("mlp_gated=False: the experts are gated MLPs")
    if self.qk_norm_full and not self.qk_norm:
      problems.append("qk_norm_full=True needs qk_norm=True")
    if not (self.pre_norms or self.post_norms):
      problems.append("pre_norms=False needs post_norms=True: a block normalises somewhere")
    bad_layers = [i for i in self.sliding_window_layers if not 0 <= i < self.n_layers]
    if bad_layers:
      problems.append(f"sliding_window_layers={bad_layers} are not layers of {self.n_layers}")
    if problems:
      raise ValueError("; ".join(problems))

  def _rope_problems(self) -> list[str]:
    problems = []
    if self.rope_scaling != "none" and not self.rope_factor > 0:
      problems.append(f"rope_factor={self.rope_factor} must be > 0")
    if not self.rope_attention_factor >= 0:
      problems.append(f"rope_attention_factor={self.rope_attention_factor} must be >= 0")
    if self.rope_scaling == "yarn" and not self.rope_beta_fast > self.rope_beta_slow > 0:
      problems.append(f"rope_beta_fast={self.rope_beta_fast} and rope_beta_slow="
                      f"{self.rope_beta_slow}: yarn needs beta_fast > beta_slow > 0")
    if self.rope_scaling == "longrope":
      for name in ("rope_long_factor", "rope_short_factor"):
        if len(getattr(self, name)) != self.head_dim // 2:
          problems.append(f"{name} has {len(getattr(self, name))} values; longrope needs one "
                          f"per frequency, head_dim / 2 = {self.head_dim // 2}")
    return problems

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    return cls(**_known(cls, d))

  def layer_windows(self) -> list[int]:
    """The sliding window of each layer (0: global attention)."""
    local = set(self.sliding_window_layers) or set(range(self.n_layers))
    return [self.sliding_window if i in local else 0 for i in range(self.n_layers)]

  def layer_kinds(self) -> list[str]:
    """Each layer's feed-forward kind: "moe" (a mixture of experts) or "mlp" (the dense MLP)."""
    def is_moe(i):
      return self.n_experts > 0 and i >= self.moe_first_dense and (i + 1) % self.moe_every == 0
    return ["moe" if is_moe(i) else "mlp" for i in range(self.n_layers)]

  @property
  def scale(self) -> float:
    return self.query_scale or self.head_dim ** -0.5

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def ffn_params(self, kind: str, active: bool = False) -> int:
    """Parameters of one layer's feed-forward block of `kind` ("mlp" or "moe"); `active`: only
    those one token uses (its k routed experts, not all n_experts)."""
    d = self.d_model
    if kind == "mlp":
      return (3 if self.mlp_gated else 2) * d * self.d_ff + (
          self.d_ff + d if self.out_bias else 0)
    experts = self.experts_per_token if active else self.n_experts
    n = d * self.n_experts + experts * 3 * d * self.expert_d_ff  # router + routed experts
    if self.shared_expert_d_ff:
      n += 3 * d * self.shared_expert_d_ff + (d if self.shared_expert_gate else 0)
    return n

  def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
    """Exact parameter count of `models.decoder.Decoder` built from this config; `active`: the
    parameters one token uses (a mixture of experts counts only its k routed experts)."""
    d, h, k, hd = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim
    attn = d * h * hd + 2 * d * k * hd + h * hd * d
    if self.qkv_bias:
      attn += h * hd + 2 * k * hd
    if self.qk_norm:
      attn += (h + k) * hd if self.qk_norm_full else 2 * hd
    if self.out_bias:
      attn += d
    norm = 2 * d if self.layer_norm else d  # a scale (and LayerNorm's bias)
    per_layer = attn + (2 * self.pre_norms + 2 * self.post_norms) * norm
    total = self.n_layers * per_layer + norm * (2 if self.embed_norm else 1)  # final norm
    total += sum(self.ffn_params(kind, active) for kind in self.layer_kinds())
    if include_embeddings:
      total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
    elif not self.tie_embeddings:
      total += self.vocab_size * d  # the output head is a matmul: it counts as compute
    return total

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention scores, causal halved.

    N counts the parameters one token uses (a mixture of experts: its k routed experts) and
    excludes the input embedding lookup (a gather, not a matmul). Attention costs
    2 matmuls (QK^T and PV) of 2*T*h*hd FLOPs each per token forward, times 3 for
    forward + backward, halved because a causal mask skips half the pairs.
    """
    n = self.num_params(include_embeddings=False, active=True)
    if self.tie_embeddings:
      n += self.vocab_size * self.d_model  # tied head still does the logits matmul
    return 6 * n + self.attention_flops_per_token(seq_len)

  def attention_flops_per_token(self, seq_len: int) -> float:
    """The attention part of `flops_per_token`: QK^T and PV, x3, causal halved."""
    return 6 * self.n_layers * seq_len * self.n_heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class Execution:
  """How a model runs: the same weights compute the same function under any of these.

  `remat`: what the backward pass recomputes (models/decoder.py REMAT_POLICIES). `attention_impl`:
  the attention kernel (models/layers.py `attention_inputs`). `init_std`: the normal init scale
  of fresh weights (output projections divided by sqrt(2 layers)). `moe_impl`, `capacity_factor`,
  `grouped_matmul`: how a mixture of experts dispatches tokens (models/moe.py); `capacity` drops
  the tokens past an expert's capacity, so only it can change the function."""
  remat: str = "none"  # one of REMAT_POLICIES
  attention_impl: str = "xla"  # one of ATTENTION_IMPLS
  init_std: float = 0.02
  moe_impl: str = "dropless"  # one of MOE_IMPLS (models/moe.py)
  capacity_factor: float = 1.25  # moe_impl=capacity: slots per expert, x tokens * k / n_experts
  grouped_matmul: str = "auto"  # one of GROUPED_MATMULS: the dropless path's kernel

  def __post_init__(self):
    problems = _choices(self, (("remat", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS),
                               ("moe_impl", MOE_IMPLS), ("grouped_matmul", GROUPED_MATMULS)))
    if not self.init_std >= 0:
      problems.append(f"init_std={self.init_std} must be >= 0")
    if not self.capacity_factor > 0:
      problems.append(f"capacity_factor={self.capacity_factor} must be > 0")
    if problems:
      raise ValueError("; ".join(problems))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Execution":
    return cls(**_known(cls, d))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(Execution))


def split_fields(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """A run config's `model` section (also a config.json written before the two were apart)
  as (ModelConfig fields, Execution fields)."""
  return ({k: v for k, v in d.items() if k not in EXECUTION_FIELDS},
          {k: v for k, v in d.items() if k in EXECUTION_FIELDS})


def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f"unknown model keys: {', '.join(unknown)}")
  return dict(d)


def _choices(obj, fields) -> list[str]:
  return [f"{name}={getattr(obj, name)!r} is not one of {', '.join(allowed)}"
          for name, allowed in fields if getattr(obj, name) not in allowed]
