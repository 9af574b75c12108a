"""AdapterFusion, AdapterDrop, MAM adapters and UniPELT (models/peft/unified.py) against plain-jnp
forms of the published formulas (tests/reference.py's hooks), with KV-cache decoding, the own
adapter folder (models/peft/saved.py) and bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base as base_config
from models import hf
from models import handle as handles
from models.config import ModelConfig
from models.peft import Peft, saved
from tests import hf_models, reference

TOKENS = np.random.default_rng(0).integers(0, 97, (2, 15))
VARIANTS = pytest.mark.parametrize("section", [
    dict(method="unipelt", targets="q_proj|v_proj", rank=4, adapter_dim=6, num_virtual_tokens=3),
    dict(method="mam", adapter_dim=6, num_virtual_tokens=3),
    dict(method="adapter", adapter_dim=6, adapter_drop=1)], ids=["unipelt", "mam", "drop"])


def peft_section(**overrides):
  section = base_config.get_config().peft
  section.update(**overrides)
  return section


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny random Llama (3 layers) as our config and parameters."""
  folder = tmp_path_factory.mktemp("unified") / "base"
  hf_models.make("llama", str(folder))
  return hf.load(str(folder))


def randomized(params, seed=1, scale=0.3):
  """The adapters moved off their identity start: every leaf plus noise."""
  leaves, tree = jax.tree.flatten(params["peft"])
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  moved = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return {**params, "peft": jax.tree.unflatten(tree, moved)}


def build(cfg, base, seed=1, **section):
  peft = Peft.from_config(peft_section(**section), cfg)
  handle = handles.model_handle(cfg, peft)
  params = handles.init_params(handle, seed=0, base=jax.tree.map(jnp.copy, base))
  return peft, handle, randomized(params, seed)


def at(tree, l):
  return jax.tree.map(lambda a: np.asarray(a[l]), tree)


# --- the published formulas, written out ------------------------------------------------------

def houlsby(h, p):
  return h + jax.nn.gelu(h @ p["down"] + p["down_bias"]) @ p["up"] + p["up_bias"]


def sigmoid_gate(x, w, b):
  return 1.0 / (1.0 + jnp.exp(-(x @ w + b)))


class Hooks:
  pass


def test_mam_is_prefix_tuning_plus_a_scaled_parallel_ffn_adapter(base):
  cfg, weights = base
  peft, handle, params = build(cfg, weights, method="mam", adapter_dim=6, num_virtual_tokens=3,
                               mam_scale=2.5)
  a = params["peft"]
  hooks = Hooks()
  hooks.prefix = lambda l: (a["prompt"]["kv"][l, 0], a["prompt"]["kv"][l, 1])

  def parallel(l, u):
    p = at(a["parallel"], l)
    return 2.5 * (jax.nn.relu(u @ p["down"] + p["down_bias"]) @ p["up"] + p["up_bias"])
  hooks.mlp_parallel = parallel
  want = reference.forward(params, cfg, TOKENS, hooks=hooks)
  got = handle.bind(params)(TOKENS)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  no_parallel = dict(params, peft={**a, "parallel": jax.tree.map(jnp.zeros_like, a["parallel"])})
  assert np.abs(np.asarray(handle.bind(no_parallel)(TOKENS)) - np.asarray(want)).max() > 1e-2


def unipelt_hooks(a, scale):
  hooks = Hooks()
  hooks.prefix = lambda l: (a["prompt"]["kv"][l, 0], a["prompt"]["kv"][l, 1])
  hooks.prefix_gate = lambda l, h: sigmoid_gate(h, a["prefix_gate"]["w"][l],
                                                a["prefix_gate"]["b"][l])

  def delta(l, name, x):
    module = "attn" if name in ("q", "k", "v", "o") else "mlp"
    if name not in a.get(module, {}):
      return None
    e = at(a[module][name], l)
    return sigmoid_gate(x, e["gate"], e["gate_bias"])[..., None] * scale * (
        x @ e["lora_a"] @ e["lora_b"])
  hooks.delta = delta

  def mlp_out(l, h):
    p = at(a["adapter"]["mlp"], l)
    g = sigmoid_gate(h, p["gate"], p["gate_bias"])[..., None]
    return h + g * (jax.nn.gelu(h @ p["down"] + p["down_bias"]) @ p["up"] + p["up_bias"])
  hooks.mlp_out = mlp_out
  return hooks


def test_unipelt_gates_lora_prefix_and_adapter(base):
  """LoRA on q, v and down behind per-token gates from each matrix's input; the prefix scaled
  per query by a gate on the attention's input; the FFN adapter behind a gate on its input."""
  cfg, weights = base
  peft, handle, params = build(cfg, weights, method="unipelt", targets="q_proj|v_proj|down_proj",
                               rank=4, alpha=8.0, adapter_dim=6, num_virtual_tokens=3)
  a = params["peft"]
  want = reference.forward(params, cfg, TOKENS, hooks=unipelt_hooks(a, peft.scale))
  got = handle.bind(params)(TOKENS)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  # each gate matters: shut one (a large negative bias) and the output moves
  for path in (("prefix_gate", "b"), ("attn", "q", "gate_bias"), ("mlp", "down", "gate_bias"),
               ("adapter", "mlp", "gate_bias")):
    shut = jax.tree.map(lambda x: x, a)
    node = shut
    for k in path[:-1]:
      node = node[k]
    node[path[-1]] = node[path[-1]] - 30.0
    moved = np.asarray(handle.bind(dict(params, peft=shut))(TOKENS))
    assert np.abs(moved - np.asarray(got)).max() > 1e-3, path


def test_fusion_attends_over_frozen_adapters_above_the_dropped_layers(base, tmp_path):
  """AdapterFusion over two saved adapter folders (one with AdapterDrop 1, whose top 2 layers
  the fusion with AdapterDrop 2 takes the top 1 of), against the published attention."""
  cfg, weights = base
  folders = []
  for i, drop in enumerate((0, 1)):
    section = peft_section(method="adapter", adapter_dim=6, adapter_drop=drop)
    peft, handle, params = build(cfg, weights, seed=10 + i, method="adapter", adapter_dim=6,
                                 adapter_drop=drop)
    folder = tmp_path / f"task{i}"
    folder.mkdir()
    saved.write(str(folder), section.to_dict(), cfg.to_dict(), params["peft"])
    folders.append((folder, params["peft"]["adapter"], drop))
  peft, handle, params = build(cfg, weights, seed=3, method="fusion", adapter_dim=6,
                               adapter_drop=2,
                               fusion_adapters=",".join(str(f) for f, _, _ in folders))
  a = params["peft"]
  # `build` moved every leaf off its start; a fresh init holds the folders' adapters as written
  fresh = handles.init_params(handle, seed=0, base=jax.tree.map(jnp.copy, weights))
  for n, (_, adapter, drop) in enumerate(folders):
    for where in ("attn", "mlp"):
      for k, v in adapter[where].items():
        np.testing.assert_array_equal(fresh["peft"]["adapter"][where][k][:, n],
                                      np.asarray(v)[2 - drop:])

  def fuse(l, h, where):
    if l < 2:
      return h
    p, f = at(a["adapter"][where], l - 2), at(a["fusion"][where], l - 2)
    z = [houlsby(h, jax.tree.map(lambda x: x[n], p)) for n in range(2)]
    scores = jnp.stack([jnp.sum((h @ f["query"]) * (zn @ f["key"]), -1) for zn in z], -1)
    w = jax.nn.softmax(scores, -1)
    return sum(w[..., n:n + 1] * (z[n] @ f["value"]) for n in range(2))
  hooks = Hooks()
  hooks.attn_out = lambda l, h: fuse(l, h, "attn")
  hooks.mlp_out = lambda l, h: fuse(l, h, "mlp")
  want = reference.forward(params, cfg, TOKENS, hooks=hooks)
  np.testing.assert_allclose(handle.bind(params)(TOKENS), want, atol=2e-4, rtol=1e-4)
  labels = peft.labels(params)
  assert set(jax.tree.leaves(labels["peft"]["adapter"])) == {"frozen"}
  assert set(jax.tree.leaves(labels["peft"]["fusion"])) == {"trainable"}


def test_adapter_drop_leaves_the_lowest_layers_as_the_base_model(base):
  cfg, weights = base
  peft, handle, params = build(cfg, weights, method="adapter", adapter_dim=6, adapter_drop=2)
  a = params["peft"]["adapter"]
  assert a["mlp"]["down"].shape[0] == 1  # one of the 3 layers holds adapters
  hooks = Hooks()
  hooks.attn_out = lambda l, h: h if l < 2 else houlsby(h, at(a["attn"], l - 2))
  hooks.mlp_out = lambda l, h: h if l < 2 else houlsby(h, at(a["mlp"], l - 2))
  want = reference.forward(params, cfg, TOKENS, hooks=hooks)
  np.testing.assert_allclose(handle.bind(params)(TOKENS), want, atol=2e-4, rtol=1e-4)


def scan_lengths(jaxpr) -> list[int]:
  """The lengths of every scan in a jaxpr, nested ones included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      out.append(eqn.params["length"])
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else (value,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += scan_lengths(inner)
  return out


def test_adapter_drop_takes_no_backward_pass_below(base):
  """The adapters' gradient scans the layers forward, then back down only to the lowest layer
  with adapters: L + (L - n) layer steps, not 2 L."""
  from trainer import step as step_lib
  cfg, weights = base
  batch = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:],
           "weights": np.ones((2, 14), np.float32),
           "positions": np.broadcast_to(np.arange(14), (2, 14)),
           "segment_ids": np.ones((2, 14), int)}

  def layer_steps(drop):
    _, handle, params = build(cfg, weights, method="adapter", adapter_dim=6, adapter_drop=drop)
    loss_fn = step_lib.make_loss_fn(handle, jnp.float32)
    grad = jax.grad(lambda a: loss_fn({**params, "peft": a}, batch)[0])
    return sum(scan_lengths(jax.make_jaxpr(grad)(params["peft"]).jaxpr))
  assert [layer_steps(drop) for drop in (0, 1, 2)] == [6, 5, 4]


def greedy_by_full_forward(handle, params, prompt, n):
  tokens = list(prompt)
  for _ in range(n):
    logits = handle.bind(params)(jnp.asarray([tokens]))
    tokens.append(int(jnp.argmax(logits[0, -1])))
  return tokens[len(prompt):]


@VARIANTS
def test_kv_cache_decoding_equals_the_full_forward(base, section):
  from trainer import generate as gen
  cfg, weights = base
  _, handle, params = build(cfg, weights, **section)
  prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6]]
  ours = gen.generate(handle, params, prompts, 6)
  assert ours == [greedy_by_full_forward(handle, params, p, 6) for p in prompts]


def test_the_adapter_folder_round_trips(base, tmp_path):
  cfg, weights = base
  section = peft_section(method="unipelt", targets="q_proj", rank=4, adapter_dim=6,
                         num_virtual_tokens=3)
  peft, handle, params = build(cfg, weights, **section.to_dict())
  files = saved.write(str(tmp_path), section.to_dict(), cfg.to_dict(), params["peft"])
  assert sorted(files) == ["adapters.json", "adapters.safetensors"]
  got_section, fields, adapters = saved.read(str(tmp_path))
  assert got_section == section.to_dict() and ModelConfig.from_dict(fields) == cfg
  jax.tree.map(np.testing.assert_array_equal, adapters, jax.tree.map(np.asarray, params["peft"]))
  again = Peft.from_config(peft_section(**got_section), cfg)
  np.testing.assert_array_equal(
      handles.model_handle(cfg, again).bind({**weights, "peft": adapters})(TOKENS),
      handle.bind(params)(TOKENS))


@pytest.mark.parametrize("section,match", [
    (dict(method="fusion", fusion_adapters="/nowhere"), "two or more"),
    (dict(method="lora", adapter_drop=1), "adapter_drop=1 applies to methods adapter, fusion"),
    (dict(method="adapter", adapter_drop=3), r"must be in 0\.\.2"),
    (dict(method="adapter", fusion_adapters="a,b"), "is for method fusion"),
    (dict(method="mam", mam_scale=0.0), "must be positive"),
    (dict(method="unipelt", targets="nothing"), "matches no linear module"),
], ids=["one-folder", "drop-lora", "drop-all", "fusion-key", "mam-scale", "unipelt-targets"])
def test_bad_settings_name_the_key(base, section, match):
  cfg, _ = base
  with pytest.raises(ValueError, match=match):
    Peft.from_config(peft_section(**section), cfg)


def test_fusion_folders_that_do_not_fit_name_the_key(base, tmp_path):
  cfg, weights = base
  section = peft_section(method="adapter", adapter_dim=6, adapter_drop=1)
  _, _, params = build(cfg, weights, **section.to_dict())
  good = tmp_path / "good"
  good.mkdir()
  saved.write(str(good), section.to_dict(), cfg.to_dict(), params["peft"])
  lora = tmp_path / "lora"
  lora.mkdir()
  saved.write(str(lora), dict(section.to_dict(), method="lora"), cfg.to_dict(), {})
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "adapters.json").write_text("{\n  oops")
  cases = [(f"{good},{tmp_path / 'missing'}", 6, 1, "has no adapters.json"),
           (f"{good},{lora}", 6, 1, "holds peft.method=lora adapters"),
           (f"{good},{good}", 8, 1, "set peft.adapter_dim=6"),
           (f"{good},{good}", 6, 0, "set peft.adapter_drop >= 1"),
           (f"{good},{broken}", 6, 1, "adapters.json:2: not JSON")]
  for folders, dim, drop, match in cases:
    peft = Peft.from_config(peft_section(method="fusion", fusion_adapters=folders,
                                         adapter_dim=dim, adapter_drop=drop), cfg)
    with pytest.raises(ValueError, match=match):
      peft.load_fixed()


@VARIANTS
def test_the_reference_model_is_the_base_model(base, section):
  """DPO's reference (`reference_params`): the adapters switched off, the base model's logits."""
  cfg, weights = base
  peft, handle, params = build(cfg, weights, **section)
  want = handles.model_handle(cfg).bind(weights)(TOKENS)
  np.testing.assert_allclose(handle.bind(peft.reference_params(params))(TOKENS), want,
                             atol=1e-5)
