"""A recipe's demo eval files go with its demo training files: bring your own training files and
the run evaluates on your data, and says so."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from trainer import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("recipe", ["sft_chat", "sft_lora", "dpo"])
def test_own_training_files_drop_the_recipes_eval_files(recipe):
  config = importlib.import_module(f"configs.{recipe}").get_config()
  demo_eval = config.data.eval_files
  assert demo_eval.endswith("eval.jsonl")
  assert cli.own_training_files(config, ["--config.train.steps=3"]) is None
  assert config.data.eval_files == demo_eval  # the demo keeps its own eval set
  both = ["--config.data.train_files=mine.jsonl", "--config.data.eval_files=my_eval.jsonl"]
  assert cli.own_training_files(config, both) is None
  assert config.data.eval_files == demo_eval  # set by the command: the command's value
  assert cli.own_training_files(config, ["--config.data.train_files=mine.jsonl"]) == demo_eval
  assert config.data.eval_files == ""


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_sft_chat_on_own_file_evaluates_on_it(tmp_path):
  records = [{"messages": [{"role": "user", "content": f"Capital of land {i}?"},
                           {"role": "assistant", "content": f"City {i}"}]} for i in range(200)]
  path = tmp_path / "mine.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  proc = subprocess.run(
      [sys.executable, "-m", "trainer.main", "--config=configs/sft_chat.py",
       f"--config.data.train_files={path}", "--config.train.steps=2",
       "--config.data.tokenizer_vocab_size=300",
       "--config.train.eval_exact_match=4", f"--workdir={tmp_path / 'w'}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  data_line = next(line for line in proc.stdout.splitlines() if line.startswith("data: "))
  assert f"train {path}, eval 5% of the training files held out" in data_line, data_line
  assert "arith" not in data_line
  assert "not on the recipe's demo eval files" in proc.stdout
  held = int(data_line.split("eval_examples ")[1].split(",")[0])
  train = int(data_line.split("train_examples ")[1].split(",")[0])
  assert held + train == 200 and 0 < held < 20, data_line
