"""End to end: the job learns, writes its workdir, and resumes bit for bit."""

import json
import os
import struct

import jax
import numpy as np
import pytest

from trainer import train

import small_run


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_tiny_run_learns_and_fills_its_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  out = train.run(small_run.config(steps=40), workdir)
  lines = read_metrics(workdir)
  train_lines = [l for l in lines if "loss" in l]
  for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
    assert all(key in l for l in train_lines), key
  assert [l["step"] for l in train_lines] == list(range(5, 41, 5))
  assert [l["step"] for l in lines if "eval_loss" in l] == [20, 40]
  first, final = train_lines[0]["loss"], train_lines[-1]["loss"]
  assert final < first - 1.0, (first, final)  # from ~ln(512)=6.2 down
  assert out["eval_loss"] < 0.9 * np.log(512)
  assert train_lines[-1]["tokens_per_sec"] > 0 and 0 < train_lines[-1]["mfu"] < 1
  with open(os.path.join(workdir, "config.json")) as f:
    resolved = json.load(f)
  assert resolved["model"]["vocab_size"] == 512 and resolved["model"]["head_dim"] == 16
  assert resolved["mesh"]["data"] == jax.device_count()
  assert os.path.getsize(os.path.join(workdir, "tokenizer.model")) > 0
  assert tensorboard_scalars(workdir) == {
      (l["step"], k): pytest.approx(v, rel=1e-6) for l in lines for k, v in l.items() if k != "step"}
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]


def tensorboard_scalars(workdir):
  """(step, tag) -> value from the run's event files, read with tensorboardX's protobuf classes
  and CRC-32C (an independent reader), every record's checksums verified."""
  from tensorboardX.crc32c import crc32c
  from tensorboardX.proto.event_pb2 import Event
  masked = lambda b: (((crc32c(b) >> 15) | (crc32c(b) << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  logdir = os.path.join(workdir, "tensorboard")
  (name,) = os.listdir(logdir)
  data, out, at = open(os.path.join(logdir, name), "rb").read(), {}, 0
  while at < len(data):
    header, (crc_header,) = data[at:at + 8], struct.unpack("<I", data[at + 8:at + 12])
    (n,) = struct.unpack("<Q", header)
    body, (crc_body,) = data[at + 12:at + 12 + n], struct.unpack("<I", data[at + 12 + n:at + 16 + n])
    assert crc_header == masked(header) and crc_body == masked(body)
    event = Event.FromString(body)
    if at == 0:
      assert event.file_version == "brain.Event:2"
    out.update({(event.step, v.tag): v.simple_value for v in event.summary.value})
    at += 16 + n
  return out


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_stopped_and_resumed_run_is_bit_identical(tmp_path):
  cfg = dict(steps=8, log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0)
  whole = train.run(small_run.config(**cfg), str(tmp_path / "whole"))
  split_dir = str(tmp_path / "split")
  part = train.run(small_run.config(stop_after_steps=3, **cfg), split_dir)
  assert part["step"] == 3
  resumed = train.run(small_run.config(**cfg), split_dir)
  assert resumed["step"] == 8
  assert resumed["loss"] == whole["loss"]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               resumed["state"], whole["state"])
  losses = lambda d: [(l["step"], l["loss"]) for l in read_metrics(d) if "loss" in l]
  assert losses(split_dir) == losses(str(tmp_path / "whole"))


def test_workdir_of_another_model_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  train.run(small_run.config(steps=2, sample_tokens=0), workdir)
  cfg = small_run.config(steps=4)
  cfg.model.d_model = 96
  try:
    train.run(cfg, workdir)
  except train.UserError as e:
    assert "model.d_model" in str(e)
  else:
    raise AssertionError("expected a UserError")
