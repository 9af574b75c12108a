"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) and Qwen3 through models/hf.py, against
transformers itself (torch CPU): logits on import and after our export, greedy generation, the
config mapping and what it refuses, the load-balancing loss, and a fine-tuning run from an
imported folder."""

import json

import numpy as np
import pytest
import torch
import transformers

import hf_models
from models import handle as handles
from models import hf
from models.config import Execution
from trainer import generate as gen

TOKENS = np.random.default_rng(0).integers(0, 101, (2, 19))

# The feature that sets each model apart, switched off: the logits must move (the test can see
# it wrong).
FEATURES = {"mixtral": dict(experts_per_token=1), "qwen2_moe": dict(shared_expert_gate=False),
            "qwen2_moe_step2": dict(router_norm_topk=True),
            "qwen3_moe": dict(router_norm_topk=False), "qwen3": dict(qk_norm=False)}


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def reload(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(
      folder, attn_implementation="eager", experts_implementation="eager").eval()


def greedy(model, prompt, n):
  """transformers' greedy continuation, `n` tokens, no stop token."""
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                         max_new_tokens=n, do_sample=False, pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", list(hf_models.MOE_FAMILIES))
def test_import_export_logits_and_greedy_match_transformers(family, tmp_path):
  model = hf_models.make_moe(family, str(tmp_path / "hf"))
  cfg, params = hf.load(str(tmp_path / "hf"))
  assert cfg.num_params() == sum(p.numel() for p in model.parameters())
  want = torch_logits(model, TOKENS)
  ours = np.asarray(handles.model_handle(cfg).bind(params)(TOKENS))
  assert np.abs(ours - want).max() <= 1e-4, np.abs(ours - want).max()

  plain_cfg, plain = hf.load(str(tmp_path / "hf"), **FEATURES[family])
  dense = Execution(moe_impl="dense")  # every expert on every token: the same function, sooner
  without = np.asarray(handles.model_handle(plain_cfg, run=dense).bind(plain)(TOKENS))
  assert np.abs(without - want).max() > 1e-2, FEATURES[family]

  hf.save(str(tmp_path / "out"), cfg, params, max_shard_bytes=20_000)  # several shards
  assert hf.config_from_hf(hf.read_config(str(tmp_path / "out"))) == cfg
  again = torch_logits(reload(str(tmp_path / "out")), TOKENS)
  assert np.abs(again - want).max() <= 1e-4, np.abs(again - want).max()

  prompt = TOKENS[0, :7].tolist()
  got = gen.generate(handles.model_handle(cfg), params, [prompt], 6)[0]
  assert got == greedy(model, prompt, 6)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe_step2"])
def test_fused_expert_layout_loads(family, tmp_path):
  """A file in transformers 5's in-memory layout (experts fused: gate_up_proj (E, 2f, d), gate
  rows first, and down_proj (E, d, f); Mixtral's router under mlp.gate) loads as the per-expert
  one does."""
  from safetensors.torch import save_file

  model = hf_models.make_moe(family, str(tmp_path / "hf"))
  fused = tmp_path / "fused"
  fused.mkdir()
  state = model.state_dict()
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
  save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
  (fused / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
  _, want = hf.load(str(tmp_path / "hf"))
  _, got = hf.load(str(fused))
  import jax
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_load_streams_layers_and_experts_into_shardings(tmp_path):
  """Loaded into shardings that split the layer stack, the experts and the model dimension over
  8 devices: each device reads its layers' experts' slices, with the values of a one-device
  load (the dense stack, one layer, stays whole along layers)."""
  import jax
  import parallel

  hf_models.make_moe("qwen3_moe", str(tmp_path / "hf"), num_experts=4)
  cfg, whole = hf.load(str(tmp_path / "hf"))
  assert list(hf.stacks(cfg).values()) == [[1, 2], [0]]
  mesh = parallel.make_mesh(dict(data=1, fsdp=2, expert=2, tensor=2))
  rules = {"layers": "fsdp", "expert": "expert", "embed": "tensor", "head_dim": "tensor"}
  shardings = handles.param_shardings(handles.model_handle(cfg), mesh, rules)
  _, split = hf.load(str(tmp_path / "hf"), shardings)
  gate = split["layers"]["mlp"]["gate"]  # (layers, expert, embed, mlp)
  assert gate.sharding.spec[:3] == ("fsdp", "expert", "tensor")
  assert len({str(s.index) for s in gate.addressable_shards}) == 8
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               split, whole)


def test_balance_loss_and_router_settings_match_transformers(tmp_path):
  """router_aux_loss_coef counts only with output_router_logits (as in transformers' loss); on one
  MoE layer our balance loss is transformers' aux_loss times it. Mixtral's jitter maps too."""
  model = hf_models.make_moe("mixtral", str(tmp_path / "hf"), num_hidden_layers=1,
                             output_router_logits=True, router_aux_loss_coef=0.02,
                             router_jitter_noise=0.1)
  cfg, params = hf.load(str(tmp_path / "hf"))
  assert (cfg.router_aux_loss_weight, cfg.router_jitter) == (0.02, 0.1)
  _, aux = handles.model_handle(cfg).bind(params).forward(TOKENS)
  with torch.no_grad():
    want = float(model(torch.tensor(TOKENS)).aux_loss) * 0.02
  assert abs(float(aux["moe_balance_loss"]) - want) <= 1e-6 * want, (aux, want)
  config = hf.read_config(str(tmp_path / "hf"))
  config["output_router_logits"] = False
  assert hf.config_from_hf(config).router_aux_loss_weight == 0.0


def test_unsupported_settings_are_one_line():
  base = dict(architectures=["Qwen2MoeForCausalLM"], vocab_size=101, hidden_size=36,
              num_hidden_layers=4, num_attention_heads=3, intermediate_size=30,
              moe_intermediate_size=22, num_experts=5, num_experts_per_tok=2,
              shared_expert_intermediate_size=14)
  # layers 0 and 1 dense, then MoE: moe_first_dense=2
  cfg = hf.config_from_hf({**base, "mlp_only_layers": [0, 1]})
  assert cfg.layer_kinds() == ["mlp", "mlp", "moe", "moe"]
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  with pytest.raises(hf.UnsupportedModel, match=r"mlp_only_layers=\[2\] with decoder_sparse_step=1"):
    hf.config_from_hf({**base, "mlp_only_layers": [2]})
  with pytest.raises(hf.UnsupportedModel, match="without MoE layers"):
    hf.config_from_hf({**base, "decoder_sparse_step": 5})
  with pytest.raises(hf.UnsupportedModel, match="attention_bias"):
    hf.config_from_hf({**base, "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": True})

  import dataclasses
  for change, message in [(dict(family="llama"), "experts need family"),
                          (dict(family="mixtral", shared_expert_d_ff=0, qkv_bias=False),
                           "dense layers"),
                          (dict(shared_expert_gate=False), "no gated shared expert"),
                          (dict(family="qwen3_moe", qkv_bias=False), "qk_norm=False"),
                          (dict(router_order="topk_softmax"), "router_order=topk_softmax")]:
    with pytest.raises(hf.UnsupportedModel, match=message):
      hf.config_to_hf(dataclasses.replace(cfg, **change))


@pytest.mark.slow
def test_fine_tune_from_an_imported_moe_and_export(tmp_path):
  """`model.init_from=hf:DIR` on a Qwen2-MoE folder with dense and MoE layers trains, and
  `python -m trainer.export` writes a folder transformers computes our logits from."""
  import subprocess
  import sys

  import jax
  import small_run
  from trainer import export, train

  folder, workdir, out = str(tmp_path / "hf"), str(tmp_path / "run"), str(tmp_path / "out")
  hf_models.make_moe("qwen2_moe_step2", folder)
  hf_models.make_tokenizer("qwen2", folder, vocab_size=101)
  c = small_run.config(steps=2, eval_every=0, checkpoint_every=2, sample_tokens=0, log_every=1)
  c.model.init_from = f"hf:{folder}"
  result = train.run(c, workdir)
  assert np.isfinite(result["loss"])
  with open(f"{workdir}/metrics.jsonl") as f:
    assert any("moe_share_max" in json.loads(line) for line in f)
  proc = subprocess.run([sys.executable, "-m", "trainer.export", f"--workdir={workdir}",
                         "--format=hf", f"--out={out}"], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  _, handle, params, step = export.load_run(workdir)
  assert step == 2
  _, start = hf.load(folder)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       params, start)
  assert moved["layers"]["mlp"]["gate"] > 0  # the experts trained
  ours = np.asarray(handles.model_handle(handle.cfg).bind(params)(TOKENS))
  theirs = torch_logits(reload(out), TOKENS)
  assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
  jax.clear_caches()
