"""Virtual-token methods (prompt tuning, P-tuning, prefix tuning) against Hugging Face PEFT with
identical weights, PEFT's file format, packed rows against unpacked ones, KV-cache decoding
against full recomputation, and training end to end."""

import json

import jax
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers

import hf_models
import small_run
from models import hf
from models.peft import Peft, hf_format
from test_generate import naive_greedy
from test_peft import TOKENS, logits_of, peft_section, pretrained  # noqa: F401 (a fixture)
from models import handle as handles

N = 5
CASES = {  # name: (HF PEFT config, our peft config section)
    "prompt": (lambda: hf_peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
               dict(method="prompt", num_virtual_tokens=N)),
    "ptuning_mlp": (lambda: hf_peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=24),
        dict(method="ptuning", num_virtual_tokens=N, encoder_hidden=24)),
    "ptuning_lstm": (lambda: hf_peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=24,
        encoder_reparameterization_type="LSTM"),
        dict(method="ptuning", num_virtual_tokens=N, encoder_hidden=24, ptuning_encoder="lstm")),
    "prefix": (lambda: hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
               dict(method="prefix", num_virtual_tokens=N)),
    "prefix_projection": (lambda: hf_peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True,
        encoder_hidden_size=24), dict(method="prefix", num_virtual_tokens=N,
                                      prefix_projection=True, encoder_hidden=24)),
}


def from_torch(encoder, peft: Peft) -> dict:
  """Our adapter tree from PEFT's prompt encoder module (its parameters, transposed)."""
  t = {n: p.detach().float().numpy() for n, p in encoder.named_parameters()}
  p = peft.prompt
  if p.method == "prefix" and not p.projection:
    c = peft.mcfg
    return {"kv": t["embedding.weight"].reshape(N, c.n_layers, 2, c.n_kv_heads, c.head_dim)
            .transpose(1, 2, 0, 3, 4)}
  out = {"embedding": t["embedding.weight"]}
  linear = lambda ours, theirs: {ours: t[theirs + ".weight"].T, ours + "_bias": t[theirs + ".bias"]}
  if p.method == "prefix":
    return {**out, **linear("w1", "transform.0"), **linear("w2", "transform.2")}
  if p.method == "ptuning" and p.encoder == "mlp":
    return {**out, **linear("w1", "mlp_head.0"), **linear("w2", "mlp_head.2"),
            **linear("w3", "mlp_head.4")}
  if p.method == "ptuning":
    for layer in range(2):
      for ours, suffix in (("fwd", ""), ("bwd", "_reverse")):
        at, th = f"lstm{layer}_{ours}_", f"lstm_head.{{}}_l{layer}{suffix}"
        out[at + "wi"] = t[th.format("weight_ih")].T
        out[at + "wh"] = t[th.format("weight_hh")].T
        out[at + "b"] = t[th.format("bias_ih")] + t[th.format("bias_hh")]
    return {**out, **linear("head1", "mlp_head.0"), **linear("head2", "mlp_head.2")}
  return out


def theirs_and_ours(case, folder):
  """HF PEFT's model for `case` (PEFT's random initialisation) on the tiny Llama in
  `folder`/base, and ours with its weights: (model, cfg, params, peft, their logits, ours)."""
  hf_config, ours = CASES[case]
  hf_models.make("llama", f"{folder}/base")
  base_model = transformers.AutoModelForCausalLM.from_pretrained(f"{folder}/base",
                                                                 attn_implementation="eager")
  torch.manual_seed(0)
  model = hf_peft.get_peft_model(base_model, hf_config()).eval()
  want = logits_of(model)[:, -TOKENS.shape[1]:]  # prompt tuning returns the virtual rows too
  cfg, params = hf.load(f"{folder}/base")
  peft = Peft.from_config(peft_section(**ours), cfg)
  params = {**params, "peft": {"prompt": from_torch(model.prompt_encoder["default"], peft)}}
  got = np.asarray(handles.model_handle(cfg, peft).bind(params)(TOKENS))
  return model, cfg, params, peft, want, got


@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_hf_peft_and_the_export_loads_there(case, tmp_path):
  model, cfg, params, peft, want, got = theirs_and_ours(case, str(tmp_path))
  without = np.asarray(handles.model_handle(cfg).bind(
      {k: v for k, v in params.items() if k != "peft"})(TOKENS))
  assert np.abs(got - without).max() > 0.1  # the virtual tokens matter in this comparison
  assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()

  hf_format.write(str(tmp_path / "ours"), peft, params)
  fresh = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"),
                                                            attn_implementation="eager")
  reloaded = hf_peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours")).eval()
  assert np.abs(logits_of(reloaded)[:, -TOKENS.shape[1]:] - got).max() <= 1e-4
  if case in ("prompt", "prefix"):  # what PEFT saved reads back into our tree
    model.save_pretrained(str(tmp_path / "theirs"))
    back = hf_format.read(str(tmp_path / "theirs"), peft)
    np.testing.assert_allclose(back["prompt"][next(iter(back["prompt"]))],
                               params["peft"]["prompt"][next(iter(back["prompt"]))], atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_reach_every_document_of_a_packed_row(tmp_path, impl, method):
  """A row packing two documents gives each the logits it has alone: the virtual tokens are seen
  by both, and each document's positions count from n again."""
  from models.config import Execution
  hf_models.make("llama", str(tmp_path / "base"))
  cfg, base = hf.load(str(tmp_path / "base"))
  peft = Peft.from_config(peft_section(method=method, num_virtual_tokens=3), cfg)
  handle = handles.model_handle(cfg, peft, Execution(attention_impl=impl))
  params = handles.init_params(handle, seed=0, base=base)
  model = handle.bind(params)
  a, b = TOKENS[0, :9], TOKENS[1, :6]
  packed = np.concatenate([a, b])[None]
  positions = np.concatenate([np.arange(9), np.arange(6)])[None]
  segments = np.concatenate([np.full(9, 1), np.full(6, 2)])[None]
  got = np.asarray(model.logits(model.hidden(packed, positions, segments)))[0]
  alone = [np.asarray(model(x[None]))[0] for x in (a, b)]
  np.testing.assert_allclose(got, np.concatenate(alone), atol=2e-5)


@pytest.mark.parametrize("method", ["ptuning", "prefix"])
def test_decoding_with_virtual_tokens_equals_full_recomputation(tmp_path, method):
  from trainer import generate as gen
  hf_models.make("llama", str(tmp_path / "base"))
  cfg, base = hf.load(str(tmp_path / "base"))
  peft = Peft.from_config(peft_section(method=method, num_virtual_tokens=4), cfg)
  handle = handles.model_handle(cfg, peft)
  params = handles.init_params(handle, seed=0, base=base)
  model = handle.bind(params)
  prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6]]
  assert gen.generate(handle, params, prompts, 6) == naive_greedy(model, prompts, 6, width=16)


def run(pretrained, name, section, lr, steps, impl="xla"):
  """A run on the narrow dataset from the pretrained base: (final state, held-out loss)."""
  from trainer import train
  c = small_run.config(steps=steps, eval_every=0, checkpoint_every=0, sample_tokens=0,
                       log_every=1, lr=lr, warmup_steps=2)
  c.model.init_from = f"hf:{pretrained / 'base'}"
  c.model.attention_impl = impl
  c.data.update(source="files", train_files=str(pretrained / "narrow.jsonl"), format="text")
  c.peft.update(**section)
  out = train.run(c, str(pretrained / name))
  with open(pretrained / name / "metrics.jsonl") as f:
    evals = [json.loads(l)["eval_loss"] for l in f if '"eval_loss"' in l]
  return out["state"], evals[-1]


@pytest.mark.parametrize("name,section,lr,impl", [
    ("prompt", dict(method="prompt", num_virtual_tokens=8), 3e-2, "xla"),
    pytest.param("ptuning_lstm", dict(method="ptuning", ptuning_encoder="lstm",
                                      num_virtual_tokens=8, encoder_hidden=32), 3e-3, "xla",
                 marks=pytest.mark.slow),  # end-to-end: .ci/run runs the slow cases
    pytest.param("prefix", dict(method="prefix", num_virtual_tokens=8), 3e-2, "pallas",
                 marks=pytest.mark.slow),
])
def test_virtual_tokens_train_and_lower_the_held_out_loss(pretrained, name, section, lr, impl):
  """30 steps lower the held-out loss below that of the same untrained virtual tokens (one step
  at a learning rate of 1e-12; per-step training losses are too noisy at this size), and only the
  virtual tokens' parameters change and carry optimizer moments."""
  from models import peft as peft_lib
  _, untrained = run(pretrained, name + "_untrained", section, 1e-12, 1, impl)
  state, trained = run(pretrained, name, section, lr, 30, impl)
  assert trained < untrained - 0.03, (trained, untrained)
  cfg, base = hf.load(str(pretrained / "base"))
  params = state["params"]
  peft = Peft.from_config(peft_section(**section), cfg)
  trainable, total = peft_lib.count(params, peft.labels(params))
  assert trainable == sum(x.size for x in jax.tree.leaves(params["peft"])) < total / 2
  assert 2 * trainable <= sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= (
      2 * trainable + 16)
  np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q"]),
                                np.asarray(base["layers"]["attn"]["q"]))
