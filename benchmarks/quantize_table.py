"""Every post-training quantization method on one trained model: held-out perplexity against the
float model's and the bytes stored (BENCHMARKS.md "Quantization").

python benchmarks/quantize_table.py --workdir=/tmp/qmodel --out=/tmp/qtable

Each row is `python -m trainer.quantize --workdir=... --method=... [flags]` run in this process
(the same function), on the embedded corpus: its training split calibrates, its held-out split
is evaluated. Prints a markdown table; the reports and the host go to
benchmarks/results/quantize_table.json.
"""

from __future__ import annotations

import json
import os
import sys
import types

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import host  # noqa: E402
from trainer import quantize  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "the trained run")
_OUT = flags.DEFINE_string("out", "/tmp/qtable", "a folder for the quantized models")
_GROUP = flags.DEFINE_integer("group_size", 16, "int4, gptq and awq: inputs per scale")
_SAMPLES = flags.DEFINE_integer("samples", 128, "calibration rows")
_EVAL = flags.DEFINE_integer("eval_samples", 64, "held-out rows")

ROWS = [  # (label, flags)
    ("int8 per channel", dict(method="int8")),
    ("int8 asymmetric per channel", dict(method="int8_asym")),
    ("int4 RTN per channel", dict(method="int4", group_size=0)),
    ("int4 RTN groups", dict(method="int4")),
    ("int4 GPTQ per channel", dict(method="gptq", group_size=0)),
    ("int4 GPTQ groups", dict(method="gptq")),
    ("int4 GPTQ groups, act-order", dict(method="gptq", act_order=True)),
    ("int4 AWQ per channel", dict(method="awq", group_size=0)),
    ("int4 AWQ groups", dict(method="awq")),
    ("W8A8 without smoothing, absmax", dict(method="smoothquant", alpha=0.0)),
    ("W8A8 without smoothing, KL", dict(method="smoothquant", alpha=0.0, act_calibration="kl")),
    ("W8A8 SmoothQuant 0.5, absmax", dict(method="smoothquant")),
    ("W8A8 SmoothQuant 0.5, percentile 99.99", dict(method="smoothquant",
                                                    act_calibration="percentile")),
    ("W8A8 SmoothQuant 0.5, MSE", dict(method="smoothquant", act_calibration="mse")),
    ("W8A8 SmoothQuant 0.5, KL", dict(method="smoothquant", act_calibration="kl")),
]


def main(argv):
  del argv
  reports = []
  for label, settings in ROWS:
    f = dict(workdir=_WORKDIR.value, hf=None, step=None, out=os.path.join(_OUT.value, str(len(
        reports))), bits=4, group_size=_GROUP.value, act_order=False, damp=0.01, alpha=0.5,
        act_calibration="absmax", percentile=99.99, calibration_files="", eval_files="",
        samples=_SAMPLES.value, eval_samples=_EVAL.value, seq_len=0)
    if settings["method"] in ("int8", "int8_asym", "smoothquant"):
      f["group_size"] = None  # per channel
    f.update(settings)
    report = quantize.quantize(types.SimpleNamespace(**f))
    reports.append({"label": label, **report})
    print(f"{label}: {report['perplexity']:.3f}", file=sys.stderr, flush=True)
  first = reports[0]
  print(f"float: perplexity {first['perplexity_float']:.3f}, {first['float_bytes']} bytes; "
        f"{first['eval_rows']} held-out rows of {first['seq_len']} tokens\n")
  print("| method | perplexity | change | bytes | of float |")
  print("| --- | --- | --- | --- | --- |")
  for r in reports:
    print(f"| {r['label']} | {r['perplexity']:.3f} | {r['perplexity'] - r['perplexity_float']:+.3f}"
          f" | {r['bytes']:,} | {r['bytes'] / r['float_bytes']:.3f} |")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                      "quantize_table.json")
  with open(path, "w") as fp:
    json.dump({"host": host.host_info(), "workdir": _WORKDIR.value, "rows": reports}, fp,
              indent=1)


if __name__ == "__main__":
  app.run(main)
