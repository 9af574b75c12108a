"""How much memory a run needs per device, before it runs, and whether that fits.

The train state is exact (shapes and shardings); activations come from a per-token model fit to
XLA's buffer assignment (`ACTIVATIONS`). `trainer.estimate` prints these figures; `trainer.train`
refuses a run whose estimate exceeds the memory its devices have (`check_fits`).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np

import parallel
from models import layers
from models.handle import param_shardings
from parallel import pipeline as pipeline_lib
from trainer.validate import UserError, pipeline_of

MiB = 2**20


# What the train step keeps per token, in elements of the compute dtype, by remat policy: per
# layer, d * d_model + kv * kv_width + ff * d_ff + scores * heads * seq_len (attention scores:
# the xla path keeps no probabilities, models/layers.attend_block, but computes a block's at a
# time); outside the layers, vocab * vocab_size + outside * d_model (embeddings, final norm,
# logits, cross-entropy); and `grads` times the trainable parameters' bytes for the gradients
# with the update's temporaries. Under full remat a layer keeps `kept` * d_model (its input) and
# the per-layer terms count once: one layer's working set is live at a time (the dots policies
# keep their per-layer terms, like none). Flash attention paths (pallas, cudnn, ring) never hold
# the scores: their `scores` term is left out. The counts are fit (non-negative least squares)
# to XLA's own buffer assignment of our train step on CPU for 12 shapes, by
# `python benchmarks/estimate_fit.py --remat none,full,dots,dots_no_batch`, which prints these
# lines; tests/test_estimate.py checks them against the compiler on the tiny and a medium config.
@dataclasses.dataclass(frozen=True)
class Coefficients:
  grads: float
  d: float
  kv: float
  ff: float
  scores: float
  vocab: float
  outside: float
  kept: float = 0.0


ACTIVATIONS = {
    "none": Coefficients(grads=1.81, d=7.27, kv=2.13, ff=6.36, scores=0.71, vocab=1.36,
                         outside=25.16),
    "full": Coefficients(grads=1.66, kv=0.0, ff=5.58, scores=2.14, vocab=1.3, outside=4.96,
                         kept=0.29, d=0.0),
    "dots": Coefficients(grads=2.13, d=0.03, kv=1.13, ff=2.27, scores=0.51, vocab=1.52,
                         outside=18.94),
    "dots_no_batch": Coefficients(grads=1.96, d=0.03, kv=1.13, ff=2.27, scores=0.51, vocab=1.52,
                                  outside=18.94),
}


# A mixture of experts' routed experts (models/moe.py, parallel/experts.py) work on rows: a
# (token, expert) pair's slot in the dispatch buffers and grouped matmuls. Per row, a MoE layer
# keeps `saved_f` * (its share of expert_d_ff) + `saved_d` * d_model elements for the backward
# (the fused expert FFN's pre-activations and output, the sorted rows) in place of the dense
# MLP's `ff` term, and while it runs `work_f` and `work_d` more (the buffers of the all_to_all
# and the grouped FFN's padding and gathers), once: one layer's at a time. The f : d
# proportions were read off XLA's buffer assignment of our train step on CPU (the memory-usage
# report of --xla_dump_to); the two scales are a least-squares fit (relative error) to the
# compiled step of 7 tiny and medium MoE configs with the fused kernel (kernels/
# grouped_matmul.py gated_ffn): dp8, ep8, fsdp2 x ep2 x tp2 (full remat), fsdp2 x ep4
# (capacity), medium data2 x ep4, ep2 x data4 (dots), medium fsdp4 x ep2 (full remat); each
# within 0.91-1.06 of the compiler (benchmarks/moe_estimate.py). The dots policies' saved scale
# fits as 0 (their case is met without it). tests/test_estimate.py checks three of them.
@dataclasses.dataclass(frozen=True)
class MoeRows:
  saved_f: float
  saved_d: float
  work_f: float
  work_d: float


_SAVED = dict(saved_f=1.15, saved_d=0.44)
_WORK = dict(work_f=10.74, work_d=8.61)
MOE_ROWS = {
    "none": MoeRows(**_SAVED, **_WORK),
    "full": MoeRows(**_SAVED, **_WORK),
    "dots": MoeRows(saved_f=0.0, saved_d=0.0, **_WORK),
    "dots_no_batch": MoeRows(saved_f=0.0, saved_d=0.0, **_WORK),
}


def moe_rows_per_token(mcfg, run, mesh: dict[str, int]) -> float:
  """Rows one device's expert matmuls hold per token it holds, per MoE layer. With expert
  parallelism (parallel/experts.py) dropless sizes its buffers for the worst case, every pair
  of every device on the `expert` axis to one device's experts: n_expert * k; capacity holds
  capacity_factor * k. Without it dropless runs per device too (k rows per token); capacity
  is left to the compiler, which does not split its dispatch: every device holds the whole
  batch's capacity_factor * k rows per token; `dense` runs every expert on every token."""
  k, n = mcfg.experts_per_token, mesh["expert"]
  impl = "dropless" if run is None else run.moe_impl
  if impl == "capacity":
    spread = 1 if n > 1 else mesh["data"] * mesh["fsdp"] * mesh["sequence"]
    return k * run.capacity_factor * spread
  if n > 1:
    return k * n
  return mcfg.n_experts if impl == "dense" else k


def element_bytes(platform: str, compute_dtype) -> int:
  """Bytes of an activation: XLA:CPU computes bfloat16 and float16 in float32."""
  return 4 if platform == "cpu" else np.dtype(compute_dtype).itemsize


def score_keys(seq_len: int) -> float:
  """Keys per query the xla path holds scores for: its query blocks (models/layers.py) skip
  the keys after each block, keeping (blocks + 1) / (2 blocks) of them."""
  blocks = layers.query_blocks(seq_len)
  return seq_len * (blocks + 1) / (2 * blocks)


def activation_bytes(mcfg, tc, mesh: dict[str, int], remat: str, element: int,
                     attention_impl: str, run=None) -> float:
  """The per-token model above, for the tokens and heads one device holds; `run` (the
  Execution) says how a mixture of experts dispatches (dropless when not given)."""
  c = ACTIVATIONS[remat]
  dp = mesh["data"] * mesh["fsdp"] * mesh["expert"]  # outside the experts `expert` splits the batch
  tokens = tc.batch_size // tc.grad_accum * tc.seq_len / (dp * mesh["sequence"])
  tp = mesh["tensor"]
  scores = c.scores if attention_impl == "xla" else 0.0
  attention = (c.d * mcfg.d_model + c.kv * mcfg.n_kv_heads * mcfg.head_dim / tp
               + scores * mcfg.n_heads / tp * score_keys(tc.seq_len))
  m, rows = MOE_ROWS[remat], moe_rows_per_token(mcfg, run, mesh)
  ffn = {"mlp": c.ff * mcfg.d_ff / tp,
         "moe": c.ff * mcfg.shared_expert_d_ff / tp
                + rows * (m.saved_f * mcfg.expert_d_ff / tp + m.saved_d * mcfg.d_model)}
  kinds = mcfg.layer_kinds()
  if remat != "full":
    per_token = sum(attention + ffn[kind] for kind in kinds)
  else:
    per_token = mcfg.n_layers * c.kept * mcfg.d_model + attention + max(ffn[k] for k in kinds)
  if "moe" in kinds:
    per_token += rows * (m.work_f * mcfg.expert_d_ff / tp + m.work_d * mcfg.d_model)
  per_token += c.vocab * mcfg.vocab_size / tp + c.outside * mcfg.d_model
  return tokens * per_token * element


def stage_activation_bytes(mcfg, tc, mesh: dict[str, int], p: pipeline_lib.Pipeline | None,
                           remat: str, element: int, attention_impl: str, run=None) -> float:
  """`activation_bytes`, or with a pipeline `p` a stage's activations (parallel/pipeline.py):
  the chunk inputs and gradients it holds between a microbatch's forward and backward
  (`Table.inputs`, `Table.cotangents`, plus the two messages in flight), each a microbatch x
  d_model, and one microbatch's working set through one chunk, head included, while its
  backward runs."""
  if p is None:
    return activation_bytes(mcfg, tc, mesh, remat, element, attention_impl, run)
  table = pipeline_lib.build_table(p)
  dp = mesh["data"] * mesh["fsdp"] * mesh["expert"]
  micro_tokens = tc.batch_size // p.microbatches * tc.seq_len / (dp * mesh["sequence"])
  held = (table.inputs + table.cotangents + 2) * micro_tokens * mcfg.d_model * element
  chunk = dataclasses.replace(mcfg, n_layers=mcfg.n_layers // (p.stages * p.repeats))
  one = _Train(tc.batch_size // p.microbatches, tc.seq_len)
  return held + activation_bytes(chunk, one, mesh, remat, element, attention_impl, run)


@dataclasses.dataclass(frozen=True)
class _Train:  # the fields of cfg.train that activation_bytes reads
  batch_size: int
  seq_len: int
  grad_accum: int = 1


def device_bytes(tree, memory_kind: str | None = None) -> float:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (of `memory_kind`
  only, when given: the host-offloaded optimizer state is not device memory)."""
  total = 0.0
  for x in jax.tree.leaves(tree):
    kind = getattr(x.sharding, "memory_kind", None)
    if memory_kind is not None and kind not in (memory_kind, None):
      continue
    total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
  return total


def components(cfg, pl, mcfg, sizes: dict[str, int], batch) -> tuple[dict[str, float], int]:
  """(bytes per device by component, trainable parameter count) of the run `pl`
  (trainer.train.plan) on a mesh of `sizes`, with `batch` its abstract batch."""
  abstract = pl.abstract_state
  params = abstract["params"]
  labels = pl.spec.primary.labels  # PEFT's, or a quantized start's frozen integers (or None)
  grad_shardings = param_shardings(
      pl.handle, pl.mesh, parallel.strategy(cfg.mesh.strategy, cfg.mesh.rules).grads)
  trainable = [(p, s) for p, s, l in zip(
      jax.tree.leaves(params), jax.tree.leaves(grad_shardings),
      jax.tree.leaves(labels) if labels is not None else [None] * len(jax.tree.leaves(params)))
      if l != "frozen"]
  grads = sum(math.prod(s.shard_shape(p.shape)) * p.dtype.itemsize for p, s in trainable)
  grads *= pl.spec.primary.view.trained_fraction(mcfg.n_layers)  # LISA: a few layers at a time
  element = element_bytes(pl.mesh.devices.flat[0].platform, pl.compute_dtype)
  run = pl.handle.run
  c = ACTIVATIONS[run.remat]
  acts = stage_activation_bytes(mcfg, cfg.train, sizes, pipeline_of(cfg, sizes["stage"]),
                                run.remat, element, run.attention_impl, run)
  # the other models of the run (a reference, PPO's critic and reward model, a teacher): their
  # parameters, and for one that trains its optimizer state, gradients and the activations its
  # backward pass keeps (frozen models only run forward: nothing kept)
  others, host = {}, 0.0
  for slot in pl.spec.slots[1:]:
    kind = "trains" if slot.trains else "frozen"
    tree = abstract[slot.name]["params"] if slot.trains else abstract[slot.name]
    others[f"{slot.name} ({kind}): parameters"] = device_bytes(tree)
    if slot.trains:
      opt = abstract[slot.name]["opt_state"]
      others[f"{slot.name} ({kind}): optimizer state"] = device_bytes(opt, "device")
      host += device_bytes(opt) - others[f"{slot.name} ({kind}): optimizer state"]
      grads += sum(math.prod(s.shard_shape(p.shape)) * p.dtype.itemsize for p, s in zip(
          jax.tree.leaves(tree), jax.tree.leaves(slot.grad_shardings)))
      acts += activation_bytes(slot.handle.cfg, cfg.train, sizes, slot.handle.run.remat,
                               element, slot.handle.run.attention_impl, slot.handle.run)
  slots = {s.name for s in pl.spec.slots[1:]}
  rest = {k: v for k, v in abstract.items() if k not in ("params", "opt_state", *slots)}
  comp = {
      "parameters": device_bytes(params),
      "optimizer state": device_bytes(abstract["opt_state"], "device"),
      **others,
      "other state": device_bytes(rest),
      "gradients (+ update temporaries)": c.grads * grads,
      f"activations (remat {run.remat})": acts,
      "batch": device_bytes(batch),
  }
  host += device_bytes(abstract["opt_state"]) - comp["optimizer state"]
  if host:
    comp["optimizer state in host memory (not counted)"] = host
  return comp, sum(math.prod(p.shape) for p, _ in trainable)


def total_bytes(components: dict[str, float]) -> float:
  return sum(v for k, v in components.items() if "not counted" not in k)


def device_memory(devices) -> tuple[float, str]:
  """(bytes one device can hold, what that figure is): the accelerator's own limit, or on CPU
  the host's physical memory shared by the process's devices (simulated CPU devices share it)."""
  mine = [d for d in devices if d.process_index == jax.process_index()] or devices
  stats = mine[0].memory_stats()
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"]), f"{mine[0].device_kind} memory"
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return host / len(mine), f"host memory / {len(mine)} devices" if len(mine) > 1 else "host memory"


def check_fits(components: dict[str, float], devices) -> None:
  """A run whose estimated memory per device exceeds what a device has is refused before
  anything is allocated (the estimate is within 15% of the compiler's figure,
  tests/test_estimate.py); `train.memory_check=False` tries it anyway."""
  need = total_bytes(components)
  have, what = device_memory(devices)
  if need <= have:
    return
  biggest = max((k for k in components if "not counted" not in k), key=components.get)
  if biggest.startswith(("activations", "batch")):
    key, advice = "train.batch_size", ("lower train.batch_size or train.seq_len, raise "
                                       "train.grad_accum, or use model.remat=full")
  else:  # the state: parameters, optimizer moments, gradients
    key, advice = "mesh.strategy", ("shard the state (mesh.strategy=fsdp over mesh.fsdp), keep "
                                    "the optimizer state on the host (mesh.offload_optimizer), "
                                    "or train fewer parameters (peft.method)")
  raise UserError(
      f"config key {key}: the run needs about {need / 2**30:.3g} GiB per device (estimate; "
      f"{biggest} {components[biggest] / 2**30:.3g} GiB) but a device has {have / 2**30:.3g} "
      f"GiB ({what}); {advice}, or set train.memory_check=False to try anyway")
