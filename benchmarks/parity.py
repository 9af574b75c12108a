"""The parity figures the tests only bound, printed: how far our numbers are from the references.

1. Hugging Face import: for each family, the largest |our logits - transformers' logits| (tiny
   random models from tests/hf_models.py, eager attention), with xla and with pallas attention.
2. PEFT: the same against HF PEFT for LoRA, rsLoRA, DoRA, AdaLoRA, VeRA and IA3 (the cases of
   tests/test_peft.py, adapters randomised), and for prompt tuning, P-tuning and prefix tuning
   (tests/test_peft_prompt.py, PEFT's random initialisation).
3. Pallas against xla attention: configs/tiny.py trained 4 steps each, the largest relative
   difference between the logged losses.

python benchmarks/parity.py [families] [peft] [losses]   (default: all three)
"""

from __future__ import annotations

import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

import hf_models  # noqa: E402
import test_flash_attention  # noqa: E402
import test_hf  # noqa: E402
import test_peft  # noqa: E402
import test_peft_prompt  # noqa: E402
from models import hf  # noqa: E402
from models.config import Execution  # noqa: E402
from models import handle as handles  # noqa: E402


def hf_families():
  print("| family | xla attention | pallas attention | largest logit |")
  print("| --- | --- | --- | --- |")
  for family in hf_models.FAMILIES:
    folder = tempfile.mkdtemp()
    want = test_hf.hf_logits(hf_models.make(family, folder), test_hf.TOKENS)
    diffs = []
    for impl in ("xla", "pallas"):
      cfg, params = hf.load(folder)
      run = Execution(attention_impl=impl)
      ours = np.asarray(handles.model_handle(cfg, run=run).bind(params)(test_hf.TOKENS))
      diffs.append(np.abs(ours - want).max())
    print(f"| {family} | {diffs[0]:.1e} | {diffs[1]:.1e} | {np.abs(want).max():.1f} |",
          flush=True)


def peft_methods():
  print("| method | max abs difference to HF PEFT |")
  print("| --- | --- |")
  for case in test_peft.CASES:
    *_, want, got = test_peft.theirs_and_ours(case, tempfile.mkdtemp())
    print(f"| {case} | {np.abs(got - want).max():.1e} |", flush=True)
  for case in test_peft_prompt.CASES:
    *_, want, got = test_peft_prompt.theirs_and_ours(case, tempfile.mkdtemp())
    print(f"| {case} | {np.abs(got - want).max():.1e} |", flush=True)


def pallas_vs_xla_losses():
  losses = {impl: np.array(test_flash_attention.tiny_losses(impl, tempfile.mkdtemp()))
            for impl in ("xla", "pallas")}
  rel = np.abs(losses["pallas"] - losses["xla"]) / losses["xla"]
  print(f"configs/tiny.py, 4 steps: xla {np.round(losses['xla'], 5).tolist()}, largest relative "
        f"difference of pallas {rel.max():.1e}")


if __name__ == "__main__":
  parts = sys.argv[1:] or ["families", "peft", "losses"]
  for name, fn in (("families", hf_families), ("peft", peft_methods),
                   ("losses", pallas_vs_xla_losses)):
    if name in parts:
      fn()
