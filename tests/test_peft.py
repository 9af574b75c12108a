"""PEFT methods against Hugging Face PEFT (torch CPU) with identical weights, the PEFT file
format both ways, PiSSA's initialisation, and training end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers

import hf_models
import small_run
from configs import base as base_config
from models import hf
from models.peft import Peft, hf_format
from models import handle as handles

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {  # name: (HF PEFT config, our peft config section)
    "lora": (lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL),
             dict(method="lora", rank=4, alpha=8.0)),
    "rslora": (lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                          target_modules=["q_proj", "o_proj", "up_proj"]),
               dict(method="lora", rank=4, alpha=8.0, rslora=True, targets="q_proj|o_proj|up_proj")),
    "dora": (lambda: hf_peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                        target_modules=["q_proj", "v_proj", "down_proj"]),
             dict(method="dora", rank=4, alpha=8.0, targets="attn.(q|v)|mlp.down")),
    "adalora": (lambda: hf_peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                              target_modules=["q_proj", "o_proj", "gate_proj"]),
                dict(method="adalora", rank=4, alpha=8.0, adalora_target_rank=2,
                     targets="q_proj|o_proj|gate_proj")),
    "vera": (lambda: hf_peft.VeraConfig(r=8, target_modules=["q_proj", "down_proj"]),
             dict(method="vera", vera_rank=8, targets="q_proj|down_proj")),
    "ia3": (lambda: hf_peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
            dict(method="ia3")),
}
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 15))


def peft_section(**overrides):
  section = base_config.get_config().peft
  section.update(**overrides)
  return section


def logits_of(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.float().numpy()


def theirs_and_ours(case, folder):
  """HF PEFT's model for `case` on the tiny Llama in `folder`/base, adapters randomised and
  saved to `folder`/theirs, read back into ours: (cfg, params, peft, their logits, ours)."""
  hf_config, ours = CASES[case]
  model = hf_peft.get_peft_model(hf_models.make("llama", f"{folder}/base"), hf_config())
  torch.manual_seed(1)
  with torch.no_grad():  # adapters away from their identity initialisation
    for _, p in model.named_parameters():
      if p.requires_grad:
        p.add_(0.3 * torch.randn_like(p))
  model.eval().save_pretrained(f"{folder}/theirs")
  cfg, params = hf.load(f"{folder}/base")
  peft = Peft.from_config(peft_section(**ours), cfg)
  params = {**params, "peft": hf_format.read(f"{folder}/theirs", peft)}
  got = np.asarray(handles.model_handle(cfg, peft).bind(params)(TOKENS))
  return cfg, params, peft, logits_of(model), got


@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_hf_peft_and_files_go_both_ways(case, tmp_path):
  cfg, params, peft, want, got = theirs_and_ours(case, str(tmp_path))
  without = np.asarray(handles.model_handle(cfg).bind(
      {k: v for k, v in params.items() if k != "peft"})(TOKENS))
  assert np.abs(got - without).max() > 1.0  # the adapters matter in this comparison
  assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()

  # our PEFT-format export loads onto the original base in HF PEFT ...
  hf_format.write(str(tmp_path / "ours"), peft, params)
  fresh = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"),
                                                            attn_implementation="eager")
  reloaded = hf_peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours")).eval()
  assert np.abs(logits_of(reloaded) - got).max() <= 1e-4
  # ... and the merged weights as a plain Hugging Face model give the same logits again
  hf.save(str(tmp_path / "merged"), cfg, peft.merge(params))
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                             attn_implementation="eager").eval()
  assert np.abs(logits_of(merged) - got).max() <= 1e-4


def test_pissa_init_equals_hf_peft_up_to_signs(tmp_path):
  base_model = hf_models.make("llama", str(tmp_path / "base"))
  cfg, params = hf.load(str(tmp_path / "base"))
  model = hf_peft.get_peft_model(base_model, hf_peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa"))
  theirs = {n: p.detach().numpy() for n, p in model.named_parameters()}
  peft = Peft.from_config(peft_section(method="lora", rank=4, alpha=8.0, init="pissa",
                                       targets="q_proj|down_proj"), cfg)
  new_base, adapters = peft.init(params, jax.random.PRNGKey(0))
  for (module, name), hf_name in (((("attn", "q")), "self_attn.q_proj"),
                                  (("mlp", "down"), "mlp.down_proj")):
    for i in range(cfg.n_layers):
      at = f"base_model.model.model.layers.{i}.{hf_name}."
      a, b = np.asarray(adapters[module][name]["lora_a"][i]), np.asarray(
          adapters[module][name]["lora_b"][i])
      a_t, b_t = theirs[at + "lora_A.default.weight"].T, theirs[at + "lora_B.default.weight"].T
      signs = np.sign(np.sum(a * a_t, axis=0))  # each singular pair may flip as a whole
      np.testing.assert_allclose(a * signs, a_t, atol=1e-4)
      np.testing.assert_allclose(b * signs[:, None], b_t, atol=1e-4)
      w = np.asarray(new_base["layers"][module][name][i]).reshape(a.shape[0], -1)
      np.testing.assert_allclose(w, theirs[at + "base_layer.weight"].T, atol=1e-4)


@pytest.mark.parametrize("section", [
    dict(method="lora"), dict(method="lora", rslora=True), dict(method="lora", init="pissa"),
    dict(method="dora"), dict(method="adalora"), dict(method="vera", vera_rank=16),
    dict(method="ia3")], ids=["lora", "rslora", "pissa", "dora", "adalora", "vera", "ia3"])
def test_merged_logits_equal_unmerged(section):
  """Merging is exact: on a model at the usual initialisation scale (std 0.02), the merged
  weights give the unmerged logits within 1e-5 in float32, with adapters that move them by more
  than 1e-2."""
  from models import ModelConfig
  cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    max_seq_len=64)
  plain = handles.model_handle(cfg)
  base = handles.init_params(plain, seed=0)
  want_base = np.asarray(plain.bind(base)(TOKENS))
  peft = Peft.from_config(peft_section(rank=4, alpha=8.0, **section), cfg)
  handle = handles.model_handle(cfg, peft)
  params = handles.init_params(handle, seed=0, base=jax.tree.map(jnp.copy, base))
  # at initialisation the model is unchanged (PiSSA: residual + s A B is the original weight)
  np.testing.assert_allclose(handle.bind(params)(TOKENS), want_base, atol=1e-5)
  frozen = peft.labels(params)["peft"]
  params["peft"] = jax.tree.map(  # "trained" adapters
      lambda x, label, k: x if label == "frozen" else x + 0.2 * jax.random.normal(k, x.shape),
      params["peft"], frozen, _keys_like(params["peft"]))
  got = np.asarray(handle.bind(params)(TOKENS))
  assert np.abs(got - want_base).max() > 1e-2
  merged = np.asarray(plain.bind(peft.merge(params))(TOKENS))
  assert np.abs(merged - got).max() <= 1e-5, np.abs(merged - got).max()


def _keys_like(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten(list(jax.random.split(jax.random.PRNGKey(1), len(leaves))))


def test_pissa_randomized_svd_matches_the_exact_one(tmp_path):
  from models.peft import randomized_svd
  rng = np.random.default_rng(0)
  # a weight with a decaying spectrum, as trained weights have
  u, _ = np.linalg.qr(rng.standard_normal((96, 96)))
  v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
  w = (u[:, :64] * (0.7 ** np.arange(64))) @ v.T
  w = np.stack([w, 2 * w]).astype(np.float32)
  a, s, vt = randomized_svd(jnp.asarray(w), 4, 2, jax.random.PRNGKey(0))
  s_exact = np.linalg.svd(w, compute_uv=False)[:, :4]
  np.testing.assert_allclose(np.asarray(s), s_exact, rtol=1e-4)
  top = np.asarray(a * s[:, None, :] @ vt)
  u_e, s_e, vt_e = np.linalg.svd(w, full_matrices=False)
  np.testing.assert_allclose(top, (u_e[..., :4] * s_e[:, None, :4]) @ vt_e[:, :4], atol=1e-4)
  # through the config (on random weights, whose flat spectrum is the hard case): the residual
  # plus s * A @ B is W again, and A @ B holds nearly the energy of the exact top-r part
  cfg, params = hf.load(str(hf_models_folder(tmp_path)))
  w = np.asarray(params["layers"]["mlp"]["up"])
  for niter in (0, 4):
    peft = Peft.from_config(peft_section(method="lora", init="pissa", pissa_niter=niter,
                                         rank=2), cfg)
    base, adapters = peft.init(params, jax.random.PRNGKey(0))
    entry = adapters["mlp"]["up"]
    low = peft.scale * np.asarray(entry["lora_a"] @ entry["lora_b"])
    np.testing.assert_allclose(np.asarray(base["layers"]["mlp"]["up"]) + low, w, atol=1e-5)
    energy = np.linalg.norm(low, axis=(1, 2))
    if niter == 0:
      exact = energy
  assert np.all(energy >= 0.97 * exact) and np.all(energy <= exact * (1 + 1e-5)), (energy, exact)


def test_adalora_rank_allocation_follows_hf_peft(tmp_path):
  """Our allocator against PEFT's (RankAllocator via AdaLoraModel.update_and_allocate), fed the
  same adapter values and gradients at every step: the same lambdas masked, step by step,
  through warm-up, the cubic budget with masks every deltaT steps, and the fixed final
  pattern."""
  from models.peft import adalora
  total, tinit, tfinal, delta_t = 14, 2, 3, 2
  base_model = hf_models.make("llama", str(tmp_path / "base"))
  model = hf_peft.get_peft_model(base_model, hf_peft.AdaLoraConfig(
      init_r=4, target_r=2, lora_alpha=8, total_step=total, tinit=tinit, tfinal=tfinal,
      deltaT=delta_t, target_modules=["q_proj", "down_proj"]))
  cfg, _ = hf.load(str(tmp_path / "base"))
  peft = Peft.from_config(peft_section(
      method="adalora", rank=4, alpha=8.0, adalora_target_rank=2, adalora_tinit=tinit,
      adalora_tfinal=tfinal, adalora_delta_t=delta_t, targets="q_proj|down_proj"), cfg, total)
  theirs = dict(model.named_parameters())
  pairs = list(hf_format._pairs(peft))
  rng = np.random.default_rng(0)
  state = None
  kept = []
  for step in range(1, total + 1):
    values, grads = {}, {}
    for module, name, i, key, leaf, _, from_peft in pairs:
      p = theirs[key + ".default"]
      value = rng.standard_normal(p.shape).astype(np.float32)
      grad = rng.standard_normal(p.shape).astype(np.float32)
      with torch.no_grad():
        p.copy_(torch.from_numpy(value))
      p.grad = torch.from_numpy(grad)
      for tree, x in ((values, value), (grads, grad)):
        tree.setdefault((module, name, leaf), {})[i] = from_peft(x)
    stack = lambda tree: {m: {n: {leaf: np.stack([tree[(m, n, leaf)][i]
                                                  for i in range(cfg.n_layers)])
                                  for leaf in adalora.LEAVES} for mm, n in peft.targets
                              if mm == m} for m, _ in peft.targets}
    ours, grads = stack(values), stack(grads)
    state = peft.allocator.init_state(ours) if state is None else state
    model.base_model.update_and_allocate(step)
    masked, state = peft.allocator.update(step, ours, grads, state)
    for module, name, i, key, leaf, to_peft, _ in pairs:
      if leaf == "lora_e":
        np.testing.assert_allclose(to_peft(np.asarray(masked[module][name]["lora_e"][i])),
                                   theirs[key + ".default"].detach().numpy(), atol=1e-6,
                                   err_msg=f"step {step} {key}")
    kept.append(int(sum(np.asarray(k).sum() for k in jax.tree.leaves(state["keep"]))))
  n = 2 * cfg.n_layers  # matrices
  assert kept[0] == 4 * n and kept[-1] == 2 * n, kept  # full rank at first, the target at the end
  assert all(a >= b for a, b in zip(kept, kept[1:])), kept


def test_adalora_orthogonality_penalty_against_numpy():
  from models.peft import adalora
  rng = np.random.default_rng(1)
  a = rng.standard_normal((3, 10, 4)).astype(np.float32)
  b = rng.standard_normal((3, 4, 7)).astype(np.float32)
  tree = {"attn": {"q": {"lora_a": a, "lora_e": np.zeros((3, 4)), "lora_b": b}}}
  want = np.mean([np.linalg.norm(a[i].T @ a[i] - np.eye(4)) for i in range(3)]
                 + [np.linalg.norm(b[i] @ b[i].T - np.eye(4)) for i in range(3)])
  np.testing.assert_allclose(float(adalora.orthogonality(tree)), want, rtol=1e-5)


def test_low_rank_dense_gradients_match_autodiff_of_the_folded_weight():
  """models/layers.low_rank_dense (LoRA training steps without dropout): its value and every
  gradient equal jax autodiff of the plain x @ (w + s a @ b); with w frozen, the compiled
  gradient holds no (in x out) product over the tokens."""
  from models.layers import low_rank_dense
  kx, kw, ka, kb, kd = jax.random.split(jax.random.PRNGKey(0), 5)
  x, w = jax.random.normal(kx, (96, 48)), jax.random.normal(kw, (48, 40))
  a, b = jax.random.normal(ka, (48, 4)), jax.random.normal(kb, (4, 40))
  dy = jax.random.normal(kd, (96, 40))
  ours = lambda x, w, a, b: jnp.sum(low_rank_dense(x, w, a, b, 0.5) * dy)
  plain = lambda x, w, a, b: jnp.sum(x @ (w + 0.5 * a @ b) * dy)
  np.testing.assert_allclose(ours(x, w, a, b), plain(x, w, a, b), rtol=1e-5)
  for got, want in zip(jax.grad(ours, (0, 1, 2, 3))(x, w, a, b),
                       jax.grad(plain, (0, 1, 2, 3))(x, w, a, b)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  flops = lambda argnums: jax.jit(jax.grad(ours, argnums)).lower(
      x, w, a, b).compile().cost_analysis()["flops"]
  assert flops((0, 2, 3)) <= flops((0, 1, 2, 3)) - 2 * 96 * 48 * 40  # frozen w: no x^T dy


@pytest.mark.slow  # 45-85 s: run with `pytest -m slow` (keeps the default suite under 20 min)
def test_lora_dropout_acts_on_the_low_rank_path_inputs(tmp_path):
  """The activation-space path equals the folded weights without dropout; with it, each input
  entry is zeroed with probability p and the rest scaled by 1 / (1 - p); evaluation has none."""
  from models.peft import _dropout_delta
  from trainer import step as step_lib
  delta = _dropout_delta(jnp.eye(64), jnp.eye(64), 2.0, 0.25, jax.random.PRNGKey(0))
  out = np.asarray(delta(jnp.ones((200, 64))))
  assert abs((out == 0).mean() - 0.25) < 0.01
  np.testing.assert_allclose(out[out != 0], 2.0 / 0.75, rtol=1e-6)

  cfg, base = hf.load(str(hf_models_folder(tmp_path)))
  batch = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:],
           "weights": np.ones((2, 14), np.float32),
           "positions": np.broadcast_to(np.arange(14), (2, 14)), "segment_ids": np.ones((2, 14), int)}
  losses = {}
  for rate in (0.0, 1e-9, 0.5):
    peft = Peft.from_config(peft_section(method="lora", rank=4, dropout=rate), cfg)
    handle = handles.model_handle(cfg, peft)
    params = handles.init_params(handle, seed=0, base=jax.tree.map(jnp.copy, base))
    params["peft"] = jax.tree.map(lambda x: x + 0.1, params["peft"])
    loss_fn = step_lib.make_loss_fn(handle, jnp.float32)
    losses[rate] = [float(loss_fn(params, batch, jax.random.PRNGKey(k))[0]) for k in (1, 2)]
    losses[rate, "eval"] = float(loss_fn(params, batch)[0])
  np.testing.assert_allclose(losses[1e-9], losses[0.0], rtol=1e-6)  # the path itself is exact
  assert losses[0.5, "eval"] == losses[0.0, "eval"]  # no dropout outside training
  assert losses[0.5][0] != losses[0.5][1]  # a fresh mask per step
  assert all(abs(x - losses[0.0][0]) > 1e-3 for x in losses[0.5])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """The smoke model with qkv biases (Qwen2 layout, so BitFit has something to train) after 40
  steps on the stdlib, exported as a Hugging Face folder; and a narrow text dataset (one
  function template, random numbers) for the adapters to learn."""
  from trainer import export, train
  root = tmp_path_factory.mktemp("peft")
  c = small_run.config(steps=40, eval_every=0, checkpoint_every=0, sample_tokens=0)
  c.model.update(qkv_bias=True, family="qwen2")
  train.run(c, str(root / "pre"))
  _, handle, params, _ = export.load_run(str(root / "pre"))
  hf.save(str(root / "base"), handle.cfg, params)
  export.copy_tokenizer(str(root / "pre"), str(root / "base"))
  rng = np.random.default_rng(0)
  with open(root / "narrow.jsonl", "w") as f:
    for a, b in rng.integers(0, 100, (600, 2)):
      f.write(json.dumps({"text": f"def add_{a}_{b}(x):\n    return x + {a} + {b}\n"}) + "\n")
  return root


@pytest.mark.parametrize("name,section,lr,steps", [
    ("lora", dict(method="lora"), 2e-2, 20),
    ("pissa_rslora_loraplus", dict(method="lora", init="pissa", rslora=True, lora_plus_scale=4.0),
     1e-3, 20),
    ("dora", dict(method="dora"), 3e-2, 20),
    ("adalora_dropout", dict(method="adalora", rank=8, adalora_target_rank=4, adalora_tinit=4,
                             adalora_tfinal=4, dropout=0.05), 2e-2, 20),
    ("vera", dict(method="vera", vera_rank=32), 1e-1, 20),
    ("ia3", dict(method="ia3"), 1e-1, 20),
    ("bitfit", dict(method="bitfit"), 1e-1, 40),  # 384 biases in all: it learns slowly
    ("qlora", dict(method="lora", base_quant="nf4"), 2e-2, 20),
    ("houlsby", dict(method="adapter", adapter_dim=8), 1e-2, 20),
    pytest.param("houlsby_drop", dict(method="adapter", adapter_dim=8, adapter_drop=1), 1e-2, 20,
                 marks=pytest.mark.slow),
    pytest.param("mam", dict(method="mam", adapter_dim=8, num_virtual_tokens=4), 1e-2, 20,
                 marks=pytest.mark.slow),
    ("unipelt", dict(method="unipelt", targets="q_proj|v_proj", adapter_dim=8,
                     num_virtual_tokens=4), 1e-2, 20),
])
def test_each_method_trains_only_its_parameters(pretrained, name, section, lr, steps):
  from models import peft as peft_lib
  from trainer import train
  c = small_run.config(steps=steps, eval_every=0, checkpoint_every=0, sample_tokens=0,
                       log_every=1, lr=lr, warmup_steps=2)
  c.model.init_from = f"hf:{pretrained / 'base'}"
  c.data.update(source="files", train_files=str(pretrained / "narrow.jsonl"), format="text")
  c.peft.update(**section)
  workdir = pretrained / name
  out = train.run(c, str(workdir))
  with open(workdir / "metrics.jsonl") as f:
    losses = [json.loads(l)["loss"] for l in f if '"loss"' in l]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.04, losses

  params, opt_state = out["state"]["params"], out["state"]["opt_state"]
  cfg, base = hf.load(str(pretrained / "base"))
  peft = Peft.from_config(peft_section(**section), cfg)
  labels = peft.labels(params)
  trainable, total = peft_lib.count(params, labels)
  assert 0 < trainable < total / 5
  # Adam keeps two moments for what trains, nothing for frozen weights (a few step counters)
  moments = sum(x.size for x in jax.tree.leaves(opt_state))
  assert 2 * trainable <= moments <= 2 * trainable + 16
  if section.get("base_quant") == "nf4":  # QLoRA: the targeted weights are stored in 4 bits
    q = params["layers"]["attn"]["q"]
    assert q["nf4_codes"].dtype == jnp.uint8
    assert sum(x.nbytes for x in jax.tree.leaves(q)) * 8 / base["layers"]["attn"]["q"].size < 4.7
  elif section.get("init") != "pissa":  # frozen base weights untouched (PiSSA's: a residual)
    for path in (("layers", "attn", "q"), ("layers", "mlp", "down"), ("embed",)):
      got, want = params, base
      for k in path:
        got, want = got[k], want[k]
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("section", [
    # the default suite keeps one (its 20-minute budget); `pytest -m slow` runs the other
    pytest.param(dict(method="lora", init="pissa", rslora=True), marks=pytest.mark.slow),
    dict(method="dora")], ids=["pissa", "dora"])
def test_exports_load_in_hf_peft_and_transformers(pretrained, section, tmp_path):
  """After a few steps: `trainer.export --format=peft` loads onto the *original* base in HF PEFT
  (PiSSA converted to a plain LoRA against it), `--format=hf` holds the merged weights; both give
  our logits."""
  import subprocess
  import sys
  from trainer import export, train
  c = small_run.config(steps=4, eval_every=0, checkpoint_every=0, sample_tokens=0, lr=1e-2)
  c.model.init_from = f"hf:{pretrained / 'base'}"
  c.peft.update(**section)
  workdir = tmp_path / "run"
  train.run(c, str(workdir))
  _, handle, params, _ = export.load_run(str(workdir))
  ours = np.asarray(handle.bind(params)(TOKENS % handle.cfg.vocab_size))
  for fmt in ("peft", "hf"):
    out = tmp_path / fmt
    proc = subprocess.run([sys.executable, "-m", "trainer.export", f"--workdir={workdir}",
                           f"--format={fmt}", f"--out={out}"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    if fmt == "peft":
      base_model = transformers.AutoModelForCausalLM.from_pretrained(
          str(pretrained / "base"), attn_implementation="eager")
      model = hf_peft.PeftModel.from_pretrained(base_model, str(out)).eval()
    else:
      model = transformers.AutoModelForCausalLM.from_pretrained(
          str(out), attn_implementation="eager").eval()
    with torch.no_grad():
      theirs = model(torch.tensor(TOKENS % handle.cfg.vocab_size)).logits.numpy()
    assert np.abs(theirs - ours).max() <= 1e-4, (fmt, np.abs(theirs - ours).max())


@pytest.fixture(scope="module")
def task_adapters(pretrained):
  """AdapterFusion's first stage: a Houlsby adapter per task (two function templates; the second
  with AdapterDrop 1), each written by `trainer.export --format=adapters`."""
  from trainer import train
  rng = np.random.default_rng(1)
  with open(pretrained / "narrow_mul.jsonl", "w") as f:
    for a, b in rng.integers(0, 100, (600, 2)):
      f.write(json.dumps({"text": f"def mul_{a}_{b}(y):\n    return y * {a} * {b}\n"}) + "\n")
  folders = []
  for task, drop in (("narrow", 0), ("narrow_mul", 1)):
    c = small_run.config(steps=10, eval_every=0, checkpoint_every=0, sample_tokens=0, lr=1e-2,
                         warmup_steps=2)
    c.model.init_from = f"hf:{pretrained / 'base'}"
    c.data.update(source="files", train_files=str(pretrained / f"{task}.jsonl"), format="text")
    c.peft.update(method="adapter", adapter_dim=8, adapter_drop=drop)
    train.run(c, str(pretrained / f"stage1_{task}"))
    out = pretrained / f"adapters_{task}"
    code, _, err = small_run.run_tool("export", f"--workdir={pretrained / f'stage1_{task}'}",
                                      "--format=adapters", f"--out={out}")
    assert code == 0, err
    folders.append(out)
  return folders


def fusion_config(pretrained, task_adapters, **train):
  c = small_run.config(eval_every=0, sample_tokens=0, **train)
  c.model.init_from = f"hf:{pretrained / 'base'}"
  c.peft.update(method="fusion", adapter_dim=8, adapter_drop=1,
                fusion_adapters=",".join(str(f) for f in task_adapters))
  return c


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_adapter_fusion_learns_over_frozen_task_adapters(pretrained, task_adapters, tmp_path):
  """Stage 2 on both tasks' text: the loss falls; the task adapters (their top layer) stay as
  their folders hold them, the base untouched; Adam keeps moments for the fusion alone. The
  run's own adapter folder samples as the run does (`generate --hf --adapters`)."""
  from models.peft import saved
  from trainer import train
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text((pretrained / "narrow.jsonl").read_text()
                   + (pretrained / "narrow_mul.jsonl").read_text())
  c = fusion_config(pretrained, task_adapters, steps=20, checkpoint_every=20, log_every=1,
                    lr=1e-2, warmup_steps=2)
  c.data.update(source="files", train_files=str(mixed), format="text")
  out = train.run(c, str(tmp_path / "fusion"))
  with open(tmp_path / "fusion" / "metrics.jsonl") as f:
    losses = [json.loads(l)["loss"] for l in f if '"loss"' in l]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.04, losses
  params, opt_state = out["state"]["params"], out["state"]["opt_state"]
  for n, (folder, held) in enumerate(zip(task_adapters, (2, 1))):
    stage1 = saved.read(str(folder))[2]["adapter"]
    for where in ("attn", "mlp"):
      for k, v in stage1[where].items():
        np.testing.assert_array_equal(np.asarray(params["peft"]["adapter"][where][k])[:, n],
                                      v[held - 1:])
  _, base = hf.load(str(pretrained / "base"))
  np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q"]),
                                np.asarray(base["layers"]["attn"]["q"]))
  fusion = sum(x.size for x in jax.tree.leaves(params["peft"]["fusion"]))
  assert fusion == 2 * 3 * 64 * 64  # one layer (AdapterDrop 1 of 2), two sublayers, Q K V
  moments = sum(x.size for x in jax.tree.leaves(opt_state))
  assert 2 * fusion <= moments <= 2 * fusion + 16

  code, _, err = small_run.run_tool("export", f"--workdir={tmp_path / 'fusion'}",
                                    "--format=adapters", f"--out={tmp_path / 'fused'}")
  assert code == 0, err
  texts = []
  for source in ([f"--workdir={tmp_path / 'fusion'}"],
                 [f"--hf={pretrained / 'base'}", f"--adapters={tmp_path / 'fused'}"]):
    code, text, err = small_run.run_tool("generate", *source, "--prompt=def mul_",
                                         "--max_new_tokens=12")
    assert code == 0, err
    texts.append(text)
  assert texts[0] == texts[1] and texts[0].strip()
  code, _, err = small_run.run_tool("export", f"--workdir={tmp_path / 'fusion'}", "--format=hf",
                                    f"--out={tmp_path / 'hf'}")
  assert code == 2 and "--format=adapters" in err and "Traceback" not in err


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
@pytest.mark.parametrize("section", [
    dict(method="mam", adapter_dim=8, num_virtual_tokens=4),
    dict(method="unipelt", targets="q_proj|v_proj", adapter_dim=8, num_virtual_tokens=4),
    dict(method="adapter", adapter_dim=8, adapter_drop=1),
    None], ids=["mam", "unipelt", "houlsby_drop", "fusion_drop"])
def test_unified_methods_stop_and_resume_bit_identically(pretrained, task_adapters, section,
                                                          tmp_path):
  from trainer import train

  def config(**extra):
    c = fusion_config(pretrained, task_adapters, steps=4, checkpoint_every=2, lr=1e-2, **extra)
    if section is not None:
      c.peft.update(**{"adapter_drop": 0, "fusion_adapters": "", **section})
    return c

  whole = train.run(config(), str(tmp_path / "whole"))
  train.run(config(stop_after_steps=2), str(tmp_path / "split"))
  resumed = train.run(config(), str(tmp_path / "split"))
  for part in ("params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, resumed["state"][part], whole["state"][part])


def test_neftune_noise_scale_and_training_only(tmp_path):
  from models.decoder import neftune
  from trainer import step as step_lib
  x = jnp.zeros((4, 50, 64))
  noise = np.asarray(neftune(x, jax.random.PRNGKey(0), 5.0))
  bound = 5.0 / np.sqrt(50 * 64)
  assert np.abs(noise).max() <= bound and np.abs(noise).max() > 0.99 * bound
  assert abs(noise.std() - bound / np.sqrt(3)) < 0.02 * bound  # uniform on [-bound, bound]

  cfg, params = hf.load(str(hf_models_folder(tmp_path)))
  handle = handles.model_handle(cfg)
  batch = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:],
           "weights": np.ones((2, 14), np.float32),
           "positions": np.broadcast_to(np.arange(14), (2, 14)), "segment_ids": np.ones((2, 14), int)}
  plain = step_lib.make_loss_fn(handle, jnp.float32)(params, batch)
  noisy_fn = step_lib.make_loss_fn(handle, jnp.float32, neftune_alpha=5.0)
  assert float(noisy_fn(params, batch, jax.random.PRNGKey(1))[0]) != float(plain[0])
  assert float(noisy_fn(params, batch)[0]) == float(plain[0])  # no rng (eval): no noise
  assert float(step_lib.make_eval_step(handle, jnp.float32)(params, batch)[0]) == float(plain[0])


def hf_models_folder(tmp_path):
  hf_models.make("llama", str(tmp_path / "base"))
  return tmp_path / "base"


def test_nf4_round_trip_against_a_numpy_reference():
  from models.quant import nf4 as quant
  rng = np.random.default_rng(3)
  w = rng.standard_normal((2, 128, 24)).astype(np.float32) * 0.02
  q = quant.quantize(jnp.asarray(w))
  back = np.asarray(quant.dequantize(q))
  # reference: per block of 64 inputs and output column, nearest NF4 level of w / absmax
  blocks = w.reshape(2, 2, 64, 24)
  absmax = np.abs(blocks).max(axis=2, keepdims=True)
  scale = absmax.max(axis=1, keepdims=True)
  absmax_d = np.ceil(absmax / scale * 255) / 255 * scale  # the double-quantized maxima
  codes = np.abs(blocks / absmax_d - quant.NF4[:, None, None, None, None]).argmin(axis=0)
  want = (quant.NF4[codes] * absmax_d).reshape(w.shape)
  np.testing.assert_allclose(back, want, atol=1e-7)
  assert q["nf4_codes"].dtype == np.uint8 and q["nf4_codes"].shape == (2, 64, 24)
  assert np.abs(back - w).max() <= 0.14 * np.abs(w).max()  # half the widest level gap
  stored = sum(x.nbytes for x in jax.tree.leaves(q))
  assert stored * 8 / w.size < 4.7  # 4 bits + 8/64 + a float per column


def test_qlora_forward_equals_lora_on_the_dequantized_weights(tmp_path):
  from models.quant import nf4 as quant
  from models import ModelConfig
  cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    max_seq_len=64)  # NF4 blocks: input sizes in multiples of 64
  base = handles.init_params(handles.model_handle(cfg), seed=0)
  q_peft = Peft.from_config(peft_section(method="lora", base_quant="nf4", rank=4,
                                         targets="mlp.down|mlp.up"), cfg)
  q_handle = handles.model_handle(cfg, q_peft)
  params = handles.init_params(q_handle, seed=0, base=jax.tree.map(jnp.copy, base))
  params["peft"] = jax.tree.map(lambda x: x + 0.05, params["peft"])  # B != 0
  assert quant.is_quantized(params["layers"]["mlp"]["down"])
  got = q_handle.bind(params)(TOKENS % cfg.vocab_size)
  # the same with the dequantized weights as an ordinary float base
  plain = Peft.from_config(peft_section(method="lora", rank=4, targets="mlp.down|mlp.up"), cfg)
  float_base = jax.tree.map(lambda x: x, base)
  for name in ("down", "up"):
    stored = params["layers"]["mlp"][name]
    float_base["layers"]["mlp"][name] = quant.dequantize(stored).reshape(base["layers"]["mlp"][name].shape)
  want = handles.model_handle(cfg, plain).bind({**float_base, "peft": params["peft"]})(
      TOKENS % cfg.vocab_size)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_qlora_stops_and_resumes_bit_identically(pretrained, tmp_path):
  """The 4-bit codes survive a checkpoint as integers: stop at step 2, resume to 4, same
  adapters as 4 steps in one go."""
  from trainer import train

  def config(**extra):
    c = small_run.config(steps=4, eval_every=0, checkpoint_every=2, sample_tokens=0, lr=1e-2,
                         **extra)
    c.model.init_from = f"hf:{pretrained / 'base'}"
    c.peft.update(method="lora", base_quant="nf4")
    return c

  whole = train.run(config(), str(tmp_path / "whole"))
  train.run(config(stop_after_steps=2), str(tmp_path / "split"))
  resumed = train.run(config(), str(tmp_path / "split"))
  assert resumed["state"]["params"]["layers"]["attn"]["q"]["nf4_codes"].dtype == jnp.uint8
  jax.tree.map(np.testing.assert_array_equal, resumed["state"]["params"], whole["state"]["params"])


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_lisa_trains_k_layers_at_a_time_with_their_moments_only(pretrained, tmp_path):
  """LISA, 1 of the 2 layers at a time: loss falls; with one draw (interval > steps) exactly one
  layer and the outside parameters change; Adam's moments cover the outside parameters and one
  layer, not both."""
  from trainer import train

  def run(name, steps, interval, lr):
    c = small_run.config(steps=steps, eval_every=0, checkpoint_every=0, sample_tokens=0,
                         log_every=1, lr=lr, warmup_steps=2)
    c.model.init_from = f"hf:{pretrained / 'base'}"
    c.data.update(source="files", train_files=str(pretrained / "narrow.jsonl"), format="text")
    c.peft.update(method="lisa", lisa_activated_layers=1, lisa_step_interval=interval)
    out = train.run(c, str(tmp_path / name))
    with open(tmp_path / name / "metrics.jsonl") as f:
      return out, [json.loads(l)["loss"] for l in f if '"loss"' in l]

  out, losses = run("learn", 20, 5, 3e-3)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses

  out, _ = run("once", 3, 100, 3e-3)
  _, base = hf.load(str(pretrained / "base"))
  params, layers = out["state"]["params"], np.asarray(out["state"]["lisa_layers"])
  assert layers.shape == (1,)
  q, q0 = np.asarray(params["layers"]["attn"]["q"]), np.asarray(base["layers"]["attn"]["q"])
  changed = [i for i in range(2) if not np.array_equal(q[i], q0[i])]
  assert changed == layers.tolist()
  assert not np.array_equal(np.asarray(params["embed"]), np.asarray(base["embed"]))
  per_layer = sum(x[0].size for x in jax.tree.leaves(base["layers"]))
  outside = sum(x.size for k, v in base.items() if k != "layers" for x in jax.tree.leaves(v))
  moments = sum(x.size for x in jax.tree.leaves(out["state"]["opt_state"]))
  assert 2 * (outside + per_layer) <= moments <= 2 * (outside + per_layer) + 16


def test_generation_with_adapters_equals_the_merged_model(tmp_path):
  """KV-cache decoding folds the adapters layer by layer as training does: the same tokens as
  the merged model."""
  from trainer import generate as gen
  cfg, base = hf.load(str(hf_models_folder(tmp_path)))
  peft = Peft.from_config(peft_section(method="dora", rank=4, alpha=8.0), cfg)
  handle = handles.model_handle(cfg, peft)
  params = handles.init_params(handle, seed=0, base=base)
  params["peft"] = jax.tree.map(lambda x: x + 0.1, params["peft"])
  prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6]]
  ours = gen.generate(handle, params, prompts, 8)
  merged = gen.generate(handles.model_handle(cfg), peft.merge(params), prompts, 8)
  assert ours == merged


def test_houlsby_adapters_start_as_the_identity(tmp_path):
  cfg, base = hf.load(str(hf_models_folder(tmp_path)))
  peft = Peft.from_config(peft_section(method="adapter", adapter_dim=4), cfg)
  handle = handles.model_handle(cfg, peft)
  params = handles.init_params(handle, seed=0, base=jax.tree.map(jnp.copy, base))
  want = handles.model_handle(cfg).bind(base)(TOKENS)
  np.testing.assert_allclose(handle.bind(params)(TOKENS), want, atol=1e-6)
  params["peft"]["adapter"]["mlp"]["up"] = params["peft"]["adapter"]["mlp"]["up"] + 0.1
  assert np.abs(np.asarray(handle.bind(params)(TOKENS)) - np.asarray(want)).max() > 1e-2
  with pytest.raises(ValueError, match="cannot be merged"):
    peft.merge(params)
