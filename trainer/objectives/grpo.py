"""grpo: online RL with group-relative advantages (GRPO, and the Dr. GRPO, DAPO and GSPO
variants: `rl.*`), its rollouts drawn each step by the project's own KV-cache sampler.

Each train step's batch is made by `rollout`: the next prompts of the prompt stream (the chats
of `rl.prompts`, their last assistant message the expected answer; a new permutation each epoch,
fixed by train.seed, so the step number alone says where a resumed run is), `rl.group_size`
completions of each sampled with the current policy on the training mesh (trainer/generate.py;
it records each token's log-prob, which equals the training forward's), each completion scored
by `rl.reward`, the rewards turned into group-relative advantages (DAPO's dynamic sampling: groups
whose replies all scored the same are set aside and more prompts drawn, up to `rl.max_draws`
draws, until the step is full of groups with a signal), and each prompt's group laid
out in one row: the prompt once, the completions as branches that see it and not each other
(trainer/data/pairs.py `Group`). `loss` runs the policy, and with `rl.beta` the frozen
reference, over those rows and applies trainer/rl/losses.py `GrpoLoss`.

Evaluation batches are the held-out chats as SFT rows: their loss is the policy's NLL of the
reference replies, and `train.eval_exact_match` scores greedy replies.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from trainer import generate, losses as token_losses
from trainer.data import pairs, templates
from trainer.errors import UserError
from trainer.objectives.base import Bound, Objective
from trainer.objectives.lm import LM
from trainer.rl import losses
from trainer.seeds import fold_seed

REWARDS = ("exact",)  # or "module:function"


def exact_answer(prompt: list[dict], completion: str, answer: str) -> float:
  """1.0 when the completion, surrounding whitespace aside, is the expected answer, else 0."""
  del prompt
  return float(completion.strip() == answer.strip())


def reward_function(name: str) -> Callable[[list[dict], str, str], float]:
  """`exact`, or `module:function` importable from the working directory: f(prompt messages,
  completion text, expected answer) -> float."""
  if name == "exact":
    return exact_answer
  module, _, attr = name.partition(":")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError, ValueError) as e:
    raise UserError(f"config key rl.reward: cannot load {name!r} ({e}); use exact or "
                    "module:function") from None
  return fn


def turn_suffix(template, tokenizer, stop: int) -> list[int]:
  """The tokens the chat template writes after an assistant turn's end-of-turn token (chatml:
  a newline), which a reply sampled up to its stop token lacks."""
  ids, _ = templates.encode_chat(template, tokenizer, [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": "y"}])
  at = np.flatnonzero(np.asarray(ids) == stop)
  return [] if not len(at) else [int(t) for t in ids[at[-1] + 1:]]


def at_completions(x, gather):
  """`x` (rows, positions, ...) at each completion's gathered positions (`gather`: rows,
  completions per row, L; as `GRPO.layout` makes it): (rows x completions, L, ...)."""
  b, c, L = gather.shape
  index = gather.reshape(b, c * L, *([1] * (x.ndim - 2)))
  return jnp.take_along_axis(x, index, axis=1).reshape(b * c, L, *x.shape[2:])


def read_prompts(path: str) -> list[tuple[list[dict], str]]:
  """(the messages before the last, the last one's content) of each chat of a jsonl file; a bad
  line is one error naming file:line."""
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        messages = json.loads(line)["messages"]
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
          raise ValueError("the last message must be the assistant's expected answer")
        out.append((messages[:-1], str(messages[-1]["content"])))
      except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path}:{n}: not a chat with an expected answer ({e})") from None
  if not out:
    raise UserError(f"config key rl.prompts: {path} holds no chats")
  return out


@dataclasses.dataclass
class GRPO(Objective):
  """See the module docstring; the fields are the `rl` section of the config."""
  name = "grpo"
  online = True
  prompts_path: str = ""
  group: int = 4
  groups_per_row: int = 1
  max_new_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  reward: str = "exact"
  scale_rewards: str = "group"
  dynamic_sampling: bool = False
  max_draws: int = 1  # DAPO: draws of prompts per step to fill the batch with signal
  overlong_buffer: int = 0
  overlong_factor: float = 1.0
  length_penalty: float = 0.0
  loss_fn: losses.GrpoLoss = dataclasses.field(default_factory=losses.GrpoLoss)
  iterations: int = 1  # train steps per rollout
  finished_turns = False  # rollout rows end a stopped reply as the template ends a turn
  seed: int = 0
  row_len: int = 0  # train.seq_len
  # set by `prepare`: the prompts, tokenizer, stop token, reward function, rows per step
  state: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_config(cls, cfg) -> "GRPO":
    r = cfg.rl
    return cls(r.prompts or cfg.data.train_files, r.group_size, r.groups_per_row,
               r.max_new_tokens, r.temperature, r.top_k, r.top_p, r.reward, r.scale_rewards,
               r.dynamic_sampling, r.max_draws, r.overlong_buffer, r.overlong_factor,
               r.length_penalty,
               losses.GrpoLoss(r.loss_type, r.level, r.eps_low, r.eps_high, r.beta,
                               r.max_new_tokens),
               r.iterations, fold_seed(cfg.train.seed), cfg.train.seq_len)

  @staticmethod
  def fields_of(cfg) -> dict:
    """GRPO's fields from the config: what objectives built on its rollouts start from."""
    base = GRPO.from_config(cfg)
    return {f.name: getattr(base, f.name) for f in dataclasses.fields(GRPO)}

  @classmethod
  def problems(cls, cfg) -> list[tuple[str, str]]:
    r, out = cfg.rl, []
    if cfg.data.format != "chat":
      out.append(("data.format", "train.objective=grpo samples replies to chats: set "
                  "data.format=chat (its held-out chats are evaluated)"))
    prompts = r.prompts or cfg.data.train_files
    if not prompts or "," in prompts or not os.path.isfile(prompts):
      out.append(("rl.prompts", f"{prompts!r} is not one jsonl file of chats (the last message "
                  "of each the expected answer)"))
    if r.group_size < 2:
      out.append(("rl.group_size", f"{r.group_size}: group-relative advantages need >= 2"))
    for key, allowed in (("loss_type", losses.LOSS_TYPES), ("level", losses.LEVELS),
                         ("scale_rewards", losses.SCALES)):
      if r[key] not in allowed:
        out.append((f"rl.{key}", f"{r[key]!r} is not one of {', '.join(allowed)}"))
    if r.reward != "exact" and ":" not in r.reward:
      out.append(("rl.reward", f"{r.reward!r} is not exact or module:function"))
    if r.max_new_tokens < 1 or r.groups_per_row < 1:
      out.append(("rl.max_new_tokens", "rl.max_new_tokens and rl.groups_per_row must be >= 1"))
    if r.max_draws < 1:
      out.append(("rl.max_draws", f"{r.max_draws}: at least the step's own draw"))
    if r.iterations < 1:
      out.append(("rl.iterations", f"{r.iterations}: each rollout feeds at least one step"))
    if r.overlong_buffer >= r.max_new_tokens:
      out.append(("rl.overlong_buffer", f"{r.overlong_buffer} must be below rl.max_new_tokens"))
    if r.temperature <= 0:
      out.append(("rl.temperature", "must be > 0: a group of greedy replies is one reply"))
    if cfg.mesh.stage > 1:
      out.append(("mesh.stage", "train.objective=grpo is not pipelined yet; use mesh.stage=1"))
    if cfg.train.grad_accum != 1:
      out.append(("train.grad_accum", "train.objective=grpo normalises over the whole rollout "
                  "batch; use 1"))
    return out

  @property
  def needs_reference(self) -> bool:
    """The KL to the reference (`rl.beta`) needs its log-probs in every step."""
    return bool(self.loss_fn.beta)

  # -- rollouts -------------------------------------------------------------------------------

  def prepare(self, run) -> None:
    if jax.process_count() > 1:
      raise UserError(f"config key train.objective: {self.name} samples in one process for "
                      "now; run it with one process")
    d = run.data
    chats = read_prompts(self.prompts_path)
    ids = [templates.encode_chat(d.template, d.tokenizer, msgs, add_generation_prompt=True)[0]
           for msgs, _ in chats]
    seq_len = next(iter(run.models.values())).handle.cfg.max_seq_len
    stop = d.template.stop_id(d.tokenizer)
    suffix = turn_suffix(d.template, d.tokenizer, stop) if self.finished_turns else []
    row, longest = self.row_len, max(len(i) for i in ids)
    need = longest + self.group * (self.max_new_tokens + 1 + len(suffix))
    if need * self.groups_per_row > row:
      raise UserError(f"config key train.seq_len: a row of {row} tokens cannot hold "
                      f"{self.groups_per_row} group(s) of the longest prompt ({longest} "
                      f"tokens) and {self.group} replies of rl.max_new_tokens="
                      f"{self.max_new_tokens}; raise train.seq_len to "
                      f"{need * self.groups_per_row} or lower rl.max_new_tokens")
    if longest + self.max_new_tokens > seq_len:
      raise UserError(f"config key rl.max_new_tokens: the longest prompt and "
                      f"{self.max_new_tokens} new tokens exceed model.max_seq_len={seq_len}")
    self.state.update(chats=chats, ids=[i.tolist() for i in ids], tokenizer=d.tokenizer,
                      stop=stop, suffix=suffix, score=reward_function(self.reward),
                      rows=run.batch_size, log=run.log)
    run.log(f"{self.name}: {len(chats)} prompts from {self.prompts_path}; "
            f"{self.prompts_per_step} per step x {self.group} replies of <= "
            f"{self.max_new_tokens} tokens")

  @property
  def prompts_per_step(self) -> int:
    return self.state["rows"] * self.groups_per_row

  def stream(self, step: int) -> list[int]:
    """The prompts of train step `step` (from 1): a permutation of all of them per epoch."""
    n, k = len(self.state["ids"]), self.prompts_per_step
    orders, out = {}, []
    for pos in range((step - 1) * k, step * k):
      epoch, at = divmod(pos, n)
      if epoch not in orders:  # a step's prompts span at most a few epochs
        orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
      out.append(int(orders[epoch][at]))
    return out

  def draw(self, step: int, draw: int) -> list[int]:
    """The prompts of draw `draw` of step `step`: draw 0 is the prompt stream's; DAPO's re-draws
    (`rl.max_draws`) pick prompts at random, fixed by (seed, step, draw), so that the step number
    alone still says where a resumed run is."""
    if draw == 0:
      return self.stream(step)
    n, k = len(self.state["ids"]), self.prompts_per_step
    rng = np.random.default_rng([self.seed, step, draw])
    return [int(i) for i in rng.choice(n, k, replace=k > n)]

  def sample(self, policy: Bound, step: int, compute_dtype, draw: int = 0):
    """Step `step`'s prompts (indices; `draw` > 0: a re-draw's), `rl.group_size` sampled
    completions of each (token ids, stop token kept) with their recorded log-probs, each
    completion's `rl.reward` score and its length."""
    s, G = self.state, self.group
    chosen = self.draw(step, draw)
    prompts = [s["ids"][i] for i in chosen for _ in range(G)]
    seed = self.seed * 1_000_003 + step
    outs, logps = generate.generate(
        policy.handle, policy.params, prompts, self.max_new_tokens, temperature=self.temperature,
        top_k=self.top_k, top_p=self.top_p, stop_ids=[s["stop"]],
        seed=fold_seed(seed if draw == 0 else seed * 7919 + draw), compute_dtype=compute_dtype,
        with_logps=True, keep_stop=True)
    scores, lengths = np.zeros(len(outs), np.float32), np.zeros(len(outs), np.float32)
    for j, out in enumerate(outs):
      messages, answer = s["chats"][chosen[j // G]]
      text = s["tokenizer"].decode([t for t in out if t != s["stop"]])
      scores[j] = float(s["score"](messages, text, answer))
      lengths[j] = len(out)
    return chosen, outs, logps, scores, lengths

  def layout(self, chosen: list[int], outs, logps, tails=None) -> dict[str, np.ndarray]:
    """The rows of a rollout: each prompt's group in one row (`rl.groups_per_row` per row), and
    per completion c of a row: `gather` (rows, c, L) the positions whose targets are its tokens,
    `gather_mask` 1 on its tokens, `old_logps` their recorded log-probs and `last` (rows, c) the
    position whose input is its last token (where a score head reads it). `tails`: tokens to
    follow each completion in its row, not gathered (what the chat template writes after the
    end of turn, so that a reward model reads a finished turn as it learnt it); `last` is then
    the tail's last token."""
    tails = tails or [[] for _ in outs]
    s, G, L = self.state, self.group, self.max_new_tokens
    rows, k = s["rows"], self.groups_per_row
    batch = {f: [] for f in pairs.FIELDS}
    extra = {"gather": np.zeros((rows, k * G, L), np.int32),
             "gather_mask": np.zeros((rows, k * G, L), np.float32),
             "old_logps": np.zeros((rows, k * G, L), np.float32),
             "last": np.zeros((rows, k * G), np.int32)}
    for r in range(rows):
      groups, at = [], 0
      for g in range(r * k, (r + 1) * k):
        done = [np.asarray(list(o) + list(t), np.int32)
                for o, t in zip(outs[g * G:(g + 1) * G], tails[g * G:(g + 1) * G])]
        groups.append(pairs.Group(np.asarray(s["ids"][chosen[g]]), done,
                                  [np.ones(len(o)) for o in done]))
      pieces = np.array([[i, 0, len(grp)] for i, grp in enumerate(groups)])
      row = pairs.assemble(pieces, groups, None, self.row_len)
      for f in pairs.FIELDS:
        batch[f].append(row[f])
      for gi, grp in enumerate(groups):
        g = r * k + gi
        for i in range(G):
          c, n = gi * G + i, len(outs[g * G + i])
          start = at + grp.first[i + 2]
          extra["gather"][r, c, :n] = np.arange(start, start + n)
          extra["gather_mask"][r, c, :n] = 1.0
          extra["old_logps"][r, c, :n] = logps[g * G + i]
          extra["last"][r, c] = start + n + len(tails[g * G + i])
        at += len(grp.inputs)
    return {**{f: np.stack(v) for f, v in batch.items()}, **extra}

  def rollout(self, models: dict[str, Bound], step: int, compute_dtype,
              previous: dict | None = None) -> tuple[dict, dict]:
    """(the host batch of step `step`, its rollout metrics). `previous`: the last rollout's
    batch (unused here: GRPO keeps no state between rollouts)."""
    del previous
    G, k = self.group, self.prompts_per_step
    draws = [self.scored(models["policy"], step, compute_dtype, 0)]
    while (self.dynamic_sampling and len(draws) < self.max_draws
           and sum(int(d["keep"].sum()) for d in draws) < k):
      draws.append(self.scored(models["policy"], step, compute_dtype, len(draws)))
    # DAPO: the groups that carry a signal first, in draw order, then set-aside ones to fill
    # the batch, out of the loss
    order = [(i, g) for i, d in enumerate(draws) for g in np.flatnonzero(d["keep"])]
    order += [(i, g) for i, d in enumerate(draws) for g in np.flatnonzero(~d["keep"])]
    order = order[:k]
    pick = lambda f: [draws[i][f][g] for i, g in order]
    each = lambda f: np.concatenate([draws[i][f][g * G:(g + 1) * G] for i, g in order])
    keep = np.array(pick("keep"))
    outs = [draws[i]["outs"][g * G + j] for i, g in order for j in range(G)]
    logps = [draws[i]["logps"][g * G + j] for i, g in order for j in range(G)]
    host = self.layout(pick("chosen"), outs, logps)
    rows = host["gather"].shape[0]
    host["advantages"] = each("advantages").reshape(rows, -1)
    host["gather_mask"] *= np.repeat(keep, G).astype(np.float32).reshape(rows, -1, 1)
    first = draws[0]  # the reward and accuracy of the step's own prompts, as without re-draws
    metrics = {"reward": float(first["rewards"].mean()), "accuracy": float(first["hits"].mean()),
               "response_length": float(each("lengths").mean()),
               "groups_kept": float(keep.mean()), "draws": float(len(draws))}
    return host, metrics

  def scored(self, policy: Bound, step: int, compute_dtype, draw: int) -> dict:
    """One draw of step `step`: its samples, shaped rewards (length and overlong penalties),
    group advantages and which groups carry a signal (all, without `rl.dynamic_sampling`)."""
    G, L = self.group, self.max_new_tokens
    chosen, outs, logps, hits, lengths = self.sample(policy, step, compute_dtype, draw)
    rewards = hits - self.length_penalty * lengths / L
    if self.overlong_buffer:
      rewards += np.asarray(losses.overlong_penalty(jnp.asarray(lengths), L, self.overlong_buffer,
                                                    self.overlong_factor))
    adv = np.asarray(losses.group_advantages(jnp.asarray(rewards), G, self.scale_rewards))
    keep = np.ones(len(chosen), bool)
    if self.dynamic_sampling:
      keep = np.asarray(losses.nonzero_variance_groups(jnp.asarray(rewards), G))
    return dict(chosen=chosen, outs=outs, logps=logps, hits=hits, rewards=rewards,
                lengths=lengths, advantages=adv, keep=keep)

  def batch_shapes(self, rows: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each column of a rollout batch of `rows` rows."""
    c, L = self.groups_per_row * self.group, self.max_new_tokens
    out = {f: ((rows, self.row_len), np.float32 if f == "weights" else np.int32)
           for f in pairs.FIELDS}
    out.update(gather=((rows, c, L), np.int32), gather_mask=((rows, c, L), np.float32),
               old_logps=((rows, c, L), np.float32), last=((rows, c), np.int32),
               advantages=((rows, c), np.float32))
    return out

  # -- loss -----------------------------------------------------------------------------------

  def token_logps(self, bound: Bound, batch):
    """(each row position's target log-prob at the sampling temperature, the logits so
    scaled)."""
    model, hidden = bound.forward(batch, shared_prompt=self.group)
    logits = model.logits(hidden) / self.temperature
    return -token_losses.token_nll(logits, batch["targets"]), logits

  def loss(self, models, batch):
    if "gather" not in batch:  # evaluation: the NLL of the held-out replies
      return LM().loss(models, batch)
    lp_bt, logits = self.token_logps(models["policy"], batch)
    b, c, L = batch["gather"].shape
    take = lambda x: at_completions(x, batch["gather"])
    mask = batch["gather_mask"].reshape(b * c, L)
    ref = None
    if self.loss_fn.beta:
      ref_lp = self.token_logps(self.reference(models), batch)[0]
      ref = take(jax.lax.stop_gradient(ref_lp))
    loss_sum, count, sums = self.loss_fn.sums(take(lp_bt), batch["old_logps"].reshape(b * c, L),
                                              batch["advantages"].reshape(-1), mask, ref)
    # metrics as count x their mean (the step divides every aux sum by the count)
    ent = take(losses.entropy(logits))
    aux = {k: count * v / jnp.maximum(n, 1.0) for k, (v, n) in sums.items()}
    aux["entropy"] = count * losses.masked_mean(ent, mask)
    return loss_sum, count, aux
