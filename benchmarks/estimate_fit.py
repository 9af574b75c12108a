"""Refit the activation coefficients of trainer/memory.py (`ACTIVATIONS`) from the compiler.

For shapes around a small base (none of them the tiny or the medium config, on which
tests/test_estimate.py checks the result), compile the train step on one device and read the
temporaries of `memory_analysis()`; non-negative least squares over the per-token features of the model
gives each remat policy's counts. Prints them as Python, and each probe's fit.

python benchmarks/estimate_fit.py [--remat none,full]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
import scipy.optimize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import tiny  # noqa: E402
from trainer import estimate, memory  # noqa: E402

BASE = dict(d_model=192, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=512, vocab_size=1536)
BASE_TRAIN = dict(batch_size=12, seq_len=96)
PROBES = [  # (model changes, train changes): one factor at a time, two at once for the last
    ({}, {}), ({"d_model": 384, "n_heads": 12}, {}), ({"d_model": 384}, {}), ({"d_ff": 1024}, {}),
    ({}, {"seq_len": 192, "batch_size": 6}), ({}, {"seq_len": 384, "batch_size": 3}),
    ({"vocab_size": 6144}, {}), ({"n_layers": 6}, {}), ({"n_kv_heads": 6}, {}),
    ({"n_heads": 12, "n_kv_heads": 4}, {}), ({}, {"batch_size": 24}),
    ({"n_layers": 6, "d_ff": 1024}, {"seq_len": 192}),
]
FIELDS = ("grads", "d", "kv", "ff", "scores", "vocab", "outside")


def probe(remat: str, model: dict, train_over: dict):
  cfg = tiny.get_config()
  cfg.model.update(**{**BASE, **model, "remat": remat})
  cfg.train.update(**{**BASE_TRAIN, **train_over})
  cfg.mesh.update(data=1)
  est, (pl, mcfg, batch) = estimate.estimate(cfg, jax.devices()[:1])
  temp = estimate.compiled_bytes(pl, batch)["temporaries"]
  grads = est.bytes["gradients (+ update temporaries)"] / memory.ACTIVATIONS["none"].grads
  n, L = cfg.train.batch_size * cfg.train.seq_len, mcfg.n_layers
  # without remat (and saving the matmuls' outputs: dots) every layer keeps its tensors; with
  # full remat each keeps its input (the d column) and one layer's working set is live at a time
  per_layer = 1 if remat == "full" else L
  row = [grads, n * L * mcfg.d_model * 4]
  row += [n * per_layer * x * 4 for x in (mcfg.n_kv_heads * mcfg.head_dim, mcfg.d_ff,
                                          mcfg.n_heads * memory.score_keys(cfg.train.seq_len))]
  row += [n * mcfg.vocab_size * 4, n * mcfg.d_model * 4]
  return row, temp


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--remat", default="none,full,dots")
  args = ap.parse_args()
  for remat in args.remat.split(","):
    rows, temps = zip(*(probe(remat, m, t) for m, t in PROBES))
    a, y = np.array(rows), np.array(temps)
    coef, _ = scipy.optimize.nnls(a, y)  # counts of kept tensors are not negative
    fit = dict(zip(FIELDS, np.round(coef, 2)))
    if remat == "full":  # the d column is the kept layer inputs
      fit["kept"], fit["d"] = fit.pop("d"), 0.0
    print(f'    "{remat}": Coefficients(' + ", ".join(f"{k}={float(v)}" for k, v in fit.items())
          + "),")
    print(f"      fit / compiled per probe: {np.round(a @ coef / y, 3).tolist()}")


if __name__ == "__main__":
  main()
