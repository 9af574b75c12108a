"""Mutated configs fail only with a one-line UserError (hypothesis): any other exception would
reach the user as a traceback."""

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

import small_run
from trainer.errors import UserError
from trainer.validate import check_config

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
  cfg = small_run.config()
  for key, value in mutations:
    *path, last = key.split(".")
    node = cfg
    for part in path:
      node = node[part]
    node[last] = value
  try:
    check_config(cfg)
  except UserError:
    pass
