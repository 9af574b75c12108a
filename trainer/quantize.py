"""Post-training quantization of a trained model's projection weights.

python -m trainer.quantize --workdir=DIR|--hf=DIR --method=METHOD --out=DIR
    [--group_size=N] [--bits=4] [--act_order] [--damp=0.01] [--alpha=0.5]
    [--act_calibration=absmax|percentile|mse|kl] [--calibration_files=F,...]
    [--eval_files=F,...] [--samples=128] [--eval_samples=64] [--seq_len=N]

Methods (models/quant/): `int8` symmetric per output channel, `int8_asym` with zero points,
`int4` symmetric per group of --group_size inputs (default: the first of 128, 64, 32, 16, 8 that
divides every projection's input) (round to nearest), `gptq` (--bits, groups,
--act_order, --damp), `awq` (--bits, groups: activation-aware scales and clipping),
`smoothquant` (W8A8: --alpha, --act_calibration), `qat` (a run trained with quant.mode=qat: its
own scheme, so the stored model computes what the trained one did). The calibrated ones go layer
by layer, each layer's inputs from the calibration tokens run through the layers already
quantized (activations unquantized). Attention and MLP projections are quantized; embeddings,
norms and the LM head stay in floating point.

Calibration and evaluation text: --calibration_files / --eval_files (plain text, or jsonl with a
"text" field), tokenized with the model's tokenizer and cut into rows of --seq_len tokens; by
default the embedded corpus (the standard library's source): its training split calibrates, its
held-out split is evaluated. The held-out perplexity of the float and the quantized model, the
bytes stored and the method's settings are printed and written to DIR/quantize_report.json.

DIR then holds config.json (the model, as a Hugging Face folder has it), model.safetensors (the
integers, scales and zero points, and the float weights; no pickle), quantization.json and the
tokenizer. `python -m trainer.generate --hf=DIR` samples from it and `models.hf.load_quantized`
reads it; layers are dequantized one at a time as they run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from models import hf
from models.config import ModelConfig
from models.decoder import Context, LayerSource
from models.handle import model_handle
from models.quant import awq, gptq, model as quant_model, smoothquant
from models.quant.uniform import PER_CHANNEL, Scheme
from trainer import export, generate, losses
from trainer.data import stdlib_corpus, tokenizer as tokenizer_lib
from trainer.errors import UserError

METHODS = ("int8", "int8_asym", "int4", "gptq", "awq", "smoothquant", "qat")
CALIBRATED = ("gptq", "awq", "smoothquant")


def define_flags():
  flags.DEFINE_string("workdir", None, "a training run's folder")
  flags.DEFINE_string("hf", None, "or a Hugging Face folder")
  flags.DEFINE_integer("step", None, "--workdir: the checkpoint step (default: the newest)")
  flags.DEFINE_enum("method", None, METHODS, "how to quantize")
  flags.DEFINE_string("out", None, "the folder to write")
  flags.DEFINE_integer("bits", 4, "gptq: 4 or 8")
  flags.DEFINE_integer("group_size", None, "inputs per scale: N, 0 per channel, -1 per tensor "
                       "(default: int8 per channel; int4, gptq and awq the first of 128, 64, "
                       "32, 16, 8 that divides every projection's input size)")
  flags.DEFINE_bool("act_order", False, "gptq: the inputs with the largest Hessian first")
  flags.DEFINE_float("damp", 0.01, "gptq: dampening, a fraction of the Hessian's mean diagonal")
  flags.DEFINE_float("alpha", 0.5, "smoothquant: migration strength (0: no smoothing)")
  flags.DEFINE_enum("act_calibration", "absmax", ["absmax", "percentile", "mse", "kl"],
                    "smoothquant: how the activations' int8 range is chosen")
  flags.DEFINE_float("percentile", 99.99, "--act_calibration=percentile: of |x|")
  flags.DEFINE_string("calibration_files", "", "text or jsonl files (\"\": the embedded corpus)")
  flags.DEFINE_string("eval_files", "", "held-out text or jsonl files (\"\": the embedded corpus)")
  flags.DEFINE_integer("samples", 128, "calibration rows")
  flags.DEFINE_integer("eval_samples", 64, "held-out rows evaluated")
  flags.DEFINE_integer("seq_len", 0, "tokens per row (0: the run's train.seq_len; --hf: 512)")


GROUPS = (128, 64, 32, 16, 8)  # the default group size: the first that divides every input


def default_group(mcfg: ModelConfig) -> int:
  """The largest of GROUPS that divides every projection's input size (0: per channel)."""
  sizes = {quant_model.dims(mcfg, m, n)[0] for m, n in quant_model.LINEAR}
  return next((g for g in GROUPS if all(n % g == 0 and n > g for n in sizes)), PER_CHANNEL)


def scheme_of(method: str, bits: int, group: int | None) -> Scheme:
  """The scheme of a method; `group` None for int4, gptq and awq is filled in later (GROUPS)."""
  if method == "qat":  # (the run's own; see quantize)
    return Scheme(8)
  if method == "int8":
    return Scheme(8, True, PER_CHANNEL if group is None else group)
  if method == "int8_asym":
    return Scheme(8, False, PER_CHANNEL if group is None else group)
  if method == "int4":
    return Scheme(4, True, 128 if group is None else group)  # (128: a placeholder)
  if method == "smoothquant":  # W8A8: int8 weights per output channel
    if group not in (None, PER_CHANNEL):
      raise UserError("--method=smoothquant quantizes weights per output channel; leave "
                      "--group_size unset")
    return Scheme(8, True, PER_CHANNEL)
  if bits not in (4, 8):
    raise UserError(f"--bits={bits}: {method} writes 4 or 8 bits")
  return Scheme(bits, True, 128 if group is None else group)


# -- text ---------------------------------------------------------------------------------------

def read_texts(files: str, flag: str) -> list[str]:
  texts = []
  for path in [p for p in files.split(",") if p]:
    try:
      with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
          for n, line in enumerate(f, 1):
            if not line.strip():
              continue
            try:
              texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
              raise UserError(f"{path}:{n}: not a json object with a \"text\" field") from None
        else:
          texts.append(f.read())
    except OSError as e:
      raise UserError(f"{flag}: cannot read {path} ({e.strerror})") from None
    except UnicodeDecodeError:
      raise UserError(f"{flag}: {path} is not UTF-8 text (tokenized data is not taken: give the "
                      "text, which the model's own tokenizer reads)") from None
  return [t for t in texts if t.strip()]


def rows_of(texts: list[str], tokenizer, seq_len: int, n: int, flag: str) -> np.ndarray:
  """(up to n, seq_len + 1) token rows: the texts tokenized, each followed by EOS, concatenated
  and cut."""
  ids: list[int] = []
  need = n * (seq_len + 1)
  for t in texts:
    ids += tokenizer_lib.prompt_ids(tokenizer, t)
    if tokenizer.eos_id >= 0:
      ids.append(tokenizer.eos_id)
    if len(ids) >= need:
      break
  rows = len(ids) // (seq_len + 1)
  if rows == 0:
    raise UserError(f"{flag}: the text holds {len(ids)} tokens, fewer than one row of "
                    f"--seq_len={seq_len} + 1")
  rows = min(rows, n)
  return np.asarray(ids[:rows * (seq_len + 1)], np.int32).reshape(rows, seq_len + 1)


# -- the model's passes ---------------------------------------------------------------------------

def perplexity(handle, params, rows: np.ndarray, batch: int = 8) -> float:
  """exp(mean next-token NLL) over the rows."""
  @jax.jit
  def nll(params, tokens):
    model = handle.bind(params)
    h, _ = model.forward(tokens[:, :-1])
    return losses.token_nll(model.logits(h), tokens[:, 1:]).sum()

  total = sum(float(nll(params, jnp.asarray(rows[i:i + batch])))
              for i in range(0, len(rows), batch))
  return float(np.exp(total / (rows.shape[0] * (rows.shape[1] - 1))))


INPUTS = {"attn": ("q", "o"), "mlp": ("gate", "down")}  # one weight per distinct input
SAME_INPUT = {"k": "q", "v": "q", "up": "gate"}


def layer_inputs(mcfg: ModelConfig, handle, params, rows: np.ndarray, layer: int,
                 batch: int = 8) -> dict[str, np.ndarray]:
  """The inputs (tokens, in), float32, of layer `layer`'s projections over the rows ("q" for q,
  k and v; "o"; "gate" for gate and up; "down"), the layers before it as `params` holds them.
  The layers run one by one in Python (no scan), so a zero-valued PEFT-style delta on each
  projection can hand its input out of the pass."""
  @jax.jit
  def inputs(params, tokens):
    seen: dict[str, jax.Array] = {}
    current = [-1]

    def probe(name, n_out):
      def delta(x2):
        if current[0] == layer:
          seen[name] = x2.astype(jnp.float32)
        return jnp.zeros((x2.shape[0], n_out), x2.dtype)
      return delta

    deltas = {m: {w: probe(w, quant_model.dims(mcfg, m, w)[1]) for w in names}
              for m, names in INPUTS.items()}

    def stack(body, x, layers, inputs):
      outs = []
      for i in range(mcfg.n_layers):
        current[0] = i
        x, out = body(x, *jax.tree.map(lambda a: a[i], (layers, inputs)))
        outs.append(out)
      return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    source = LayerSource(params["layers"], lambda layer_p: (layer_p, {"deltas": deltas}))
    handle.bind(params).forward(tokens, ctx=Context(layers=source, stack=stack))
    return seen

  parts = [jax.device_get(inputs(params, jnp.asarray(rows[i:i + batch, :-1])))
           for i in range(0, len(rows), batch)]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def calibrated(mcfg: ModelConfig, quant: quant_model.Quantized, handle, params, rows, log,
               method: str, fn) -> dict:
  """{(module, name): stored arrays over the layers} by a calibrated method, layer after layer:
    fn(weights {name: (in, out) float}, inputs X (tokens, in) they share) -> {name: (stored
    dict, dequantized (in, out))}; each layer's inputs come through the layers already
    quantized."""
  current = jax.tree.map(np.array, params)  # writable copies
  found: dict = {t: [] for t in quant.targets}
  for layer in range(mcfg.n_layers):
    t0 = time.perf_counter()
    xs = layer_inputs(mcfg, handle, current, rows, layer)
    for module, first in ((m, w) for m, firsts in INPUTS.items() for w in firsts):
      x = xs[first]
      names = [n for m, n in quant.targets if m == module and SAME_INPUT.get(n, n) == first]
      weights = {}
      for name in names:
        n_in, n_out = quant_model.dims(mcfg, module, name)
        weights[name] = current["layers"][module][name][layer].reshape(n_in, n_out)
      for name, (stored, deq) in fn(weights, x).items():
        found[(module, name)].append(stored)
        w = current["layers"][module][name]
        w[layer] = deq.reshape(w.shape[1:]).astype(w.dtype)
    log(f"{method}: layer {layer + 1}/{mcfg.n_layers} ({time.perf_counter() - t0:.1f}s)")
  return {t: {k: np.stack([s[k] for s in per]) for k in per[0]} for t, per in found.items()}


# -- the folder -------------------------------------------------------------------------------

def stored_bytes(params) -> int:
  """The bytes of the tensors model.safetensors holds."""
  return int(sum(np.asarray(v).nbytes for v in quant_model.flat(params).values()))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    report = quantize(flags.FLAGS)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(report))


def quantize(f) -> dict:
  """The command: the report it prints (UserError on bad input, before anything is written but
  the --out folder)."""
  log = lambda m: print(m, file=sys.stderr, flush=True)
  if not f.method or not f.out:
    raise UserError("give --method and --out")
  scheme = scheme_of(f.method, f.bits, f.group_size)
  if f.seq_len < 0 or f.seq_len == 1 or f.samples < 1 or f.eval_samples < 1:
    raise UserError("--seq_len must be >= 2 (or 0) and --samples, --eval_samples >= 1")
  export.prepare_out(f.out)
  run_cfg, handle, params, tokenizer = generate.load_model(f.workdir, f.hf, f.step)
  if handle.peft is not None:
    raise UserError("a PEFT run: merge its adapters first (python -m trainer.export "
                    "--format=hf) and quantize that folder with --hf")
  mcfg = handle.cfg
  if f.group_size is None and scheme.group == 128:  # the default: a size this model can take
    scheme = dataclasses.replace(scheme, group=default_group(mcfg))
    log(f"{f.method}: groups of {scheme.group or 'a whole channel'} inputs (--group_size)")
  quant = quant_model.Quantized(scheme, f.method if f.method in CALIBRATED else "rtn",
                                smooth=f.method in ("awq", "smoothquant"),
                                activations="static" if f.method == "smoothquant" else "")
  if f.method == "qat":  # the scheme the run trained with, now stored as integers
    if handle.quant is None or handle.quant.method != "qat":
      raise UserError(f"--method=qat: {f.workdir or f.hf} did not train with quant.mode=qat")
    quant = dataclasses.replace(handle.quant, fake=False)
    scheme = quant.scheme
  handle = model_handle(mcfg, run=handle.run)  # the float model, for the float perplexity
  if not 0 <= f.alpha <= 1:
    raise UserError(f"--alpha={f.alpha} must be in [0, 1]")
  try:
    quant.check(mcfg)
  except ValueError as e:
    raise UserError(f"--group_size / --method: {e}") from None
  # rows as long as the model trained on: positions past those are not what is measured here
  seq_len = f.seq_len or (run_cfg.train.seq_len if run_cfg is not None else 512)
  seq_len = min(seq_len, mcfg.max_seq_len - 1)
  if f.calibration_files or f.eval_files:
    calib = read_texts(f.calibration_files, "--calibration_files")
    held = read_texts(f.eval_files, "--eval_files")
  else:
    calib, held = stdlib_corpus.load_documents(2_000_000, 5.0)
  if f.method in CALIBRATED and not calib:
    raise UserError(f"--method={f.method} needs calibration text: give --calibration_files "
                    "(or neither file flag, for the embedded corpus)")
  calib_rows = (rows_of(calib, tokenizer, seq_len, f.samples, "--calibration_files")
                if f.method in CALIBRATED else None)
  eval_rows = rows_of(held, tokenizer, seq_len, f.eval_samples, "--eval_files") if held else None
  params = jax.tree.map(np.asarray, params)

  t0 = time.perf_counter()
  found = None
  alphas: list[float] = []  # awq: the alpha chosen for each group of weights

  def by_gptq(weights, x):
    h = gptq.hessian(x)
    return {n: gptq.quantize(w, h, scheme, damp=f.damp, act_order=f.act_order)
            for n, w in weights.items()}

  def by_awq(weights, x):
    out, alpha = awq.quantize(weights, x, scheme)
    alphas.append(alpha)
    return out

  if f.method in CALIBRATED:
    log(f"{f.method}: {calib_rows.shape[0]} calibration rows of {seq_len} tokens")
    fn = {"gptq": by_gptq, "awq": by_awq, "smoothquant": lambda weights, x: smoothquant.quantize(
        weights, x, f.alpha, f.act_calibration, f.percentile)}[f.method]
    # the plain decoder (no remat): the calibration pass reads inputs out of each layer's body
    found = calibrated(mcfg, quant, model_handle(mcfg), params, calib_rows, log, f.method, fn)
  qparams = {**params, "layers": quant.quantize_layers(mcfg, params["layers"], found)}
  seconds = time.perf_counter() - t0
  settings = {"gptq": {"act_order": f.act_order, "damp": f.damp},
              "smoothquant": {"alpha": f.alpha, "act_calibration": f.act_calibration}}
  report = {**quant.to_json(), "method": f.method, **settings.get(f.method, {}),
            "seconds": round(seconds, 2), "bytes": stored_bytes(qparams),
            **({"awq_alphas": alphas} if alphas else {}),
            "float_bytes": int(sum(np.asarray(v).nbytes for v in jax.tree.leaves(params)))}
  if eval_rows is not None:
    qhandle = model_handle(mcfg, quant=quant)
    report.update(eval_rows=int(eval_rows.shape[0]), seq_len=seq_len,
                  perplexity_float=perplexity(handle, params, eval_rows),
                  perplexity=perplexity(qhandle, jax.tree.map(jnp.asarray, qparams), eval_rows))
  with export.staged(f.out) as tmp:  # a full disk leaves --out as it was
    hf.save_quantized(tmp, mcfg, quant, qparams)
    export.copy_tokenizer(f.workdir or f.hf, tmp)
    with open(os.path.join(tmp, "quantize_report.json"), "w") as fp:
      json.dump(report, fp, indent=1)
  return report


if __name__ == "__main__":
  define_flags()
  app.run(main)
