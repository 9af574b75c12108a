"""Write a trained model out of its workdir.

python -m trainer.export --workdir=DIR --format=hf|peft --out=DIR [--step=N] [--dtype=bfloat16]

--format=hf: a Hugging Face folder (config.json, safetensors sharded above 2 GiB, the tokenizer
files) that transformers' AutoModelForCausalLM loads; PEFT adapters are merged into the weights.
A run that started from a folder trainer/quantize.py wrote is written as such a folder again
(integers and scales), which trainer.generate --hf and model.init_from read.
--format=peft: the adapters alone (adapter_config.json + adapter_model.safetensors) for HF
PEFT's PeftModel.from_pretrained(original base, DIR); LoRA, rsLoRA, PiSSA, DoRA, VeRA, IA3.
--format=adapters: the adapters alone in the project's own folder (adapters.safetensors +
adapters.json, models/peft/saved.py), for every method PEFT has no format for (Houlsby adapters,
AdapterDrop, AdapterFusion, MAM, UniPELT) and the others: `trainer.generate --hf=BASE
--adapters=DIR` samples with it, and `peft.fusion_adapters` fuses such folders.
The checkpoint (latest, or --step) is restored onto this machine's devices, split over them
(FSDP), and written one tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

import parallel
from models import hf
from models import peft as peft_lib
from models.config import Execution, ModelConfig, split_fields
from models.handle import model_handle, param_shardings, stored_abstract
from models.peft import hf_format, saved
from models.quant import model as quant_model
from trainer import checkpoint as ckpt_lib
from trainer.data import tokenizer as tokenizer_lib
from trainer.errors import UserError

FORMATS = ("hf", "peft", "adapters")


def read_run(workdir: str, step: int | None = None):
  """(run config, ModelHandle, checkpoint folder, step) of a workdir's config.json and its
  newest checkpoint (or `step`), without reading the weights; the handle's `cfg` is the
  ModelConfig, its `peft` the adapters' description (or None)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"--workdir={workdir} has no config.json: not a training run's folder")
  with open(path) as f:
    resolved = json.load(f)
  # "model" is the ModelConfig and "execution" how it ran; a config.json written before the two
  # were apart has both in "model". The run config gets its model section back as users write it.
  fields, ran = split_fields(resolved["model"])
  run = Execution.from_dict(resolved.pop("execution", ran))
  stored = resolved.pop("quantized", None)
  resolved["model"] = {**fields, **run.to_dict()}
  cfg = ml_collections.ConfigDict(resolved)
  mcfg = ModelConfig.from_dict(fields)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not os.listdir(directory):  # (looking creates nothing)
    raise UserError(f"--workdir={workdir} has no checkpoints yet")
  checkpointer = ckpt_lib.Checkpointer(directory, keep=1000, async_save=False)
  steps = checkpointer.manager.all_steps()
  checkpointer.close()
  if not steps:
    raise UserError(f"--workdir={workdir} has no checkpoints yet")
  step = max(steps) if step is None else step
  if step not in steps:
    raise UserError(f"--step={step}: the checkpoints in {workdir} are at steps {sorted(steps)}")
  quant = quant_model.from_config(cfg.quant) if "quant" in cfg else None  # (older runs: none)
  if stored is not None:  # a run that started from a folder trainer/quantize.py wrote
    quant = quant_model.Quantized.from_json(stored)
  handle = model_handle(mcfg, peft_lib.Peft.from_config(cfg.peft, mcfg, cfg.train.steps), run,
                        quant)
  return cfg, handle, directory, step


def load_run(workdir: str, step: int | None = None):
  """(run config, ModelHandle, params, step) from a workdir's config.json and checkpoint (see
  `read_run`). Only the trained model's parameters are read, split over this machine's devices
  (FSDP)."""
  cfg, handle, directory, step = read_run(workdir, step)
  mesh = parallel.make_mesh({"data": 1, "fsdp": jax.device_count(), "tensor": 1, "sequence": 1,
                             "expert": 1})
  shardings = param_shardings(handle, mesh, parallel.strategy("fsdp", "").params)
  abstract = stored_abstract(handle, cfg.precision.param_dtype, shardings)
  return cfg, handle, ckpt_lib.read_params(directory, step, abstract), step


def prepare_out(out: str) -> None:
  """--out made (or found) a writable folder before the checkpoint is read: a file in the way or
  a folder without write permission is one line, not a traceback after the restore."""

  try:
    os.makedirs(out, exist_ok=True)
    probe = os.path.join(out, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except FileExistsError:
    raise UserError(f"--out={out} is a file; give a folder to write") from None
  except OSError as e:
    raise UserError(f"--out={out} is not a writable folder: {e.strerror}") from None


@contextlib.contextmanager
def staged(out: str):
  """A hidden folder inside --out to write into; at the end its files replace --out's. A full
  disk or a quota mid-write leaves --out as it was and is one line (UserError), not a traceback
  over half-written files."""
  tmp = tempfile.mkdtemp(prefix=".writing-", dir=out)
  try:
    yield tmp
    for name in os.listdir(tmp):
      os.replace(os.path.join(tmp, name), os.path.join(out, name))
  except OSError as e:
    raise UserError(f"--out={out}: writing failed ({e.strerror or e}); the folder was left as it "
                    "was") from None
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer(workdir: str, out: str) -> list[str]:
  """The run's tokenizer files, as transformers' AutoTokenizer reads them. A run's own
  SentencePiece model gets a tokenizer_config.json with `add_bos_token`, as the run trained:
  every text began with BOS."""
  copied = []
  for name in ("tokenizer.json", "tokenizer.model", *tokenizer_lib.HFTokenizer.FILES):
    if os.path.exists(os.path.join(workdir, name)):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(out, name))
      copied.append(name)
  if "tokenizer.model" in copied and "tokenizer_config.json" not in copied:
    tok = tokenizer_lib.Tokenizer.load(os.path.join(workdir, "tokenizer.model"))
    piece = tok.sp.id_to_piece
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tok.bos_id),
                 "eos_token": piece(tok.eos_id), "add_bos_token": True, "add_eos_token": False,
                 "add_prefix_space": False, "legacy": False}, f, indent=1)
    copied.append("tokenizer_config.json")
  return copied


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  try:
    if not flags.FLAGS.workdir or not flags.FLAGS.out:
      raise UserError("--workdir and --out are required")
    prepare_out(flags.FLAGS.out)
    cfg, handle, params, step = load_run(flags.FLAGS.workdir, flags.FLAGS.step)

    dtype = jnp.dtype(flags.FLAGS.dtype or cfg.precision.param_dtype)
    with staged(flags.FLAGS.out) as tmp:
      if flags.FLAGS.format in ("peft", "adapters") and handle.peft is not None and \
          handle.peft.restart_every:
        raise UserError(f"--format={flags.FLAGS.format}: ReLoRA merged its adapters into the "
                        "base weights as it trained; export the whole model with --format=hf")
      if flags.FLAGS.format == "adapters":
        if handle.peft is None or "peft" not in params:
          raise UserError("--format=adapters needs a run with adapters (peft.method other than "
                          "none, bitfit and lisa); use --format=hf for the whole model")
        adapters = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params["peft"])
        files = saved.write(tmp, cfg.peft.to_dict(), handle.cfg.to_dict(), adapters, dtype)
      elif flags.FLAGS.format == "peft":
        if handle.peft is None or handle.peft.method not in hf_format.METHODS:
          raise UserError(f"--format=peft needs a run with peft.method one of "
                          f"{', '.join(hf_format.METHODS)}; use --format=hf for the whole model, "
                          "or --format=adapters for the adapters in the project's own folder")
        if handle.cfg.family in hf_format.FUSED_FAMILIES:
          raise UserError(f"--format=peft: {handle.cfg.family} fuses q, k and v into one "
                          "matrix, which PEFT adapts as one; merge the adapters with --format=hf "
                          "instead")
        files = hf_format.write(tmp, handle.peft, params, dtype)
      else:
        if handle.peft is not None and (handle.peft.method in peft_lib.ACTIVATION_METHODS
                                        or handle.peft.prompt is not None):
          raise UserError(f"--format=hf: peft.method={handle.peft.method} acts on activations "
                          "(bottleneck adapters, gates, virtual tokens), which no Hugging Face "
                          "weights can hold; export the adapters with --format=adapters"
                          + (" or --format=peft" if handle.peft.method in hf_format.METHODS
                             else ""))
        model_params = handle.peft.merge(params) if handle.peft is not None else params
        try:
          if handle.integers is not None:  # a run from a quantized folder
            files = hf.save_quantized(tmp, handle.cfg, handle.quant, model_params)
          else:
            files = hf.save(tmp, handle.cfg, model_params, dtype)
        except hf.UnsupportedModel as e:  # "family=llama cannot hold n_experts=8: ..."
          raise UserError(f"--format=hf: model.{e}") from None
      files += copy_tokenizer(flags.FLAGS.workdir, tmp)
    print(f"wrote step {step} of {flags.FLAGS.workdir} to {flags.FLAGS.out}: {', '.join(files)}",
          file=sys.stderr)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _define_flags():
  """Only when run as a program: the CLIs share flag names."""
  flags.DEFINE_string("workdir", None, "the training run's folder")
  flags.DEFINE_enum("format", "hf", FORMATS, "what to write")
  flags.DEFINE_string("out", None, "folder to write")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "weight dtype (default: the run's parameter dtype)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
