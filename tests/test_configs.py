"""Every recipe loads, resolves to a valid ModelConfig, and real-size ones have the right shape
(checked with eval_shape only: nothing is allocated)."""

import dataclasses
import glob
import importlib.util
import os

import jax
import pytest

from configs import base
from models import ModelConfig
from models.config import EXECUTION_FIELDS
from models import handle as handles
from trainer.validate import check_config, model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location("recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def test_base_model_keys_are_exactly_model_config_fields():
  """Every ModelConfig field has a default in configs/base.py, plus the Execution's (how the
  model runs, kept under model. for users) and `init_from` (where weights come from, not part
  of the shape)."""
  assert set(base.get_config().model.keys()) == \
      {f.name for f in dataclasses.fields(ModelConfig)} | set(EXECUTION_FIELDS) | {"init_from"}


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_validates(path, tmp_path):
  cfg = load(path)
  if cfg.model.init_from:  # a recipe that starts from a folder: a tiny Llama one stands in
    import hf_models
    hf_models.make("llama", str(tmp_path / "hf"))
    cfg.model.init_from = f"hf:{tmp_path / 'hf'}"
  check_config(cfg)


@pytest.mark.parametrize("arg,expected_billions", [(None, 8.03), ("3.1", 8.03)])
def test_llama3_8b_shape_by_eval_shape(arg, expected_billions):
  cfg = load(os.path.join(REPO, "configs", "llama3_8b.py"), arg)
  mcfg = model_config(cfg, vocab_size=0)
  shapes = handles.model_handle(mcfg).abstract_params()
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert round(n / 1e9, 2) == expected_billions
  assert n == mcfg.num_params()
  assert shapes["layers"]["attn"]["k"].shape == (32, 4096, 8, 128)
  assert shapes["layers"]["mlp"]["gate"].shape == (32, 4096, 14336)
  if arg == "3.1":
    assert mcfg.rope_scaling == "llama3" and mcfg.rope_factor == 8.0


@pytest.mark.parametrize("name,expected_billions", [("mistral_7b", 7.24), ("qwen2_7b", 7.62)])
def test_other_families_by_eval_shape(name, expected_billions):
  mcfg = model_config(load(os.path.join(REPO, "configs", f"{name}.py")), vocab_size=0)
  n = sum(x.size for x in jax.tree.leaves(handles.model_handle(mcfg).abstract_params()))
  assert round(n / 1e9, 2) == expected_billions


def test_readme_config_reference_is_complete_and_current():
  from trainer import config_reference as reference
  assert reference.missing() == []  # every key of base.py explains itself in a comment
  with open(reference.README) as f:
    block = reference.readme_block(f.read())
  assert block == reference.markdown(), "stale: run python -m trainer.config_reference --write"
  rows = [line.split("|") for line in block.splitlines() if line.startswith("| `")]
  documented = {r[1].strip().strip("`") for r in rows}
  wanted = {f"{s}.{k}" for s, values in base.get_config().items() for k in values}
  assert documented == wanted
  assert all(r[3].strip() for r in rows)  # a meaning in every row
