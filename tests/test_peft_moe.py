"""LoRA and QLoRA on mixture-of-experts layers: the routed experts' and the shared expert's
weights as targets, the PEFT-format export (transformers 5's fused experts, PEFT's
`target_parameters`) loaded by HF PEFT onto a transformers Mixtral / Qwen2-MoE holding the same
weights, and training through the trainer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import small_run
import torch
import transformers

from configs import base as base_config
from models import ModelConfig, hf
from models import handle as handles
from models.config import Execution
from models.peft import Peft, hf_format
from models.quant import nf4

TOKENS = np.random.default_rng(0).integers(0, 97, (2, 13))
# odd sizes: no dimension equals another, the experts' width differs from the model's
MIXTRAL = dict(vocab_size=97, d_model=40, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=10,
               d_ff=56, max_seq_len=64, n_experts=5, experts_per_token=2, expert_d_ff=24,
               family="mistral", rope_theta=10000.0)
QWEN2_MOE = dict(MIXTRAL, family="qwen2", qkv_bias=True, router_norm_topk=False,
                 shared_expert_d_ff=36, shared_expert_gate=True, experts_per_token=3)
QLORA = dict(MIXTRAL, d_model=64, head_dim=16, expert_d_ff=64, n_experts=3)  # NF4: 64 blocks


def peft_section(**overrides):
  section = base_config.get_config().peft
  section.update(**overrides)
  return section


def to_transformers(cfg: ModelConfig, params: dict):
  """A transformers 5 Mixtral (or, with a shared expert, Qwen2-MoE) holding `params` (no PEFT):
  attention, norms and embeddings as models/hf.py lays them out; per layer the router (d, E) as
  mlp.gate.weight (E, d), the experts as the fused mlp.experts.gate_up_proj (E, 2f, d) =
  [gate^T; up^T] and down_proj (E, d, f) = down^T, the shared expert as Qwen2-MoE's."""
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                tie_word_embeddings=False, num_experts_per_tok=cfg.experts_per_token,
                hidden_act="silu", attention_dropout=0.0)
  if cfg.shared_expert_d_ff:
    config = transformers.Qwen2MoeConfig(
        **common, num_experts=cfg.n_experts, moe_intermediate_size=cfg.expert_d_ff,
        intermediate_size=cfg.d_ff, shared_expert_intermediate_size=cfg.shared_expert_d_ff,
        norm_topk_prob=cfg.router_norm_topk, decoder_sparse_step=1, mlp_only_layers=[],
        use_sliding_window=False, output_router_logits=False)
    model = transformers.Qwen2MoeForCausalLM(config)
  else:
    config = transformers.MixtralConfig(**common, num_local_experts=cfg.n_experts,
                                        intermediate_size=cfg.expert_d_ff, sliding_window=None,
                                        router_jitter_noise=0.0, output_router_logits=False)
    model = transformers.MixtralForCausalLM(config)
  state = {}
  for path, name, _, to_hf in hf._layouts(cfg):
    if path[:2] == ("layers", "mlp"):
      continue
    w = params
    for k in path:
      w = w[k]
    w = np.asarray(w, np.float32)
    for i in range(cfg.n_layers) if path[0] == "layers" else [None]:
      state[name.format(i=i)] = to_hf(w[i] if i is not None else w)
  mlp = jax.tree.map(lambda x: np.asarray(x, np.float32), params["layers"]["mlp"])
  for i in range(cfg.n_layers):
    at = f"model.layers.{i}.mlp."
    state[at + "gate.weight"] = mlp["router"][i].T
    state[at + "experts.gate_up_proj"] = np.concatenate(
        [mlp["gate"][i].transpose(0, 2, 1), mlp["up"][i].transpose(0, 2, 1)], axis=1)
    state[at + "experts.down_proj"] = mlp["down"][i].transpose(0, 2, 1)
    if cfg.shared_expert_d_ff:
      for name in ("gate", "up", "down"):
        state[at + f"shared_expert.{name}_proj.weight"] = mlp["shared"][name][i].T
      state[at + "shared_expert_gate.weight"] = mlp["shared_gate"][i].T
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                        strict=True)
  return model.eval()


def logits_of(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


# Weights large enough for the logits to tell models apart; the experts run as the dense
# reference (the same function as dropless when nothing is dropped, and quicker to compile on
# CPU): the adapters' fold is the same for every implementation (the trainer tests run dropless).
RUN = Execution(init_std=0.2, moe_impl="dense")


def with_adapters(cfg, section, seed=0):
  """(peft, handle, params with the adapters moved away from their identity start, base)."""
  run = RUN
  base = handles.init_params(handles.model_handle(cfg, None, run), seed=seed)
  peft = Peft.from_config(peft_section(**section), cfg)
  handle = handles.model_handle(cfg, peft, run)
  params = handles.init_params(handle, seed=seed, base=jax.tree.map(jnp.copy, base))
  keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 64))
  params["peft"] = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape),
                                params["peft"])
  if peft.train_router:  # "trained" routers as well
    router = params["layers"]["mlp"]["router"]
    params["layers"]["mlp"]["router"] = router + 0.3 * jax.random.normal(next(keys), router.shape)
  return peft, handle, params, base


@pytest.mark.parametrize("model,section,want_names", [
    (MIXTRAL, dict(method="lora", rank=3, alpha=5.0, rslora=True),  # attention, all experts
     {"experts.base_layer.lora_A.weight": (5 * 6, 40),
      "experts.base_layer.lora_B.weight": (48, 5 * 6),
      "experts.lora_A.weight": (5 * 3, 24), "experts.lora_B.weight": (40, 5 * 3)}),
    # one expert parameter alone: not nested (slow: the default cases cover the rest)
    pytest.param(MIXTRAL, dict(method="lora", rank=2, alpha=3.0, targets="q_proj|experts.up"),
                 {"experts.lora_A.weight": (5 * 2, 40), "experts.lora_B.weight": (48, 5 * 2)},
                 marks=pytest.mark.slow),
    pytest.param(MIXTRAL, dict(method="lora", rank=2, targets="v_proj|experts.down_proj"),
                 {"experts.lora_A.weight": (5 * 2, 24), "experts.lora_B.weight": (40, 5 * 2)},
                 marks=pytest.mark.slow),
    (QWEN2_MOE, dict(method="lora", rank=3, alpha=7.0, train_router=True),  # shared expert
     {"experts.base_layer.lora_A.weight": (5 * 6, 40),
      "shared_expert.up_proj.lora_A.weight": (3, 40)}),
    (QLORA, dict(method="lora", rank=4, base_quant="nf4", targets="k_proj|experts.(gate|down)"),
     {"experts.base_layer.lora_A.weight": (3 * 4, 64), "experts.lora_B.weight": (64, 3 * 4)}),
], ids=["mixtral_all_rslora", "mixtral_up", "mixtral_down", "qwen2_moe_router", "qlora"])
def test_export_loads_in_hf_peft_with_our_logits(model, section, want_names, tmp_path):
  """Our adapters written in PEFT's format, loaded by PeftModel.from_pretrained onto a
  transformers model holding the same base weights (QLoRA: the NF4 weights dequantized), give our
  logits in float32; read back, they are the same adapters."""
  cfg = ModelConfig(**model)
  peft, handle, params, base = with_adapters(cfg, section)
  ours = np.asarray(handle.bind(params)(TOKENS))
  if peft.base_quant == "nf4":  # what the forward pass multiplies by: the stored 4 bits
    assert nf4.is_quantized(params["layers"]["mlp"]["gate"])
    assert params["layers"]["mlp"]["gate"]["nf4_codes"].shape == (2, 3, 32, 64)
    base = peft.merge({k: v for k, v in params.items() if k != "peft"})
  plain = np.asarray(handles.model_handle(cfg, None, handle.run).bind(base)(TOKENS))
  theirs_plain = logits_of(to_transformers(cfg, base))
  assert np.abs(theirs_plain - plain).max() <= 1e-4  # the conversion itself
  assert np.abs(ours - plain).max() > 0.5  # the adapters matter here

  hf_format.write(str(tmp_path), peft, params)
  with open(tmp_path / "adapter_config.json") as f:
    config = json.load(f)
  experts = sorted({"experts.gate_up_proj" if n in ("gate", "up") else "experts.down_proj"
                    for m, n in peft.targets if m == "experts"})
  assert config["target_parameters"] == experts
  assert config["modules_to_save"] == (["mlp.gate"] if peft.train_router else None)
  loaded = hf_peft.PeftModel.from_pretrained(to_transformers(cfg, base), str(tmp_path)).eval()
  from safetensors.numpy import load_file
  stored = load_file(str(tmp_path / "adapter_model.safetensors"))
  for name, shape in want_names.items():
    assert stored[f"base_model.model.model.layers.1.mlp.{name}"].shape == shape, name
  # every tensor we wrote is one PEFT made for this config (none ignored, none missing)
  state = hf_peft.get_peft_model_state_dict(loaded)
  assert sorted(state) == sorted(stored)
  theirs = logits_of(loaded)
  assert np.abs(theirs - ours).max() <= 1e-4, np.abs(theirs - ours).max()

  back = hf_format.read(str(tmp_path), peft)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), back,
               jax.tree.map(np.asarray, params["peft"]))


def test_reads_peft_own_fused_gate_up_lora(tmp_path):
  """PEFT's own LoRA over gate_up_proj (one rank-r pair for gate and up together) reads exactly
  into our separate gate and up adapters, sharing A: the same logits as PEFT's model."""
  cfg = ModelConfig(**MIXTRAL)
  run = RUN
  base = handles.init_params(handles.model_handle(cfg, None, run), seed=3)
  model = hf_peft.get_peft_model(to_transformers(cfg, base), hf_peft.LoraConfig(
      r=3, lora_alpha=6, target_modules=["o_proj"],
      target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
  torch.manual_seed(0)
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.requires_grad:
        p.add_(0.3 * torch.randn_like(p))
  model.eval().save_pretrained(str(tmp_path))
  peft = Peft.from_config(peft_section(method="lora", rank=3, alpha=6.0,
                                       targets="o_proj|experts.gate_up_proj|experts.down_proj"),
                          cfg)
  assert [t for t in peft.targets if t[0] == "experts"] == [
      ("experts", "gate"), ("experts", "up"), ("experts", "down")]
  adapters = hf_format.read(str(tmp_path), peft)
  np.testing.assert_array_equal(adapters["experts"]["gate"]["lora_a"],
                                adapters["experts"]["up"]["lora_a"])
  ours = np.asarray(handles.model_handle(cfg, peft, run).bind({**base, "peft": adapters})(TOKENS))
  assert np.abs(logits_of(model) - ours).max() <= 1e-4
  # ... which our own gate-only peft cannot hold: refused, naming the tensor
  gate_only = Peft.from_config(peft_section(method="lora", rank=3, targets="experts.gate"), cfg)
  with pytest.raises(ValueError, match=r"experts\.lora_B\.weight .* cannot be read"):
    hf_format.read(str(tmp_path), gate_only)


def test_targets_by_name_and_what_experts_refuse():
  cfg = ModelConfig(**QWEN2_MOE)
  pick = lambda spec: Peft.from_config(peft_section(method="lora", targets=spec), cfg).targets
  assert pick("gate_up_proj") == (("experts", "gate"), ("experts", "up"))
  assert pick("down_proj") == (("shared", "down"),)  # PEFT's target_modules: modules only
  assert pick("experts.down_proj|experts.down") == (("experts", "down"),)
  assert pick("shared.(gate|up)") == (("shared", "gate"), ("shared", "up"))
  assert len(pick("all-linear")) == 4 + 3 + 3
  with pytest.raises(ValueError, match=r"peft.targets='mlp\.gate' matches no linear module; "
                                       r"names: .*experts\.gate \(experts\.gate_up_proj or"):
    pick("mlp.gate")
  for section, message in [
      (dict(method="dora"), r"^peft.method=dora cannot adapt the routed experts \(peft.targets="),
      (dict(method="ia3", ia3_targets="experts.*"), r"^peft.method=ia3 .*peft.ia3_targets="),
      (dict(method="lora", init="pissa"), r"^peft.init=pissa is not implemented for the routed"),
      (dict(method="lora", dropout=0.1), r"^peft.dropout=0.1: LoRA on the routed experts"),
      (dict(method="lora", base_quant="nf4", targets="experts.down"),
       r"NF4 needs the input size of experts.down \(24\)")]:
    with pytest.raises(ValueError, match=message):
      Peft.from_config(peft_section(**section), ModelConfig(**MIXTRAL))
  # a run config: one line through trainer.validate (main prints it and exits 2)
  from trainer import validate
  from trainer.errors import UserError
  c = small_run.config()
  c.model.update(n_experts=4, expert_d_ff=64)
  c.peft.update(method="lora", dropout=0.05, targets="q_proj|experts.down")
  with pytest.raises(UserError, match=r"^config key peft.dropout=0.05: LoRA on the routed "
                                      r"experts has no dropout, as in PEFT \(peft.targets="
                                      r"'q_proj\|experts.down' selects experts.down\)"):
    validate.check_config(c)
  # the shared expert is an ordinary MLP: dora and dropout are fine there
  Peft.from_config(peft_section(method="dora", targets="shared.*|q_proj", dropout=0.0), cfg)
  with pytest.raises(ValueError, match=r"^peft.train_router=True needs a mixture of experts"):
    Peft.from_config(peft_section(method="lora", train_router=True),
                     ModelConfig(**dict(MIXTRAL, n_experts=0)))
  mixed = ModelConfig(**dict(MIXTRAL, moe_every=2))
  with pytest.raises(ValueError, match=r"^peft.method=lora needs every layer of one kind: "
                                       r"model.moe_every=2"):
    Peft.from_config(peft_section(method="lora"), mixed)


def test_training_split_path_equals_folded_weights():
  """A training step's loss (low-rank paths kept apart; the experts' folded per expert inside
  the MoE block) equals evaluation's (every adapter folded into its weight), and the gradient
  reaches every expert's A and B, nothing of the router."""
  from trainer import step as step_lib
  cfg = ModelConfig(**QWEN2_MOE)
  peft, handle, params, _ = with_adapters(cfg, dict(method="lora", rank=2))
  batch = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:],
           "weights": np.ones((2, 12), np.float32),
           "positions": np.broadcast_to(np.arange(12), (2, 12)),
           "segment_ids": np.ones((2, 12), int)}
  loss_fn = step_lib.make_loss_fn(handle, jnp.float32)
  train = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, jax.random.PRNGKey(1))[0]))
  loss, grads = train(params)
  np.testing.assert_allclose(float(loss), float(jax.jit(loss_fn)(params, batch)[0]), rtol=1e-6)
  for name in ("gate", "up", "down"):
    g = np.asarray(grads["peft"]["experts"][name]["lora_b"])
    assert g.shape == (2, 5, 2, 24 if name != "down" else 40)
    assert (np.abs(g).sum(axis=(2, 3)) > 0).all()  # every expert of every layer
  labels = peft.labels(params)
  assert labels["layers"]["mlp"]["router"] == "frozen"  # by default
  assert labels["peft"]["experts"]["gate"]["lora_a"] == "trainable"
  assert float(jnp.abs(grads["layers"]["mlp"]["router"]).sum()) > 0  # were it to train
  with_router = Peft.from_config(peft_section(method="lora", train_router=True), cfg)
  assert with_router.labels(params)["layers"]["mlp"]["router"] == "trainable"
  assert with_router.labels(params)["layers"]["mlp"]["gate"] == "frozen"


@pytest.mark.parametrize("section", [
    pytest.param(dict(method="lora"), marks=pytest.mark.slow),  # QLoRA's run covers its path
    dict(method="lora", base_quant="nf4")], ids=["lora", "qlora"])
def test_trainer_steps_change_only_the_adapters(section, tmp_path):
  """A few steps of the trainer on a tiny MoE (every layer 4 experts, top 2, a shared expert):
  the loss is finite and falls, the adapters move, every other parameter (router, experts'
  NF4 codes, attention) is bit for bit its initial value."""
  from trainer import train, validate
  from trainer.seeds import fold_seed
  c = small_run.config(steps=4, eval_every=0, checkpoint_every=0, sample_tokens=0, log_every=1,
                       lr=2e-2, warmup_steps=1)
  c.model.update(n_experts=4, experts_per_token=2, expert_d_ff=64, shared_expert_d_ff=64)
  c.data.max_chars = 100_000  # the tokenizer's text: less to train it on
  c.peft.update(rank=4, **section)
  out = train.run(c, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    losses = [json.loads(l)["loss"] for l in f if '"loss"' in l]
  assert len(losses) == 4 and np.isfinite(losses).all()
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses

  params = out["state"]["params"]
  mcfg = validate.model_config(c, params["embed"].shape[0])
  peft = Peft.from_config(c.peft, mcfg, c.train.steps)
  assert [t for t in peft.targets if t[0] == "experts"] == [
      ("experts", "gate"), ("experts", "up"), ("experts", "down")]
  handle = handles.model_handle(mcfg, peft, validate.execution(c))
  start = handles.init_params(handle, fold_seed(c.train.seed))
  if "nf4" in section.values():
    assert params["layers"]["mlp"]["up"]["nf4_codes"].dtype == jnp.uint8
  for path, got in jax.tree_util.tree_leaves_with_path(params):
    want = start
    for k in path:
      want = want[k.key]
    changed = not np.array_equal(np.asarray(got), np.asarray(want))
    assert changed == (path[0].key == "peft"), path
