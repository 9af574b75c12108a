"""What a model is (config.json "model": the ModelConfig) is kept apart from how it runs
("execution": remat, attention_impl, init_std): a run resumes under other execution choices with
no exception list, and a workdir written before the split (execution keys inside "model") still
resumes and exports."""

import json
import os

import pytest

import small_run
from trainer import export, train

STEPS = dict(log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0)


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_resume_under_other_execution_choices_from_an_old_config_json(tmp_path):
  whole = train.run(small_run.config(steps=6, **STEPS), str(tmp_path / "whole"))
  run = str(tmp_path / "run")
  train.run(small_run.config(steps=6, stop_after_steps=3, **STEPS), run)
  path = os.path.join(run, "config.json")
  with open(path) as f:
    resolved = json.load(f)
  assert resolved["execution"] == {"remat": "dots_no_batch", "attention_impl": "xla",
                                   "init_std": 0.02, "moe_impl": "dropless",
                                   "capacity_factor": 1.25, "grouped_matmul": "auto"}
  assert not set(resolved["execution"]) & set(resolved["model"])
  # as a run wrote it before the split: the execution choices among the model's keys
  resolved["model"].update(resolved.pop("execution"))
  with open(path, "w") as f:
    json.dump(resolved, f)

  other = small_run.config(steps=6, **STEPS)
  other.model.update(remat="full", attention_impl="pallas")
  out = train.run(other, run)
  with open(os.path.join(run, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
  assert steps == [1, 2, 3, 4, 5, 6]  # continued from the checkpoint at 3, not from scratch
  assert out["loss"] == pytest.approx(whole["loss"], rel=1e-4)
  with open(path) as f:
    assert json.load(f)["execution"]["remat"] == "full"

  # export reads both forms of config.json
  with open(path) as f:
    resolved = json.load(f)
  resolved["model"].update(resolved.pop("execution"))
  with open(path, "w") as f:
    json.dump(resolved, f)
  cfg, handle, params, step = export.load_run(run)
  assert step == 6 and handle.run.remat == "full" and handle.run.attention_impl == "pallas"
  assert cfg.model.remat == "full" and handle.cfg.d_model == 64
  assert "layers" in params
