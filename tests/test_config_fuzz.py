"""Mutated configs fail only with a one-line UserError (hypothesis): any other exception would
reach the user as a traceback. A config the checks accept builds its plan and traces its step."""

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings

import parallel
import small_run
from trainer import train
from trainer.errors import UserError
from trainer.seeds import fold_seed
from trainer.validate import check_backend, check_config, check_mesh, model_config

WORDS = ["", "none", "lora", "prompt", "lisa", "xla", "pallas", "ring", "cudnn", "lm", "sft",
         "dpo", "reward", "ipo", "orpo", "text", "chat", "preference", "files", "stdlib",
         "float16", "bfloat16", "float32", "fsdp", "zero2", "fsdp_tp_sp", "greedy", "concat",
         "none", "drop", "cosine", "chatml", "gemma", "nf4", "pissa", "sequence", "full", "dots",
         "llama3", "linear", "all-linear", "q_proj|v_proj", "[", "gemma2", "mlp=tensor", "x=y"]


def _leaves(cfg, prefix=""):
  for key, value in cfg.items():
    if hasattr(value, "items"):
      yield from _leaves(value, prefix + key + ".")
    else:
      yield prefix + key, value


DEFAULTS = dict(_leaves(small_run.config()))


def _value_for(key):
  """A value of the key's own type (what --config.KEY=VALUE can produce), often a bad one."""
  default = DEFAULTS[key]
  if isinstance(default, bool):
    return st.booleans()
  if isinstance(default, int):
    return st.one_of(st.integers(-3, 3), st.integers(-10**6, 10**7),
                     st.sampled_from([0, 1, 7, 64, 65536]))
  if isinstance(default, float):
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([0.0, -1.0, 0.5, 1.0, 1e9]))
  if isinstance(default, str):
    return st.one_of(st.sampled_from(WORDS), st.text(max_size=8))
  if isinstance(default, tuple):
    return st.lists(st.integers(-2, 40), max_size=4).map(tuple)
  return st.just(default)


MUTATION = st.sampled_from(sorted(DEFAULTS)).flatmap(
    lambda key: st.tuples(st.just(key), _value_for(key)))


@given(st.lists(MUTATION, min_size=1, max_size=4))
@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_mutated_configs_raise_only_user_errors(mutations):
  try:
    check_config(mutate(mutations))
  except UserError:
    pass


def mutate(mutations):
  cfg = small_run.config()
  for key, value in mutations:
    *path, last = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    node[last] = value
  return cfg


# Values a user can type that must each be one line naming the key (the table in validate.py and
# the mesh rules); the message is checked, not just the exception's type.
BAD_VALUES = [
    ("train.lr", float("inf"), "train.lr: must be a finite number, got inf"),
    ("train.lr", float("nan"), "train.lr: must be a finite number"),
    ("train.lr", 0.0, "train.lr: must be positive"),
    ("model.rope_theta", 0.0, "model.rope_theta: must be positive"),
    ("model.rope_theta", -1e4, "model.rope_theta: must be positive"),
    ("model.norm_eps", 0.0, "model.norm_eps: must be positive"),
    ("model.norm_eps", float("-inf"), "model.norm_eps: must be a finite number"),
    ("train.b2", 1.0, "train.b2: must be in [0, 1), got 1.0"),
    ("train.b2", -0.1, "train.b2: must be in [0, 1)"),
    ("train.b1", float("nan"), "train.b1: must be a finite number"),
    ("train.eps", -1e-8, "train.eps: must be >= 0"),
    ("train.sample_temperature", -1.0, "train.sample_temperature: must be >= 0"),
    ("train.clip_norm", float("inf"), "train.clip_norm: must be a finite number"),
    ("train.min_lr_ratio", 1.5, "train.min_lr_ratio: must be in [0, 1]"),
    ("model.init_std", -0.02, "model.init_std: must be >= 0"),
    ("model.rope_factor", 0.0, "model.rope_factor: must be positive"),
    ("peft.alpha", float("inf"), "peft.alpha: must be a finite number"),
    ("data.eval_percent", 100.0, "data.eval_percent: must be in (0, 100)"),
    ("data.num_threads", 0, "data.num_threads: must be positive"),
    ("mesh.rules", "mlp=nosuchaxis", "mesh.rules: 'mlp=nosuchaxis' names mesh axis 'nosuchaxis'"),
    ("mesh.rules", "batch=data+tensr", "names mesh axis 'tensr'"),
    ("mesh.rules", "embedding=fsdp", "mesh.rules: 'embedding=fsdp' is not NAME=AXIS"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES)
def test_bad_values_are_one_line_naming_the_key(key, value, message):
  with pytest.raises(UserError) as e:
    check_config(mutate([(key, value)]))
  assert str(e.value) == " ".join(str(e.value).split()) and "\n" not in str(e.value)
  assert str(e.value).startswith(f"config key {key}:") and message in str(e.value), str(e.value)


@pytest.mark.parametrize("seed", [0, -1, 2**32, 2**63 + 5, -(10**30)])
def test_any_int_seed_is_accepted_and_folded(seed):
  check_config(mutate([("train.seed", seed)]))
  folded = fold_seed(seed)
  assert 0 <= folded < 2**32 and folded == seed % 2**32
  np.random.default_rng([folded, 0])  # what the data pipeline seeds with
  jax.random.PRNGKey(folded + 7)  # the largest offset trainer.state adds


# Past the checks: a config that check_config accepts must also build its plan (model, PEFT,
# optimizer, shardings over 8 devices) and trace its train step, or fail with a UserError.
STEP_KEYS = sorted(k for k in DEFAULTS if not k.startswith("data.") or k in (
    "data.format", "data.template", "data.packing"))
STEP_MUTATION = st.sampled_from(STEP_KEYS).flatmap(lambda key: st.tuples(st.just(key), _value_for(key)))


@given(st.lists(STEP_MUTATION, min_size=1, max_size=2))
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_accepted_configs_build_and_trace_their_train_step(mutations):
  cfg = mutate(mutations)
  try:
    check_config(cfg)
  except UserError:
    assume(False)
  cfg.train.steps = min(cfg.train.steps, 1000)  # (only the schedule's length; keeps it cheap)
  try:
    check_backend(cfg, "cpu")
    mesh_sizes = check_mesh(cfg, jax.device_count())
    mcfg = model_config(cfg, vocab_size=512)
    assume(mcfg.vocab_size >= 512)  # the run refuses a vocabulary smaller than the tokenizer's
    mesh = parallel.make_mesh(mesh_sizes)
    pl = train.plan(cfg, mcfg, mesh)
  except UserError as e:
    event(f"refused: {str(e).split(':')[0]}")
    return
  with parallel.activate(mesh, pl.rules):
    pl.train_step.trace(pl.abstract_state, train.abstract_batch(cfg, pl.batch_sharding))
  event("traced")
