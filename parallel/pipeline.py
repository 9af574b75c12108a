"""Pipeline parallelism over the `stage` mesh axis: GPipe, circular and 1F1B schedules.

The layer stack is split into `stages` x `repeats` chunks of consecutive layers; chunk c lives
on stage c % stages (GPipe and 1F1B: one chunk per stage; circular: `repeats` chunks per stage,
a microbatch goes round the ring of stages `repeats` times). The batch is split into
`microbatches` that flow through the stages. A schedule is a static table built here in Python:
for every time slot and stage, at most one forward (F) and then at most one backward (B) of a
microbatch through a chunk. `run` executes the table inside `shard_map` over the `stage` axis
(the other mesh axes stay automatic, so the data, fsdp and tensor rules hold inside each stage);
after each slot two `ppermute`s move the activations one stage on and the gradients one stage
back. The stages thus step through the slots together, and a slot lasts as long as its busiest
stage: `Table.bubble` is the idle share under that model.

Each stage keeps the input of a chunk pass from its forward to its backward, which recomputes
the chunk's forward (as GPipe does: only the activations between stages are held). The three
schedules differ only in the order of the actions:

    gpipe     every forward, then every backward: holds all `microbatches` inputs per stage.
    circular  gpipe over `repeats` chunks per stage: a smaller bubble, `repeats` x as many
              inputs held and as many messages.
    1f1b      after a warm-up of (stages - 1 - stage) forwards, one forward and one backward in
              turn: at most `stages` inputs in flight, however many microbatches. In lock-step
              slots its round trips leave more of them idle than gpipe's (its bubble is ~2x).

The first stage's first chunk takes the token embeddings and the last stage's last chunk runs
the head and the objective: both run inside the step's loss function, which the decoder calls
back through its `Context.stack` seam (models/decoder.py), so every objective and PEFT method
that runs through the decoder's scan runs pipelined unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

SCHEDULES = ("gpipe", "circular", "1f1b")
# Action kinds. BWD_LAST: the last chunk's backward, which runs its forward and the head too;
# WAIT_LAST: gpipe and circular hold the last stage back where its forward would be, so that
# its backwards come after the forwards as in those schedules (it runs nothing).
IDLE, FWD, BWD, BWD_LAST, WAIT_LAST = 0, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """How a pipelined step runs: `stages` (mesh.stage), `schedule`, `microbatches` (the batch
  is split into this many), `repeats` (circular: chunks per stage)."""
  stages: int
  schedule: str = "gpipe"
  microbatches: int = 0  # 0: as many as stages
  repeats: int = 1

  def __post_init__(self):
    if self.microbatches == 0:
      object.__setattr__(self, "microbatches", self.stages)

  def problems(self, n_layers: int, batch: int) -> list[tuple[str, str]]:
    """(config key, what is wrong) for a config this pipeline cannot run."""
    out = []
    if self.schedule not in SCHEDULES:
      out.append(("mesh.pipeline_schedule",
                  f"{self.schedule!r} is not one of {', '.join(SCHEDULES)}"))
    if self.repeats < 1 or (self.repeats > 1 and self.schedule != "circular"):
      out.append(("mesh.pipeline_repeats", f"{self.repeats}: more than one chunk per stage "
                  "needs mesh.pipeline_schedule=circular (and 1 or more)"))
    chunks = self.stages * self.repeats
    if n_layers % chunks:
      out.append(("mesh.stage", f"the model's {n_layers} layers do not split into {chunks} equal "
                  f"chunks (mesh.stage={self.stages} x mesh.pipeline_repeats={self.repeats}); "
                  f"use a divisor of {n_layers}"))
    if self.microbatches < 1 or batch % self.microbatches:
      out.append(("mesh.microbatches", f"{self.microbatches} microbatches do not split the "
                  f"batch of {batch} sequences"))
    if self.schedule == "circular" and self.microbatches < self.stages:
      out.append(("mesh.microbatches", f"circular needs at least as many microbatches as "
                  f"stages ({self.stages}), got {self.microbatches}"))
    return out


# ----------------------------------------------------------------------------------------------
# Schedules: per stage, its actions in order; then a time table by simulation
# ----------------------------------------------------------------------------------------------


def stage_actions(p: Pipeline) -> list[list[tuple[int, int, int]]]:
  """For each stage, its actions (kind, microbatch, repeat) in the order it runs them. The
  last chunk has no forward of its own: its backward recomputes it and runs the head."""
  S, M, R = p.stages, p.microbatches, p.repeats
  out = []
  for s in range(S):
    is_last = lambda r: s == S - 1 and r == R - 1
    fwd = [(WAIT_LAST if is_last(k // M) else FWD, k % M, k // M) for k in range(R * M)]
    bwd = [(BWD_LAST if is_last(r) else BWD, m, r) for r in reversed(range(R)) for m in range(M)]
    if p.schedule in ("gpipe", "circular"):
      out.append(fwd + bwd)
      continue
    fwd = [a for a in fwd if a[0] == FWD]  # 1f1b: the last stage runs each backward at once
    warm = min(S - 1 - s, M)
    acts = fwd[:warm]
    for i in range(M - warm):
      acts += ([fwd[warm + i]] if s < S - 1 else []) + [bwd[i]]
    out.append(acts + bwd[M - warm:])
  return out


@dataclasses.dataclass(frozen=True)
class Table:
  """A schedule laid out in time: int32 arrays (slots, stages). In each slot a stage runs at
  most one forward (`f_*`) and then at most one backward (`b_*`): `*_kind` (IDLE, FWD / BWD,
  BWD_LAST), `*_micro`, `*_repeat`, `*_src` (the input buffer slot it reads; -1: the
  embeddings); `b_cot`: the gradient buffer slot a backward reads; `store_act` / `store_cot`:
  where the activation / gradient that arrived from the previous / next stage at the start of
  the slot is kept (-1: nothing arrived). `inputs`, `cotangents`: buffer slots per stage."""
  f_kind: np.ndarray
  f_micro: np.ndarray
  f_repeat: np.ndarray
  f_src: np.ndarray
  b_kind: np.ndarray
  b_micro: np.ndarray
  b_repeat: np.ndarray
  b_src: np.ndarray
  b_cot: np.ndarray
  store_act: np.ndarray
  store_cot: np.ndarray
  inputs: int
  cotangents: int

  FIELDS = ("f_kind", "f_micro", "f_repeat", "f_src", "b_kind", "b_micro", "b_repeat", "b_src",
            "b_cot", "store_act", "store_cot")

  @property
  def slots(self) -> int:
    return self.f_kind.shape[0]

  def bubble(self) -> float:
    """The idle share of the stages' time when a slot lasts as long as its busiest stage, a
    forward counted as 1 and a backward as 3 (it recomputes the forward, then the backward
    proper is ~2 forwards)."""
    work = (self.f_kind == FWD) * 1 + (self.b_kind != IDLE) * 3
    return float(1 - work.sum() / (work.max(axis=1).sum() * work.shape[1]))


def build_table(p: Pipeline) -> Table:
  """Lays the schedule out in time: each slot, every stage runs its next action if what it
  needs arrived in an earlier slot, and then the one after it if that is a backward that can
  run too. Buffer slots are handed out as messages arrive and freed by the backward that reads
  them last."""
  S = p.stages
  acts = stage_actions(p)
  pos, stalled = [0] * S, 0
  done: dict[tuple, int] = {}  # (stage, FWD or BWD, micro, repeat) -> slot
  rows = []  # per slot, per stage: (forward or None, backward or None)

  def arrived(key, t):
    return key is None or (key in done and done[key] < t)

  def ready(s, action, t):
    kind, m, r = action
    # the chunk's input: the forward before it in the ring (none for the first chunk)
    src = None if s == 0 and r == 0 else (s - 1, FWD, m, r) if s > 0 else (S - 1, FWD, m, r - 1)
    if kind in (FWD, WAIT_LAST):
      return arrived(src, t)
    # a backward (which recomputes its forward) needs the input and the gradient of its output
    cot = (None if kind == BWD_LAST else (s + 1, BWD, m, r) if s < S - 1
           else (0, BWD, m, r + 1))
    return arrived(src, t) and arrived(cot, t)

  t = 0
  while any(pos[s] < len(acts[s]) for s in range(S)):
    row = []
    for s in range(S):
      fwd = bwd = None
      if pos[s] < len(acts[s]) and acts[s][pos[s]][0] in (FWD, WAIT_LAST) and \
          ready(s, acts[s][pos[s]], t):
        fwd = acts[s][pos[s]]
        pos[s] += 1
      if pos[s] < len(acts[s]) and acts[s][pos[s]][0] in (BWD, BWD_LAST) and \
          ready(s, acts[s][pos[s]], t):
        bwd = acts[s][pos[s]]
        pos[s] += 1
      row.append((fwd, bwd))
    stalled = stalled + 1 if all(f is None and b is None for f, b in row) else 0
    if stalled > 2:
      raise RuntimeError(f"pipeline schedule {p} deadlocks at slot {t}")  # a bug here
    for s, (fwd, bwd) in enumerate(row):
      for a in (fwd, bwd):
        if a is not None:
          done[(s, FWD if a[0] in (FWD, WAIT_LAST) else BWD, a[1], a[2])] = t
    rows.append(row)
    t += 1
  T = len(rows)
  out = {f: np.full((T, S), -1 if f.endswith(("src", "store_act", "store_cot")) else 0, np.int32)
         for f in Table.FIELDS}
  for t, row in enumerate(rows):
    for s, (fwd, bwd) in enumerate(row):
      for prefix, a in (("f_", fwd), ("b_", bwd)):
        if a is not None:
          out[prefix + "kind"][t, s], out[prefix + "micro"][t, s], out[prefix + "repeat"][t, s] = a
  n_in = n_cot = 1
  for s in range(S):
    free_in, free_cot, where_in, where_cot = [], [], {}, {}
    used_in = used_cot = 0
    left, right = (s - 1) % S, (s + 1) % S
    for t in range(T):
      if t > 0:  # what arrives at the start of slot t: sent by the neighbours at t - 1
        if out["f_kind"][t - 1, left] == FWD:  # the input of (m, r) here
          m, r = out["f_micro"][t - 1, left], out["f_repeat"][t - 1, left]
          slot = free_in.pop() if free_in else used_in
          used_in = max(used_in, slot + 1)
          where_in[(m, r if s > 0 else r + 1)] = slot
          out["store_act"][t, s] = slot
        m, r = out["b_micro"][t - 1, right], out["b_repeat"][t - 1, right]
        if out["b_kind"][t - 1, right] != IDLE and not (right == 0 and r == 0):
          slot = free_cot.pop() if free_cot else used_cot
          used_cot = max(used_cot, slot + 1)
          where_cot[(m, r if s < S - 1 else r - 1)] = slot
          out["store_cot"][t, s] = slot
      if out["f_kind"][t, s] == FWD:
        m, r = out["f_micro"][t, s], out["f_repeat"][t, s]
        if not (s == 0 and r == 0):
          out["f_src"][t, s] = where_in[(m, r)]
      if out["b_kind"][t, s] != IDLE:
        m, r = out["b_micro"][t, s], out["b_repeat"][t, s]
        if not (s == 0 and r == 0):
          out["b_src"][t, s] = where_in.pop((m, r))
          free_in.append(out["b_src"][t, s])
        if out["b_kind"][t, s] == BWD:
          out["b_cot"][t, s] = where_cot.pop((m, r))
          free_cot.append(out["b_cot"][t, s])
    n_in, n_cot = max(n_in, used_in), max(n_cot, used_cot)
  return Table(**out, inputs=n_in, cotangents=n_cot)


# ----------------------------------------------------------------------------------------------
# Running a table
# ----------------------------------------------------------------------------------------------


def chunk_order(p: Pipeline, n_layers: int) -> np.ndarray | None:
  """The layer permutation that puts each stage's chunks next to each other (circular: chunk
  r * stages + s on stage s), or None when they already are."""
  if p.repeats == 1:
    return None
  per = n_layers // (p.stages * p.repeats)
  chunks = [r * p.stages + s for s in range(p.stages) for r in range(p.repeats)]
  return np.concatenate([np.arange(c * per, (c + 1) * per) for c in chunks])


def run(p: Pipeline, mesh, loss_fn: Callable, params: dict, trainable: dict, layered: dict,
        micro: dict, rng) -> tuple[tuple, dict]:
  """((loss sum, count, aux sums), gradients) of the batch through the pipeline, as the
  unpipelined step's `value_and_grad` gives them (the gradients of the scaled loss sum).
  `micro`: the batch split into `p.microbatches`, each array (microbatches, rows, ...).

  `loss_fn(params, microbatch, rng, stack) -> (scaled loss, (loss sum, count, aux))`: the
  step's loss over the models by slot, with `stack` given to the trained models' decoders
  (`Context.stack`). `params`: {slot: parameter tree}; `trainable`, `layered`: {slot: a bool
  per leaf of its tree (in flatten order)}: the leaves differentiated, and those with a
  leading layer axis (split over the stages). Gradients: {slot: the trainable leaves' gradients,
  in order}."""
  S = p.stages
  table = build_table(p)
  flat = {k: jax.tree.flatten(v) for k, v in params.items()}
  n_layers = next(leaf.shape[0] for k in flat for leaf, is_l in zip(flat[k][0], layered[k])
                  if is_l)
  per = n_layers // (S * p.repeats)  # layers per chunk
  order = chunk_order(p, n_layers)
  inverse = None if order is None else np.argsort(order)

  def permute(leaves, is_layered, idx):
    return [jnp.take(x, idx, axis=0) if lay and idx is not None else x
            for x, lay in zip(leaves, is_layered)]

  leaves = {k: permute(flat[k][0], layered[k], order) for k in flat}
  specs = {k: [P("stage") if lay else P() for lay in layered[k]] for k in flat}
  rows = {f: jnp.asarray(getattr(table, f)) for f in Table.FIELDS}

  def local(leaves, micro, rows, rng):
    stage = jax.lax.axis_index("stage")

    def with_trainable(train):
      out = {}
      for k in flat:
        it = iter(train[k])
        out[k] = flat[k][1].unflatten([next(it) if t else x for x, t in
                                       zip(leaves[k], trainable[k])])
      return out

    def piece(train, x_in, m, r, first):
      """((scaled loss, (loss sum, count, aux)), the chunk's output): microbatch m's loss with
      the trained models' layer stack replaced by chunk r of this stage on x_in (first: on the
      embeddings)."""
      mb = jax.tree.map(lambda x: x[m], micro)
      held = {}

      def stack(body, x, layers, per_layer):
        # a leaf with this stage's layers (the parameters) or with all of them (per-layer
        # inputs, keys drawn inside the step): chunk r's part
        start = (r * S + stage) * per  # the chunk's first layer in the whole stack
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start if a.shape[0] == n_layers
                                                      else r * per, per)
        layers, per_layer = jax.tree.map(take, (layers, per_layer))
        h = x if x_in is None else jnp.where(first, x, x_in.astype(x.dtype))
        h, out = jax.lax.scan(lambda h, xs: body(h, *xs), h, (layers, per_layer))
        held["y"] = h
        return h, out

      scaled, out = loss_fn(with_trainable(train), mb, jax.random.fold_in(rng, m), stack)
      return (scaled, out), held["y"]

    train0 = {k: [x for x, t in zip(leaves[k], trainable[k]) if t] for k in flat}
    (_, out_shape), y_shape = jax.eval_shape(lambda: piece(train0, None, 0, 0, True))
    act = jnp.zeros(y_shape.shape, y_shape.dtype)
    zero_grads = jax.tree.map(jnp.zeros_like, train0)
    zero_out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

    def slot(carry, row):
      inputs, cots, msg_act, msg_cot, grads, outs = carry
      row = {f: v[stage] for f, v in row.items()}
      keep = lambda buf, i, msg: jnp.where(i >= 0, buf.at[jnp.maximum(i, 0)].set(msg), buf)
      inputs = keep(inputs, row["store_act"], msg_act)
      cots = keep(cots, row["store_cot"], msg_cot)

      # the forward half of the slot: a chunk's forward, its output sent on
      src, m, r = row["f_src"], row["f_micro"], row["f_repeat"]
      send_act = jax.lax.cond(
          row["f_kind"] == FWD,
          lambda: piece(train0, inputs[jnp.maximum(src, 0)], m, r, src < 0)[1],
          lambda: act)

      # the backward half: a chunk's forward again and its backward, the input's gradient sent
      # back; the last chunk's backward starts from the loss
      src, m, r = row["b_src"], row["b_micro"], row["b_repeat"]
      x_in, first = inputs[jnp.maximum(src, 0)], src < 0

      def idle():
        return act, zero_grads, zero_out

      def backward():
        _, vjp = jax.vjp(lambda t, x: piece(t, x, m, r, first)[1], train0, x_in)
        d_train, d_x = vjp(cots[row["b_cot"]])
        return d_x, d_train, zero_out

      def backward_last():
        scaled, vjp, out = jax.vjp(lambda t, x: piece(t, x, m, r, first)[0], train0, x_in,
                                   has_aux=True)
        d_train, d_x = vjp(jnp.ones_like(scaled))
        return d_x, d_train, out

      branch = jnp.clip(row["b_kind"] - BWD + 1, 0, 2)  # IDLE -> 0, BWD -> 1, BWD_LAST -> 2
      send_cot, d_train, out = jax.lax.switch(branch, (idle, backward, backward_last))
      grads = jax.tree.map(jnp.add, grads, d_train)
      outs = jax.tree.map(jnp.add, outs, out)
      msg_act = jax.lax.ppermute(send_act, "stage", [(i, (i + 1) % S) for i in range(S)])
      msg_cot = jax.lax.ppermute(send_cot, "stage", [(i, (i - 1) % S) for i in range(S)])
      return (inputs, cots, msg_act, msg_cot, grads, outs), None

    carry = (jnp.zeros((table.inputs, *act.shape), act.dtype),
             jnp.zeros((table.cotangents, *act.shape), act.dtype), act, act, zero_grads, zero_out)
    carry, _ = jax.lax.scan(slot, carry, rows)
    grads, outs = carry[4], carry[5]
    # the outside leaves' gradients (embeddings, head, final norm) came from the first and
    # last stages; the layers' stay on their stage
    grads = {k: [g if lay else jax.lax.psum(g, "stage")
                 for g, lay in zip(grads[k], [l for l, t in zip(layered[k], trainable[k]) if t])]
             for k in grads}
    outs = jax.tree.map(lambda x: jax.lax.psum(x, "stage"), outs)
    return outs, grads

  grad_specs = {k: [s for s, t in zip(specs[k], trainable[k]) if t] for k in flat}
  out_spec = P()
  fn = jax.shard_map(local, mesh=mesh, in_specs=(specs, P(), P(), P()),
                     out_specs=(out_spec, grad_specs), axis_names=frozenset({"stage"}),
                     check_vma=False)
  outs, grads = fn(leaves, micro, rows, rng)
  if inverse is not None:
    grads = {k: permute(grads[k], [l for l, t in zip(layered[k], trainable[k]) if t], inverse)
             for k in grads}
  return outs, grads
