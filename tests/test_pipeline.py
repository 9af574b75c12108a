"""Pipeline parallelism (parallel/pipeline.py) on 8 simulated CPU devices: the schedule tables
move every microbatch through every chunk in order (checked by a numpy executor of the table),
1f1b holds at most `stages` inputs; 3 pipelined training steps equal the unpipelined run for
each schedule, with fsdp and tensor parallelism, LoRA, SFT, DPO and remat; checkpoints move
between pipelined and unpipelined layouts; bad configs are refused in one line."""

import itertools

import jax
import numpy as np
import pytest

import small_run
from small_run import assert_same_training
from parallel.pipeline import BWD, BWD_LAST, FWD, IDLE, Pipeline, build_table, chunk_order
from trainer import train
from trainer.errors import UserError

STEPS = dict(steps=3, log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def execute(table, S, R):
  """Runs a table with numbers instead of activations: chunk c adds c + 1 to what flows
  forward; a backward sends back the index of its chunk. Checks that every forward and backward
  reads what its schedule needs, and returns {(microbatch, chunk): slot} of the backwards and
  the forwards' count."""
  inputs = np.full((S, table.inputs), np.nan)
  cots = np.full((S, table.cotangents), np.nan)
  msg_act, msg_cot = np.zeros(S), np.zeros(S)
  embed = lambda m: 1000.0 * m
  expect_in = lambda m, c: embed(m) + sum(range(1, c + 1))  # the input of chunk c
  backwards, forwards = {}, 0
  for t in range(table.slots):
    send_act, send_cot = np.zeros(S), np.zeros(S)
    for s in range(S):
      if table.store_act[t, s] >= 0:
        inputs[s, table.store_act[t, s]] = msg_act[s]
      if table.store_cot[t, s] >= 0:
        cots[s, table.store_cot[t, s]] = msg_cot[s]
      if table.f_kind[t, s] == FWD:
        m, r = table.f_micro[t, s], table.f_repeat[t, s]
        c = r * S + s
        x = embed(m) if table.f_src[t, s] < 0 else inputs[s, table.f_src[t, s]]
        assert x == expect_in(m, c), (t, s, m, r)
        assert (table.f_src[t, s] < 0) == (c == 0)
        send_act[s] = x + c + 1
        forwards += 1
      if table.b_kind[t, s] != IDLE:
        m, r = table.b_micro[t, s], table.b_repeat[t, s]
        c = r * S + s
        x = embed(m) if table.b_src[t, s] < 0 else inputs[s, table.b_src[t, s]]
        assert x == expect_in(m, c), (t, s, m, r)
        assert (table.b_kind[t, s] == BWD_LAST) == (c == S * R - 1)
        if table.b_kind[t, s] == BWD:
          assert cots[s, table.b_cot[t, s]] == 1000.0 * m + c + 1, (t, s, m, r)
        assert (m, c) not in backwards
        backwards[(m, c)] = t
        send_cot[s] = 1000.0 * m + c
    msg_act = np.roll(send_act, 1)  # stage s receives what s - 1 sent
    msg_cot = np.roll(send_cot, -1)
  return backwards, forwards


CASES = ([("gpipe", s, m, 1) for s, m in itertools.product((2, 3, 4), (1, 2, 8))]
         + [("circular", s, m, r) for s, m, r in itertools.product((2, 4), (4, 8), (2, 3))]
         + [("1f1b", s, m, 1) for s, m in itertools.product((2, 4, 8), (1, 3, 8, 16))])


@pytest.mark.parametrize("schedule,S,M,R", CASES)
def test_tables_move_every_microbatch_through_every_chunk(schedule, S, M, R):
  table = build_table(Pipeline(S, schedule, M, R))
  backwards, forwards = execute(table, S, R)
  assert sorted(backwards) == [(m, c) for m in range(M) for c in range(S * R)]
  assert forwards == M * (S * R - 1)  # every chunk's forward but the last's (its backward's)
  # a chunk's backward follows the backward of the chunk after it
  for (m, c), t in backwards.items():
    if c < S * R - 1:
      assert backwards[(m, c + 1)] < t
  if schedule == "1f1b":
    assert table.inputs <= S  # at most `stages` microbatches in flight, however many
  else:
    assert table.inputs >= M  # the last stage holds every microbatch's input


def test_1f1b_holds_fewer_inputs_and_gpipe_bubble_shrinks_with_microbatches():
  gpipe = [build_table(Pipeline(4, "gpipe", m)) for m in (4, 8, 16)]
  one = [build_table(Pipeline(4, "1f1b", m)) for m in (4, 8, 16)]
  assert [t.inputs for t in gpipe] == [4, 8, 16]
  assert [t.inputs for t in one] == [4, 4, 4]
  bubbles = [t.bubble() for t in gpipe]
  assert bubbles[0] > bubbles[1] > bubbles[2]
  # GPipe's (stages - 1) / (microbatches + stages - 1), with the last stage's waiting slots
  for t, m in zip(gpipe, (4, 8, 16)):
    assert abs(t.bubble() - 3 / (m + 3)) < 0.05
  circular = build_table(Pipeline(4, "circular", 8, 2))
  assert circular.bubble() < gpipe[1].bubble()


def test_circular_puts_each_stages_chunks_together():
  order = chunk_order(Pipeline(2, "circular", 4, 2), 8)
  # chunks of 2 layers: stage 0 holds chunks 0 and 2, stage 1 chunks 1 and 3
  assert order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
  assert chunk_order(Pipeline(2, "gpipe", 4), 8) is None


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def config(mesh=None, n_layers=4, **train_overrides):
  c = small_run.config(**{**STEPS, **train_overrides})
  c.model.n_layers = n_layers
  c.mesh.update(**{"data": 1, **(mesh or {})})
  return c


def devices(c):
  return jax.devices()[:c.mesh.stage * c.mesh.fsdp * c.mesh.tensor * max(c.mesh.data, 1)]


@pytest.fixture(scope="module")
def unpipelined(tmp_path_factory):
  runs = {}

  def get(n_layers):
    if n_layers not in runs:
      c = config(n_layers=n_layers)
      runs[n_layers] = train.run(c, str(tmp_path_factory.mktemp("one")), devices=devices(c))
    return runs[n_layers]
  return get


def pipelines():
  """Each schedule with stage 2 and stage 4, alone, with fsdp 2 and with tensor 2 (circular:
  2 chunks per stage)."""
  out = {}
  for schedule, stage, extra in itertools.product(("gpipe", "circular", "1f1b"), (2, 4),
                                                  ("", "fsdp", "tensor")):
    mesh = dict(stage=stage, pipeline_schedule=schedule)
    if schedule == "circular":
      mesh["pipeline_repeats"] = 2
    if schedule != "gpipe":
      mesh["microbatches"] = 4  # 2 sequences each (gpipe: as many as stages)
    if extra == "fsdp":
      mesh.update(fsdp=2, strategy="fsdp")
    elif extra == "tensor":
      mesh.update(tensor=2, strategy="fsdp_tp")
    out[f"{schedule} stage {stage}" + (f" x {extra} 2" if extra else "")] = mesh
  return out


PIPELINES = pipelines()
# the default suite keeps one case of each schedule and axis (its time budget); `pytest -m slow`
# runs the rest
DEFAULT = ("gpipe stage 2", "circular stage 2", "1f1b stage 2 x fsdp 2", "1f1b stage 4 x tensor 2")


@pytest.fixture
def pipelined(monkeypatch):
  """Counts the train steps traced through parallel/pipeline.py's `run`."""
  from parallel import pipeline
  calls = []
  real = pipeline.run

  def spy(p, *args):
    calls.append(p)
    return real(p, *args)
  monkeypatch.setattr(pipeline, "run", spy)
  return calls


@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PIPELINES])
def test_pipelined_steps_equal_the_unpipelined_run(name, unpipelined, tmp_path, pipelined):
  mesh = PIPELINES[name]
  n_layers = 8 if mesh.get("pipeline_repeats", 1) * mesh["stage"] > 4 else 4
  ref = unpipelined(n_layers)
  assert not pipelined
  c = config(mesh, n_layers)
  out = train.run(c, str(tmp_path), devices=devices(c))
  assert [p.schedule for p in pipelined] == [mesh.get("pipeline_schedule", "gpipe")]
  assert_same_training(out, ref)
  gate = out["state"]["params"]["layers"]["mlp"]["gate"]  # the layers split over the stages
  assert gate.sharding.shard_shape(gate.shape)[0] == n_layers // mesh["stage"]
  moment = out["state"]["opt_state"][1][0].mu["layers"]["mlp"]["gate"]
  assert moment.sharding.shard_shape(moment.shape)[0] == n_layers // mesh["stage"]


def objective_config(kind, mesh, tmp_path):
  c = config(mesh)
  if kind == "lora":
    c.peft.update(method="lora", rank=4, alpha=8.0)
  elif kind == "remat":
    c.model.remat = "full"
  elif kind == "sft":
    c.train.update(objective="sft", seq_len=64)
    c.data.update(source="files", format="chat", template="chatml",
                  train_files="data/arith_chat/train.jsonl",
                  eval_files="data/arith_chat/eval.jsonl", tokenizer_vocab_size=400)
  elif kind == "dpo":
    c.train.update(objective="dpo", seq_len=64)
    c.dpo.precompute_ref = True
    with open("data/arith_pref/train.jsonl") as f, open(tmp_path / "few.jsonl", "w") as out:
      out.writelines(f.readlines()[:32])
    c.data.update(source="files", format="preference", template="chatml",
                  train_files=str(tmp_path / "few.jsonl"),
                  eval_files="data/arith_pref/eval.jsonl", tokenizer_vocab_size=400)
  return c


@pytest.mark.parametrize("kind", ["lora"] + [pytest.param(k, marks=pytest.mark.slow)
                                            for k in ("dpo", "sft", "remat")])
def test_objectives_and_peft_run_pipelined(kind, tmp_path, pipelined):
  ref_c = objective_config(kind, {}, tmp_path)
  ref = train.run(ref_c, str(tmp_path / "one"), devices=devices(ref_c))
  c = objective_config(kind, dict(stage=2, pipeline_schedule="1f1b", microbatches=4), tmp_path)
  out = train.run(c, str(tmp_path / "pp"), devices=devices(c))
  assert len(pipelined) == 1
  assert_same_training(out, ref)


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_checkpoints_move_between_pipelined_and_unpipelined_layouts(tmp_path):
  steps = dict(steps=4)
  whole = train.run(config(dict(stage=4), **steps), str(tmp_path / "a"), devices=jax.devices()[:4])
  # stage 4 -> stage 1 x fsdp 4 -> stage 4
  train.run(config(dict(stage=4), stop_after_steps=2, **steps), str(tmp_path / "b"),
            devices=jax.devices()[:4])
  train.run(config(dict(fsdp=4, strategy="fsdp"), stop_after_steps=1, **steps),
            str(tmp_path / "b"), devices=jax.devices()[:4])
  resumed = train.run(config(dict(stage=4, pipeline_schedule="1f1b"), **steps),
                      str(tmp_path / "b"), devices=jax.devices()[:4])
  assert resumed["step"] == 4
  assert_same_training(resumed, whole)


@pytest.mark.parametrize("mesh,key", [
    (dict(stage=4), "mesh.stage"),  # 2 layers (smoke) do not split into 4 stages
    (dict(stage=2, pipeline_schedule="circular", pipeline_repeats=2), "mesh.stage"),
    (dict(stage=2, pipeline_schedule="zigzag"), "mesh.pipeline_schedule"),
    (dict(stage=2, pipeline_repeats=2), "mesh.pipeline_repeats"),
    (dict(stage=2, microbatches=3), "mesh.microbatches"),
    (dict(stage=2, pipeline_schedule="circular", pipeline_repeats=1, microbatches=1),
     "mesh.microbatches"),
])
def test_bad_pipeline_configs_are_refused_in_one_line(mesh, key, tmp_path):
  c = config(mesh, n_layers=2)
  with pytest.raises(UserError, match=key) as e:
    train.run(c, str(tmp_path), devices=devices(c))
  assert "\n" not in str(e.value)
  if key == "mesh.stage" and mesh["stage"] == 4:
    assert "2 layers" in str(e.value) and "4 equal" in str(e.value)


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_two_processes_with_the_stages_across_them_match_one(tmp_path):
  """launch/local.py: 2 processes of 2 devices, mesh stage 2 x data 2: stage 0 lives in one
  process, stage 1 in the other, so every activation and gradient between them crosses."""
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / "mh")
  overrides = ["--config.model.n_layers=4", "--config.mesh.stage=2", "--config.mesh.data=2",
               "--config.mesh.pipeline_schedule=1f1b", "--config.train.steps=3",
               "--config.train.log_every=1", "--config.train.eval_every=0",
               "--config.train.checkpoint_every=0", "--config.train.sample_tokens=0"]
  proc = subprocess.run([sys.executable, os.path.join(repo, "launch", "local.py"),
                         "--num_processes=2", "--devices_per_process=2", "--",
                         "--config=configs/tiny.py:smoke", f"--workdir={workdir}", *overrides],
                        cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    two = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
  c = config(dict(data=2))
  train.run(c, str(tmp_path / "one"), devices=jax.devices()[:2])
  with open(tmp_path / "one" / "metrics.jsonl") as f:
    one = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
  assert sorted(two) == [1, 2, 3]
  for step in (1, 2, 3):
    assert two[step] == pytest.approx(one[step], rel=1e-5), step
