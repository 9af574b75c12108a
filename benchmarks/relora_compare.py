"""Full training vs LoRA vs ReLoRA on the same compute, from scratch (issue 29; the ReLoRA
paper's setting): a full-rank warm start of --warm steps, then --steps more of each method from
it, the held-out loss every --eval_every steps.

python benchmarks/relora_compare.py --recipe=configs/medium.py --warm=500 --steps=1500 \\
    --workdir=/tmp/relora_cmp --plot=benchmarks/results/relora_compare.png

Each run is `python -m trainer.main`'s run (trainer.train.run) in this process:
  full    the warm start's run, continued for --steps more steps (every weight trains);
  lora    from the warm start's weights (exported as a folder), rank --rank on every linear;
  relora  the same adapters, merged and restarted every --relora_every steps (jagged schedule,
          --relora_warmup, moments pruned by --relora_prune).
Prints a markdown table (held-out loss at the end and trainable parameters); the curves and
the host go to benchmarks/results/relora_compare.json, and with --plot to a PNG (matplotlib).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import host  # noqa: E402
from models import hf  # noqa: E402
from trainer import cli, export, train  # noqa: E402

_RECIPE = flags.DEFINE_string("recipe", "configs/medium.py", "the recipe (its model, data)")
_WARM = flags.DEFINE_integer("warm", 500, "full-rank steps before the methods split")
_STEPS = flags.DEFINE_integer("steps", 1500, "steps of each method after the warm start")
_EVAL = flags.DEFINE_integer("eval_every", 100, "steps between held-out losses")
_RANK = flags.DEFINE_integer("rank", 128, "LoRA and ReLoRA rank")
_EVERY = flags.DEFINE_integer("relora_every", 500, "ReLoRA: steps between merges")
_RWARM = flags.DEFINE_integer("relora_warmup", 50, "ReLoRA: warmup steps after each merge")
_PRUNE = flags.DEFINE_float("relora_prune", 0.99, "ReLoRA: share of the moments pruned")
_LR = flags.DEFINE_float("adapter_lr", 0.0, "LoRA and ReLoRA learning rate (0: the recipe's)")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/relora_cmp", "a folder for the runs")
_PLOT = flags.DEFINE_string("plot", "", "a PNG of the held-out loss curves")
_OUT = flags.DEFINE_string("out", "benchmarks/results/relora_compare.json", "the JSON")
_BATCH = flags.DEFINE_integer("batch_size", 0, "sequences per step (0: the recipe's)")
_SEQ = flags.DEFINE_integer("seq_len", 0, "tokens per sequence (0: the recipe's)")


def curve(workdir: str) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


def config(**train):
  c = cli.load_recipe(_RECIPE.value)
  c.train.update(eval_every=_EVAL.value, checkpoint_every=_EVAL.value * 5, sample_tokens=0,
                 **train)
  if _BATCH.value:
    c.train.batch_size = _BATCH.value
  if _SEQ.value:
    c.train.seq_len = _SEQ.value
  return c


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint it touches at INFO
  root = _WORKDIR.value
  total = _WARM.value + _STEPS.value
  # the warm start, then full training goes on in the same run (one schedule over all steps)
  full = config(steps=total, stop_after_steps=_WARM.value)
  train.run(full, os.path.join(root, "full"))
  folder = os.path.join(root, "warm_hf")
  _, handle, params, _ = export.load_run(os.path.join(root, "full"), _WARM.value)
  hf.save(folder, handle.cfg, params)
  export.copy_tokenizer(os.path.join(root, "full"), folder)
  results = {}
  out = train.run(config(steps=total), os.path.join(root, "full"))
  results["full"] = dict(curve=curve(os.path.join(root, "full")), trainable=None,
                         eval_loss=out["eval_loss"])
  for name, peft in (("lora", dict(method="lora")),
                     ("relora", dict(method="relora", relora_every=_EVERY.value,
                                     relora_warmup=_RWARM.value, relora_prune=_PRUNE.value))):
    c = config(steps=_STEPS.value, warmup_steps=min(_RWARM.value, _STEPS.value // 10),
               **({"lr": _LR.value} if _LR.value else {}))
    c.model.init_from = f"hf:{folder}"
    c.peft.update(rank=_RANK.value, alpha=float(2 * _RANK.value), targets="all-linear", **peft)
    out = train.run(c, os.path.join(root, name))
    steps = [(s + _WARM.value, loss) for s, loss in curve(os.path.join(root, name))]
    results[name] = dict(curve=steps, eval_loss=out["eval_loss"])
  print(f"{_RECIPE.value}: {_WARM.value} full-rank steps, then {_STEPS.value} of each\n")
  print("| method | held-out loss at the end |")
  print("| --- | --- |")
  for name, r in results.items():
    print(f"| {name} | {r['eval_loss']:.4f} |")
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump({"host": host.host_info(), "config": _RECIPE.value, "warm": _WARM.value,
               "steps": _STEPS.value, "rank": _RANK.value,
               "batch_size": _BATCH.value or None, "seq_len": _SEQ.value or None, "relora_every": _EVERY.value,
               "results": results}, f, indent=1)
  if _PLOT.value:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, r in results.items():
      ax.plot(*zip(*r["curve"]), label=name)
    ax.axvline(_WARM.value, color="grey", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(_PLOT.value, dpi=100)


if __name__ == "__main__":
  app.run(main)
