"""trainer/quantize.py and models/quant/{gptq,model}.py: GPTQ against its update rule written
out with the full inverse Hessian (no Cholesky, no blocks), the calibration pass's Hessians
against a plain-jnp one, a quantized model equal to its dequantized float model, and the command
line: a folder that trainer.generate samples from, and bad input as one line, exit 2."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.handle import init_params, model_handle
from models import layers
from models.quant import awq, gptq, smoothquant, uniform
from models.quant.model import Quantized, dequantize
from models.quant.uniform import Scheme
from models import hf
from trainer import estimate as estimate_lib, export, generate, train
from trainer import quantize as quantize_cli
import small_run
from small_run import run_tool

def gptq_written_out(w, h, scheme, damp=0.01):
  """Optimal Brain Quantization in input order, as GPTQ states it: quantize input i, spread its
  error over the inputs left through H^-1 and remove i from H^-1; group parameters from the
  updated weights when a group starts (float64)."""
  w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
  n_in, n_out = w.shape
  h[np.diag_indices(n_in)] += damp * np.mean(np.diag(h))
  hinv = np.linalg.inv(h)
  group = scheme.group or n_in
  out = np.zeros_like(w)
  for i in range(n_in):
    if i % group == 0:
      block = w[i:i + group]
      scale, zero = uniform.params_from_range(block.min(0), block.max(0), scheme)
      scale = np.asarray(scale, np.float64)
      zero = 0.0 if zero is None else np.asarray(zero, np.float64)
    q = np.clip(np.round(w[i] / scale) + zero, scheme.qmin, scheme.qmax)
    out[i] = (q - zero) * scale
    err = (w[i] - out[i]) / hinv[i, i]
    w[i + 1:] -= np.outer(hinv[i + 1:, i], err)
    hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]  # input i leaves
  return out


def calibration(seed=0, n=512, n_in=32, n_out=12):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, n_in)) @ rng.normal(size=(n_in, n_in)) * 0.3  # correlated inputs
  x[:, 3] *= 6
  return x, rng.normal(0, 0.1, (n_in, n_out))


@pytest.mark.parametrize("scheme", [Scheme(4, True, 0), Scheme(4, False, 8), Scheme(8, True, 16)],
                         ids=str)
def test_gptq_equals_its_update_rule_written_out(scheme):
  x, w = calibration()
  h = gptq.hessian(x)
  _, got = gptq.quantize(w, h, scheme, block=5)  # blocks that do not divide the inputs
  want = gptq_written_out(w, h, scheme)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_the_layer_better_than_rounding(act_order):
  x, w = calibration(1)
  scheme = Scheme(4, True, 8)
  rtn = np.asarray(uniform.dequantize(uniform.quantize(w, scheme), scheme))
  stored, got = gptq.quantize(w, gptq.hessian(x), scheme, act_order=act_order)
  err = lambda v: np.mean((x @ v - x @ w) ** 2)
  assert err(got) < 0.7 * err(rtn)
  np.testing.assert_array_equal(np.asarray(uniform.dequantize(stored, scheme)), got)


def test_awq_search_picks_the_alpha_of_least_output_error():
  x, w = calibration(2)
  x[:, [1, 7]] *= 20  # channels with large activations: AWQ's case
  weights = {"a": w, "b": w[:, ::-1] * 0.5}
  scheme = Scheme(4, True, 8)
  got, alpha = awq.quantize(weights, x, scheme, clipping=False)

  def output_error(a):  # the published objective, on the activations themselves
    s = np.abs(x).mean(0) ** a
    s = s / np.sqrt(s.max() * s.min())
    err = 0.0
    for v in weights.values():
      q = np.asarray(uniform.dequantize(uniform.quantize((v * s[:, None]).astype(np.float32),
                                                         scheme), scheme), np.float64)
      err += np.sum((x @ v - (x / s) @ q) ** 2)
    return err

  errors = {a: output_error(a) for a in np.arange(20) / 20}
  assert alpha == min(errors, key=errors.get) > 0
  assert errors[alpha] < 0.8 * errors[0.0]  # alpha 0: round to nearest
  stored, deq = got["a"]
  np.testing.assert_allclose(np.sum((x @ w - x @ deq) ** 2) + np.sum(
      (x @ weights["b"] - x @ got["b"][1]) ** 2), errors[alpha], rtol=1e-6)
  # the clipping search then lowers the error further (per group; r = 1 is among its ratios)
  clipped, same = awq.quantize(weights, x, scheme)
  total = sum(np.sum((x @ weights[k] - x @ clipped[k][1]) ** 2) for k in weights)
  assert same == alpha and total < errors[alpha]
  back = Quantized(scheme, "awq", (("attn", "q"),), smooth=True).dequantize_layer(
      ModelConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=12,
                  d_ff=8), {"attn": {"q": stored}})
  np.testing.assert_allclose(np.asarray(back["attn"]["q"]).reshape(32, 12), deq, rtol=1e-5,
                             atol=1e-7)


def test_smoothquant_moves_outliers_into_the_weights_and_quantizes_both():
  x, w = calibration(3)
  x[:, [2, 9]] *= 30  # outlier channels, as LLM activations have
  weights = {"a": w}
  s = smoothquant.smoothing(np.abs(x).max(0), np.abs(w).max(1), 0.5)
  np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-10)  # exact migration
  errors = {}
  for alpha in (0.0, 0.5):
    (stored, _), = smoothquant.quantize(weights, x, alpha).values()
    inv, act = 1.0 / stored["smooth"], stored["act_scale"]
    w_int8 = np.asarray(uniform.dequantize(
        {k: v for k, v in stored.items() if k in ("qweight", "scales")}, smoothquant.WEIGHTS))
    got = np.asarray(layers.project(jnp.asarray(x, jnp.float32), jnp.asarray(w_int8),
                                    layers.ActQuant(jnp.asarray(inv), jnp.asarray(act))))
    xq = np.clip(np.round(x.astype(np.float32) * inv / act), -127, 127) * act  # by hand
    np.testing.assert_allclose(got, xq @ w_int8, rtol=1e-4, atol=1e-5)
    errors[alpha] = np.mean((got - x @ w) ** 2)
  assert errors[0.5] < 0.5 * errors[0.0]


MCFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                   max_seq_len=32)


def test_layer_inputs_are_the_projections_inputs():
  handle = model_handle(MCFG)
  params = init_params(handle, 0)
  rows = np.random.default_rng(0).integers(0, 64, (4, 17)).astype(np.int32)
  xs = quantize_cli.layer_inputs(MCFG, handle, params, rows, 0, batch=2)
  assert {k: v.shape for k, v in xs.items()} == {"q": (64, 32), "o": (64, 32), "gate": (64, 32),
                                                 "down": (64, 48)}
  # layer 0's attention reads the normalised embeddings: plain jnp
  x = params["embed"][rows[:, :-1]].reshape(-1, MCFG.d_model)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + MCFG.norm_eps)
  x = x * params["layers"]["attn_norm"]["scale"][0]
  np.testing.assert_allclose(xs["q"], np.asarray(x), rtol=1e-5, atol=1e-6)
  later = quantize_cli.layer_inputs(MCFG, handle, params, rows, 1, batch=4)
  assert not np.allclose(later["q"], xs["q"])


def test_the_default_group_size_divides_every_projection():
  assert quantize_cli.default_group(MCFG) == 16  # inputs 32 (d_model, heads) and 48 (d_ff)
  from configs import tiny
  from trainer import train
  assert quantize_cli.default_group(train.model_config(tiny.get_config(), 2048)) == 16  # d_ff 688
  assert quantize_cli.default_group(ModelConfig(vocab_size=8, d_model=4096, n_layers=1,
                                                n_heads=32, d_ff=11008)) == 128


def test_a_quantized_model_is_its_dequantized_float_model():
  params = init_params(model_handle(MCFG), 1)
  for scheme in (Scheme(8, True, 0), Scheme(4, False, 16)):
    quant = Quantized(scheme)
    stored = {**params, "layers": quant.quantize_layers(MCFG, params["layers"])}
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 11)))
    got = model_handle(MCFG, quant=quant).bind(stored)(tokens)
    want = model_handle(MCFG).bind(dequantize(MCFG, quant, stored))(tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert 0 < float(jnp.abs(want - model_handle(MCFG).bind(params)(tokens)).max()) < 0.05


def test_int8_folder_round_trips_bit_for_bit(tmp_path):
  from models.quant import model as quant_model
  mcfg = hf.config_from_hf(hf.config_to_hf(MCFG))  # as a folder's config.json reads back
  params = init_params(model_handle(mcfg), 3)
  for i, quant in enumerate((Quantized(Scheme(8, True, 0)), Quantized(Scheme(8, False, 16)))):
    stored = {**params, "layers": quant.quantize_layers(mcfg, params["layers"])}
    out = str(tmp_path / str(i))
    os.makedirs(out)
    hf.save_quantized(out, mcfg, quant, stored)
    cfg2, quant2, loaded = hf.load_quantized(out)
    assert cfg2 == mcfg and quant2 == quant
    flat, back = quant_model.flat(jax.tree.map(np.asarray, stored)), quant_model.flat(loaded)
    assert flat.keys() == back.keys()
    for k in flat:
      assert flat[k].dtype == np.asarray(back[k]).dtype, k
      np.testing.assert_array_equal(flat[k], np.asarray(back[k]))


# -- the command line ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  import hf_models
  folder = str(tmp_path_factory.mktemp("hf") / "qwen2")
  hf_models.make("qwen2", folder)
  hf_models.make_tokenizer("qwen2", folder)
  text = tmp_path_factory.mktemp("text")
  (text / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
  (text / "eval.jsonl").write_text("\n".join(json.dumps({"text": f"lazy dogs {i} jump"})
                                             for i in range(300)))
  return folder, str(text)


# each algorithm has its own test above; the folder's end to end for AWQ and SmoothQuant runs in
# `pytest -m slow` (.ci/run), GPTQ's in the default suite
@pytest.mark.parametrize("method", ["gptq", *[pytest.param(m, marks=pytest.mark.slow)
                                             for m in ("awq", "smoothquant")]])
def test_calibrated_folder_generates_and_reports(hf_folder, tmp_path, method, monkeypatch):
  folder, text = hf_folder
  out = str(tmp_path / "q")
  group = [] if method == "smoothquant" else ["--group_size=16"]
  rc, stdout, stderr = run_tool(
      "quantize", f"--hf={folder}", f"--method={method}", *group, f"--out={out}",
      f"--calibration_files={text}/calib.txt", f"--eval_files={text}/eval.jsonl",
      "--samples=4", "--eval_samples=4", "--seq_len=32")
  assert rc == 0, stderr
  report = json.loads(stdout.strip().splitlines()[-1])
  assert report["method"] == method and report["bytes"] < report["float_bytes"]
  assert np.isfinite(report["perplexity"]) and np.isfinite(report["perplexity_float"])
  assert {"config.json", "model.safetensors", "quantization.json", "tokenizer.json",
          "quantize_report.json"} <= set(os.listdir(out))
  # the folder loads as a quantized handle, and samples greedily as its dequantized model does
  _, handle, params, tok = generate.load_model(None, out)
  assert handle.quant.scheme == (Scheme(8, True, 0) if method == "smoothquant" else
                                 Scheme(4, True, 16))
  assert params["layers"]["attn"]["q"]["qweight"].dtype == (
      jnp.int8 if method == "smoothquant" else jnp.uint8)
  prompt = [[5, 6, 7]]
  floats = dequantize(handle.cfg, handle.quant, params)
  if method == "smoothquant":  # W8A8: the smoothed inputs are quantized too
    tokens = jnp.asarray([list(range(5, 25))])
    want = model_handle(handle.cfg).bind(floats)(tokens)
    quantized = handle.bind(params)(tokens)
    with monkeypatch.context() as m:  # the inputs' quantization off: the float model's logits
      m.setattr(layers.uniform_quant, "fake_quant", lambda x, scale, zero, scheme: x)
      np.testing.assert_allclose(np.asarray(handle.bind(params)(tokens)), np.asarray(want),
                                 rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(quantized - want).max()) > 1e-3
  else:
    got = generate.generate(handle, params, prompt, 6, temperature=0.0)
    assert got == generate.generate(model_handle(handle.cfg), floats, prompt, 6, temperature=0.0)
  rc, stdout, stderr = run_tool("generate", f"--hf={out}", "--prompt=the lazy",
                                "--max_new_tokens=4")
  assert rc == 0, stderr


@pytest.mark.parametrize("args,named", [
    (["--method=int4", "--group_size=32"], "group size 32 does not divide the input dimension 48"),
    (["--method=gptq", "--calibration_files={text}/empty.txt"], "needs calibration text"),
    (["--method=gptq", "--calibration_files={text}/short.txt"], "fewer than one row"),
    (["--method=int8", "--calibration_files={text}/ids.bin"], "is not UTF-8 text"),
    (["--method=gptq", "--eval_files={text}/bad.jsonl",
      "--calibration_files={text}/calib.txt"], "bad.jsonl:2"),
    (["--method=gptq", "--bits=3"], "--bits=3"),
    (["--method=int8"], "give --method and --out"),
])
def test_bad_input_is_one_line(hf_folder, tmp_path, args, named):
  folder, text = hf_folder
  (tmp_path / "t").mkdir(exist_ok=True)
  for name, content in (("empty.txt", ""), ("short.txt", "fox"),
                        ("bad.jsonl", '{"text": "a"}\n{"txt": "b"}\n')):
    (tmp_path / "t" / name).write_text(content)
  (tmp_path / "t" / "ids.bin").write_bytes(np.arange(300, dtype=np.int32).tobytes())
  os.symlink(f"{text}/calib.txt", tmp_path / "t" / "calib.txt")
  args = [a.replace("{text}", str(tmp_path / "t")) for a in args]
  out = [] if named == "give --method and --out" else [f"--out={tmp_path / 'q'}"]
  rc, _, stderr = run_tool("quantize", f"--hf={folder}", "--seq_len=32", "--group_size=16", *args,
                           *out)
  assert rc == 2, stderr
  assert named in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_a_full_disk_leaves_out_as_it_was(hf_folder, tmp_path):
  """Writes past a file-size limit fail (EFBIG, as ENOSPC on a full disk): one line, exit 2, and
  --out keeps what it held, with no half-written files."""
  folder, _ = hf_folder
  out = tmp_path / "q"
  out.mkdir()
  (out / "model.safetensors").write_bytes(b"an earlier model")

  rc, _, stderr = run_tool("quantize", f"--hf={folder}", "--method=int8", f"--out={out}",
                           "--seq_len=32", "--eval_samples=2",
                           # files of at most 128 blocks; SIGXFSZ ignored, so writes fail (EFBIG)
                           shell_prefix="trap '' XFSZ; ulimit -f 128;")
  assert rc == 2, stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: --out=") and "left as it was" in last, stderr
  assert "Traceback" not in stderr
  assert os.listdir(out) == ["model.safetensors"]
  assert (out / "model.safetensors").read_bytes() == b"an earlier model"


# -- a quantized folder as a run's model ------------------------------------------------------

@pytest.fixture(scope="module")
def int4_folder(hf_folder, tmp_path_factory):
  folder, _ = hf_folder
  out = str(tmp_path_factory.mktemp("q") / "int4")
  rc, _, stderr = run_tool("quantize", f"--hf={folder}", "--method=int4", "--group_size=16",
                           f"--out={out}", "--eval_samples=1", "--seq_len=32")
  assert rc == 0, stderr
  return out


def run_from(init, workdir, steps=0):
  c = small_run.config(steps=steps, eval_every=0, checkpoint_every=0, sample_tokens=0,
                       log_every=1)
  c.model.init_from = f"hf:{init}"
  return c, train.run(c, str(workdir))


def test_the_eval_loop_measures_a_quantized_folder_as_its_dequantized_model(
    hf_folder, int4_folder, tmp_path):
  """model.init_from=hf:QDIR with train.steps=0: the eval loop's loss of the integers equals the
  eval loss of the dequantized float model written as a plain Hugging Face folder, and is not
  the original float model's."""
  folder, _ = hf_folder
  mcfg, quant, qparams = hf.load_quantized(int4_folder)
  plain = str(tmp_path / "dequantized")
  hf.save(plain, mcfg, dequantize(mcfg, quant, qparams))
  export.copy_tokenizer(int4_folder, plain)
  losses = {name: run_from(init, tmp_path / name)[1]["eval_loss"]
            for name, init in (("int4", int4_folder), ("plain", plain), ("float", folder))}
  assert losses["int4"] == pytest.approx(losses["plain"], rel=1e-5), losses
  assert abs(losses["int4"] - losses["float"]) > 1e-3, losses


def test_a_run_from_a_quantized_folder_trains_its_floats_and_exports_integers(
    hf_folder, int4_folder, tmp_path):
  """Its integers and scales stay as they were, the float parameters train; trainer.export
  writes the quantized folder back (what trainer.generate --hf reads), and trainer.estimate counts
  the integers' bytes and only the floats as trainable."""
  folder, _ = hf_folder
  _, _, start = hf.load_quantized(int4_folder)
  cfg, result = run_from(int4_folder, tmp_path / "run", steps=2)
  params = result["state"]["params"]
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, start)
  assert moved["embed"] and moved["final_norm"]["scale"]
  q = params["layers"]["attn"]["q"]
  assert q["qweight"].dtype == jnp.uint8
  for module, name in Quantized(Scheme(4)).targets:
    assert not any(jax.tree.leaves(moved["layers"][module][name])), (module, name)
  out = tmp_path / "out"
  rc, _, stderr = run_tool("export", f"--workdir={tmp_path / 'run'}", f"--out={out}")
  assert rc == 0, stderr
  _, quant, written = hf.load_quantized(str(out))
  assert quant.scheme == Scheme(4, True, 16)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               written, params)
  est, _ = estimate_lib.estimate(cfg, jax.devices()[:1])
  floats = sum(x.size for k, x in jax.tree_util.tree_leaves_with_path(start)
               if jnp.issubdtype(x.dtype, jnp.floating)
               and not any(f"'{m}'" in jax.tree_util.keystr(k) and f"'{n}'" in
                           jax.tree_util.keystr(k) for m, n in quant.targets))
  assert est.trainable == floats < est.params
  cfg.model.init_from = f"hf:{folder}"
  assert est.bytes["parameters"] < estimate_lib.estimate(cfg, jax.devices()[:1])[0].bytes[
      "parameters"] / 2


@pytest.mark.parametrize("override,named", [
    ("--config.peft.method=lora", "peft.method"),
    ("--config.quant.mode=qat", "quant.mode=qat"),
    ("broken", "quantization.json"),
])
def test_a_quantized_folder_with_a_run_it_cannot_take_is_one_line(int4_folder, tmp_path,
                                                                    override, named):
  init = int4_folder
  if override == "broken":
    init = str(tmp_path / "broken")
    shutil.copytree(int4_folder, init)
    with open(os.path.join(init, "quantization.json"), "w") as f:
      f.write('{"bits": 4}')
  rc, _, stderr = run_tool("main", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                           f"--config.model.init_from=hf:{init}",
                           *([override] if override.startswith("--") else []))
  lines = stderr.strip().splitlines()
  assert rc == 2 and len(lines) == 1 and named in lines[0], stderr


# -- quantization-aware training --------------------------------------------------------------

def test_qat_trains_through_fake_quantization_and_stores_what_it_trained(tmp_path):
  import small_run
  from trainer import export, train
  c = small_run.config(steps=3, eval_every=0, checkpoint_every=3, sample_tokens=0)
  plain = train.run(c, str(tmp_path / "float"), devices=jax.devices()[:1])
  c.quant.update(mode="qat", bits=4, group_size=16)
  qat = train.run(c, str(tmp_path / "qat"), devices=jax.devices()[:1])
  assert np.isfinite(qat["loss"]) and qat["loss"] != plain["loss"]
  # the straight-through gradient reaches every projection
  start = init_params(model_handle(qat["plan"].spec.slots[0].handle.cfg), c.train.seed)
  for module, name in (("attn", "q"), ("mlp", "down")):
    assert not np.allclose(np.asarray(qat["state"]["params"]["layers"][module][name]),
                           np.asarray(start["layers"][module][name]))
  out = str(tmp_path / "q")
  rc, stdout, stderr = run_tool("quantize", f"--workdir={tmp_path / 'qat'}", "--method=qat",
                                f"--out={out}", "--eval_samples=2")
  assert rc == 0, stderr
  _, trained_handle, trained, _ = export.load_run(str(tmp_path / "qat"))
  assert trained_handle.quant.fake and trained_handle.quant.activations == "token"
  _, handle, stored, _ = generate.load_model(None, out)
  assert handle.quant.scheme == Scheme(4, True, 16) and not handle.quant.fake
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 12)))
  np.testing.assert_allclose(np.asarray(handle.bind(stored)(tokens)),
                             np.asarray(trained_handle.bind(trained)(tokens)), rtol=1e-5,
                             atol=1e-5)


def test_bad_qat_settings_are_one_line(tmp_path):
  import small_run
  from trainer import train
  from trainer.errors import UserError
  for update, key in (({"mode": "qta"}, "quant.mode"), ({"mode": "qat", "bits": 3}, "quant.bits"),
                      ({"mode": "qat", "group_size": 48}, "group size 48"),
                      ({"mode": "qt", "bits": 4}, "quant.bits=4: qt runs int8")):
    c = small_run.config(steps=1)
    c.quant.update(**update)
    with pytest.raises(UserError, match=key) as e:
      train.run(c, str(tmp_path / key), devices=jax.devices()[:1])
    assert "\n" not in str(e.value)
  c = small_run.config(steps=1)
  c.quant.mode = "qat"
  c.peft.method = "lora"
  with pytest.raises(UserError, match="quant.mode"):
    train.run(c, str(tmp_path / "peft"), devices=jax.devices()[:1])


def test_qt_projection_is_an_int8_matmul_of_both_operands():
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(0, 0.1, (32, 12)), jnp.float32)
  got = layers.project(x, w, layers.QtDot(jnp.int8))
  # plain jnp: inputs per token, weights per output channel; qwix's symmetric int8 grid is
  # absmax / 127.5, codes rounded and clipped to [-128, 127]
  x2 = x.reshape(-1, 32)
  sx = jnp.abs(x2).max(1, keepdims=True) / 127.5
  sw = jnp.abs(w).max(0, keepdims=True) / 127.5
  q = lambda v, s: jnp.clip(jnp.round(v / s), -128, 127) * s
  want = q(x2, sx) @ q(w, sw)
  np.testing.assert_allclose(np.asarray(got).reshape(-1, 12), np.asarray(want), rtol=1e-5,
                             atol=1e-5)
  g = jax.grad(lambda v: (layers.project(x, v, layers.QtDot(jnp.int8)) ** 2).sum())(w)
  g_float = jax.grad(lambda v: (layers.project(x, v) ** 2).sum())(w)
  rel = float(jnp.linalg.norm(g - g_float) / jnp.linalg.norm(g_float))
  assert 0 < rel < 0.03  # the backward's gradients are quantized too


def test_qt_training_follows_float_training(tmp_path):
  import small_run
  from trainer import train
  c = small_run.config(steps=5, eval_every=0, checkpoint_every=0, sample_tokens=0)
  plain = train.run(c, str(tmp_path / "float"), devices=jax.devices()[:1])
  c.quant.mode = "qt"
  qt = train.run(c, str(tmp_path / "qt"), devices=jax.devices()[:1])
  assert qt["loss"] != plain["loss"] and abs(qt["loss"] - plain["loss"]) < 0.02 * plain["loss"]
