"""Hugging Face interop against transformers itself (torch CPU): every family's logits, export
and reload, and the loss after training."""

import numpy as np
import pytest
import torch
import transformers

import hf_models
from models import hf
from trainer import state as state_lib


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


TOKENS = np.random.default_rng(0).integers(0, 97, (2, 19))


@pytest.mark.parametrize("family", list(hf_models.FAMILIES))
def test_import_matches_transformers_and_export_reloads(family, tmp_path):
  model = hf_models.make(family, str(tmp_path / "hf"))
  cfg, params = hf.load(str(tmp_path / "hf"))
  ours = np.asarray(state_lib.model_handle(cfg).bind(params)(TOKENS))
  want = hf_logits(model, TOKENS)
  assert np.abs(ours - want).max() <= 1e-4, np.abs(ours - want).max()

  # The features that set the family apart change the logits: the test could see them wrong.
  features = {"mistral": dict(sliding_window=0), "gemma2": dict(attn_softcap=0.0),
              "llama3.1": dict(rope_scaling="none"), "qwen2": dict(qkv_bias=False),
              "gemma": dict(embed_scale=False)}.get(family)
  if features:
    plain_cfg, plain = hf.load(str(tmp_path / "hf"), **features)
    without = np.asarray(state_lib.model_handle(plain_cfg).bind(plain)(TOKENS))
    assert np.abs(without - want).max() > 1e-2, features

  hf.save(str(tmp_path / "out"), cfg, params, max_shard_bytes=20_000)  # several shards
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "out"), attn_implementation="eager").eval()
  again = hf_logits(reloaded, TOKENS)
  assert np.abs(again - want).max() <= 1e-4, np.abs(again - want).max()


def test_unsupported_architecture_is_one_line(tmp_path):
  with pytest.raises(hf.UnsupportedModel, match="architectures=\\['GPT2LMHeadModel'\\]"):
    hf.config_from_hf({"architectures": ["GPT2LMHeadModel"]})
