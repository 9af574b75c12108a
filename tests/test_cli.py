"""The command line: user errors are one line on stderr and exit code 2, never a traceback."""

import errno
import os
import pathlib
import subprocess
import sys

import pytest

from small_run import run_tool
from trainer import export
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, workdir):
  proc = subprocess.run([sys.executable, "-m", "trainer.main", *args, f"--workdir={workdir}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args,named", [
    (["--config.train.stepz=3"], "train.stepz"),
    (["--config.trainn.steps=3"], "trainn.steps"),
    (["--config.train.steps=abc"], "train.steps"),
    (["--config.train.steps=-1"], "train.steps"),
    (["--config.precision.compute_dtype=float8"], "precision.compute_dtype"),
    (["--config.model.remat=sometimes"], "remat"),
    (["--config.model.attention_impl=magic"], "attention_impl"),
    (["--config.model.attention_impl=cudnn"], "cudnn runs on NVIDIA GPUs only"),
    (["--config.model.attention_impl=pallas", "--config.mesh.data=2", "--config.mesh.sequence=4"],
     "use attention_impl=ring"),
    (["--config.model.n_kv_heads=3"], "n_kv_heads"),
    (["--config.mesh.data=3"], "mesh"),
    (["--config.mesh.expert=2"], "mesh.expert"),  # no expert layers to split
    (["--config.model.n_experts=-1"], "n_experts=-1 must be >= 0"),
    (["--config.model.n_experts=4", "--config.model.moe_impl=fast"], "moe_impl"),
    (["--config.model.n_experts=4", "--config.model.grouped_matmul=tokamax"],
     "model.grouped_matmul: tokamax is not installed"),
    (["--config.model.n_experts=4", "--config.model.router_bias_update_rate=-0.01"],
     "router_bias_update_rate=-0.01 must be >= 0"),
    (["--config.model.router_bias_update_rate=0.01"], "model.router_bias_update_rate"),  # no experts
    (["--config.model.n_experts=4", "--config.model.router_bias_update_rate=0.01",
      "--config.peft.method=lora"], "model.router_bias_update_rate"),
    (["--config.train.batch_size=12"], "train.batch_size"),  # 12 rows over 8 devices
    (["--config.train.grad_accum=3"], "train.grad_accum"),
    (["--config.train.seq_len=4096"], "train.seq_len"),
    (["--config.data.tokenizer=/nonexistent/tok.model"], "data.tokenizer"),
    (["--config.data.source=files", "--config.data.train_files=/nonexistent/*.txt"],
     "no data files match '/nonexistent/*.txt'"),
    (["--config.data.train_files=corpus.txt"], "data.source=files"),  # would be ignored
    (["--config=configs/nope.py"], "configs/nope.py"),
    (["--workdr=/tmp/x"], "workdr"),
])
def test_user_errors_exit_2_with_one_line(args, named, tmp_path):
  code, out, err = run_main(*args, workdir=str(tmp_path / "w"))
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert named in lines[0], lines[0]
  assert "Traceback" not in err


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  code, _, err = run_main("--config.train.steps=1", workdir=str(blocker / "sub"))
  assert code == 2 and "--workdir" in err and len(err.strip().splitlines()) == 1, err


def test_unreadable_tokenizer(tmp_path):
  bad = tmp_path / "tok.model"
  bad.write_bytes(b"not a sentencepiece model")
  code, _, err = run_main(f"--config.data.tokenizer={bad}", workdir=str(tmp_path / "w"))
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert f"cannot read a tokenizer from {bad}" in err and "Traceback" not in err


def test_verbose_shows_the_traceback(tmp_path):
  code, _, err = run_main("--config.train.steps=-1", "--verbose", workdir=str(tmp_path / "w"))
  assert code != 0 and "Traceback" in err and "train.steps" in err


@pytest.mark.parametrize("lines,extra,named", [
    (['{"messages": []}', "{oops"], [], "bad.jsonl:2"),
    (['{"content": "x"}'], [], "'messages'"),
    ([], [], "no records"),
    (['{"messages": []}'], ["--config.data.template=vicuna"], "data.template"),
    (['{"messages": []}'], ["--config.data.packing=tight"], "data.packing"),
])
def test_data_errors_exit_2_with_one_line(lines, extra, named, tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text("".join(l + "\n" for l in lines))
  code, _, err = run_main("--config=configs/sft_chat.py", f"--config.data.train_files={path}",
                          *extra, workdir=str(tmp_path / "w"))
  assert code == 2 and len(err.strip().splitlines()) == 1 and named in err, err


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A tiny Qwen2 model (128 positions) with its tokenizer; no chat template unless asked."""
  import hf_models
  folder = str(tmp_path_factory.mktemp("hf") / "qwen2")
  hf_models.make("qwen2", folder)
  hf_models.make_tokenizer("qwen2", folder)
  os.remove(os.path.join(folder, "chat_template.jinja"))
  return folder


@pytest.mark.parametrize("args,named", [
    (["--top_p=0"], "--top_p=0.0 must be in (0, 1]"),
    (["--top_p=1.5"], "--top_p=1.5 must be in (0, 1]"),
    (["--top_p=nan"], "--top_p=nan"),
    (["--temperature=-1"], "--temperature"),
    (["--top_k=-2"], "--top_k"),
    (["--max_new_tokens=0"], "--max_new_tokens"),
    (["--max_new_tokens=128"], "--max_new_tokens=128 must be in [1, 127]"),  # 128 positions
    (["--chat"], "--chat: --hf="),  # the folder has no chat template
    (["--chat", "--template=vicuna"], "--template=vicuna"),
])
def test_generate_flags_exit_2_with_one_line(args, named, hf_folder):
  code, out, err = run_tool("generate", f"--hf={hf_folder}", "--prompt=hi", *args)
  assert code == 2 and out == "", err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err


def test_export_out_that_is_a_file_or_unwritable(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  for out, named in ((blocker, f"--out={blocker} is a file"),
                     (blocker / "sub", f"--out={blocker / 'sub'} is not a writable folder")):
    code, _, err = run_tool("export", f"--workdir={tmp_path / 'run'}", f"--out={out}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0], err


def test_export_writes_all_of_out_or_none_of_it(tmp_path):
  """trainer.export and trainer.quantize write through export.staged: a write that fails (a full
  disk) leaves --out as it was; one that succeeds replaces --out's files of the same name."""
  (tmp_path / "config.json").write_text("old")
  with pytest.raises(UserError, match=f"--out={tmp_path}: writing failed .*left as it was"):
    with export.staged(str(tmp_path)) as tmp:
      (pathlib.Path(tmp) / "config.json").write_text("new")
      (pathlib.Path(tmp) / "model.safetensors").write_text("half")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  assert os.listdir(tmp_path) == ["config.json"] and (tmp_path / "config.json").read_text() == "old"
  with export.staged(str(tmp_path)) as tmp:
    (pathlib.Path(tmp) / "config.json").write_text("new")
    (pathlib.Path(tmp) / "model.safetensors").write_text("whole")
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  assert (tmp_path / "config.json").read_text() == "new"
