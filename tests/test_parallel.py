"""Parallelism on 8 simulated CPU devices: every strategy trains like one device does; ring
attention equals plain attention; tensor parallelism never gathers the logits; the compiler's
memory figures follow the ZeRO formulas; checkpoints move between meshes; multi-process runs."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel
from benchmarks import memory as memory_bench
from models import ModelConfig
from models.config import Execution
from parallel import ring_attention, rules as rules_lib
from models import handle as handles
from trainer import train
from trainer.validate import model_config

import small_run
from small_run import assert_same_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = dict(steps=3, log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0)

CASES = {
    **memory_bench.CASES,  # dp8, zero1 dp8, zero2 dp8, fsdp8, fsdp4 x tp2, dp2 x fsdp2 x tp2
    "dp2 x fsdp2 x tp2 + sp": dict(data=2, fsdp=2, tensor=2, strategy="fsdp_tp_sp"),
    "fsdp2 x sp4 ring": dict(data=1, fsdp=2, sequence=4, strategy="fsdp"),
}


def config(mesh, **train_overrides):
  c = small_run.config(**{**STEPS, **train_overrides})
  c.mesh.update(**mesh)
  if mesh.get("sequence", 1) > 1:
    c.model.attention_impl = "ring"
  return c


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  return train.run(config(dict(data=1)), str(tmp_path_factory.mktemp("one")),
                   devices=jax.devices()[:1])


# ZeRO-1/2 change only where optimizer state and gradients rest (checked by
# test_compiled_memory_follows_zero_formulas) and dp2 x fsdp2 x tp2 is the "+ sp" case without
# sequence parallelism: the default suite leaves them to `pytest -m slow` (its time budget).
# fsdp2 x sp4 ring: ring attention's own parity test (below) stays in the default suite.
SLOW_CASES = ("zero1 dp8", "zero2 dp8", "dp2 x fsdp2 x tp2", "fsdp2 x sp4 ring")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES
                                  else n for n in CASES])
def test_strategy_trains_like_one_device(name, one_device, tmp_path):
  out = train.run(config(CASES[name]), str(tmp_path))
  assert_same_training(out, one_device)
  mesh = CASES[name]
  shards = {"zero1": mesh.get("data", 1) * mesh.get("fsdp", 1),
            "zero2": mesh.get("data", 1) * mesh.get("fsdp", 1)}.get(mesh["strategy"],
                                                                   mesh.get("fsdp", 1))
  moment = out["state"]["opt_state"][1][0].mu["layers"]["mlp"]["gate"]  # adamw mu (embed dim 1)
  assert moment.sharding.shard_shape(moment.shape)[1] == moment.shape[1] // shards


@pytest.mark.parametrize("alibi", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_ring_attention_equals_plain_attention_with_gradients(alibi):
  """Ring attention over 4 sequence shards against the xla path: logits and gradients on
  packed rows; with ALiBi (its bias from each document's positions, inside the kernels) the
  single-device Pallas path too."""
  base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
              max_seq_len=64, rope_theta=10000.0, alibi=alibi)
  cfg = ModelConfig(**base)
  ring, xla = Execution(attention_impl="ring"), Execution()
  params = handles.init_params(handles.model_handle(cfg, run=xla), seed=1)
  b, t = 4, 32
  tokens = jax.random.randint(jax.random.PRNGKey(0), (b, t), 0, 50)
  # two packed documents per row, at varying split points
  split = np.array([[i < 10 + 3 * r for i in range(t)] for r in range(b)])
  segments = np.where(split, 1, 2).astype(np.int32)
  positions = np.where(split, np.arange(t), np.arange(t) - split.sum(1, keepdims=True)).astype(np.int32)
  order = ring_attention.zigzag_order(t, 4)

  def loss(params, run, order):
    logits = handles.model_handle(cfg, run=run).bind(params)(
        tokens[:, order], positions[:, order], segments[:, order])
    return jnp.sum(jnp.sin(logits)), logits

  ref_grad, ref_logits = jax.grad(loss, has_aux=True)(params, xla, np.arange(t))
  mesh = parallel.make_mesh(dict(data=1, fsdp=2, sequence=4))
  with parallel.activate(mesh, rules_lib.fsdp().activations):
    grad, logits = jax.jit(jax.grad(loss, has_aux=True), static_argnums=(1, 2))(
        params, ring, tuple(order))
  np.testing.assert_allclose(np.asarray(logits)[:, np.argsort(order)], ref_logits, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grad, ref_grad)
  if alibi:
    grad, logits = jax.jit(jax.grad(loss, has_aux=True), static_argnums=(1, 2))(
        params, Execution(attention_impl="pallas"), tuple(range(t)))
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grad,
                 ref_grad)


def test_zigzag_order_balances_the_causal_work():
  n, t = 4, 64
  order = ring_attention.zigzag_order(t, n)
  assert sorted(order) == list(range(t))
  work = [sum(int(q) + 1 for q in order[i * t // n:(i + 1) * t // n]) for i in range(n)]
  assert len(set(work)) == 1  # every device holds the same number of (query, key) pairs


def test_tensor_parallel_loss_never_gathers_the_logits():
  cfg = config(dict(data=1, fsdp=4, tensor=2, strategy="fsdp_tp"))
  vocab = 328  # a size no other dimension has
  mesh = parallel.make_mesh(dict(cfg.mesh))
  pl = train.plan(cfg, model_config(cfg, vocab), mesh)
  batch = train.abstract_batch(cfg, pl.batch_sharding)
  with parallel.activate(mesh, pl.rules):
    hlo = pl.train_step.lower(pl.abstract_state, batch).compile().as_text()
  gathered = re.findall(r"= \w+\[([\d,]*)\][^\n]*? all-gather\(", hlo)
  assert gathered, "expected FSDP all-gathers in the program"
  assert not [s for s in gathered if str(vocab) in s.split(",")], gathered


@pytest.mark.slow  # 45-85 s: run with `pytest -m slow` (keeps the default suite under 20 min)
def test_compiled_memory_follows_zero_formulas():
  cfg = small_run.config()
  rows = {name: memory_bench.measure(cfg, name, m, vocab_size=512)
          for name, m in memory_bench.CASES.items()}
  for name, r in rows.items():
    assert r["state_bytes_per_device"] == pytest.approx(r["formula_state_bytes"], rel=0.05), name
  fsdp8 = rows["fsdp8"]
  assert fsdp8["state_bytes_per_device"] <= fsdp8["state_bytes_unsharded"] / 8 * 1.05
  assert rows["zero2 dp8"]["temp_bytes_per_device"] < rows["zero1 dp8"]["temp_bytes_per_device"]


@pytest.mark.slow  # 45-85 s: run with `pytest -m slow` (keeps the default suite under 20 min)
def test_checkpoint_restores_into_another_mesh(tmp_path):
  steps = dict(steps=4, log_every=1, eval_every=0, checkpoint_every=0, sample_tokens=0)
  whole = train.run(config(dict(data=1, fsdp=8, strategy="fsdp"), **steps), str(tmp_path / "a"))
  train.run(config(dict(data=1, fsdp=8, strategy="fsdp"), stop_after_steps=2, **steps),
            str(tmp_path / "b"))
  resumed = train.run(config(dict(data=2, fsdp=4, strategy="fsdp"), **steps), str(tmp_path / "b"))
  assert resumed["step"] == 4
  assert_same_training(resumed, whole)
  gate = resumed["state"]["params"]["layers"]["mlp"]["gate"]
  assert gate.sharding.shard_shape(gate.shape)[1] == gate.shape[1] // 4


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_optimizer_offload_to_host_memory(tmp_path):
  plain = train.run(config(dict(data=8)), str(tmp_path / "a"))
  c = config(dict(data=8))
  c.mesh.offload_optimizer = True
  off = train.run(c, str(tmp_path / "b"))
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(off["state"]["opt_state"])}
  assert kinds == {"pinned_host"}
  assert {x.sharding.memory_kind for x in jax.tree.leaves(off["state"]["params"])} == {"device"}
  assert off["loss"] == pytest.approx(plain["loss"], rel=1e-6)


def test_custom_rules_override_the_preset():
  s = rules_lib.strategy("fsdp", "mlp=tensor, batch=data+fsdp")
  assert s.params["mlp"] == "tensor" and s.params["embed"] == "fsdp"
  assert s.activations["batch"] == ("data", "fsdp")
  with pytest.raises(ValueError, match="mesh.rules"):
    rules_lib.strategy("fsdp", "embedding=fsdp")


@pytest.mark.slow  # end-to-end: .ci/run runs the slow cases after the default suite
def test_two_processes_match_one_and_resume_across_them(tmp_path):
  workdir = str(tmp_path / "mh")
  common = ["--config=configs/tiny.py:smoke", f"--workdir={workdir}", "--config.train.steps=6",
            "--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.train.sample_tokens=0"]
  launch = [sys.executable, os.path.join(REPO, "launch", "local.py"), "--num_processes=2",
            "--devices_per_process=4", "--"]
  for extra in (["--config.train.stop_after_steps=3"], []):
    proc = subprocess.run(launch + common + extra, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed" in proc.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    two = {l["step"]: l["loss"] for l in map(json.loads, f) if "loss" in l}
  train.run(config(dict(data=-1), steps=6, log_every=1), str(tmp_path / "one"))
  with open(str(tmp_path / "one" / "metrics.jsonl")) as f:
    ref = {l["step"]: l["loss"] for l in map(json.loads, f) if "loss" in l}
  assert sorted(two) == list(range(1, 7))
  for step in range(1, 7):
    assert two[step] == pytest.approx(ref[step], rel=1e-5), step


def test_each_process_reads_only_its_share():
  from trainer.data import pipeline
  examples = [np.arange(i, i + 10 + i % 7, dtype=np.int32) for i in range(300)]
  rows = pipeline.PackedRows([(examples, [np.ones(len(e), np.float32) for e in examples])], [1.0],
                             seq_len=16, mode="concat", truncation="split", seed=3, shuffle=True,
                             group=64, stats={})
  whole = pipeline.batches(rows, 8)
  parts = [pipeline.batches(rows, 8, shard=(i, 2)) for i in range(2)]
  for step in range(5):
    rows = {tuple(r) for r in whole[step]["inputs"]}
    shares = [{tuple(r) for r in p[step]["inputs"]} for p in parts]
    assert len(shares[0]) == len(shares[1]) == 4 and shares[0] | shares[1] == rows


def test_offload_without_host_memory_says_so_in_one_line(monkeypatch, capsys):
  class Memory:
    kind = "device"

  class Device:
    def addressable_memories(self):
      return [Memory()]

  monkeypatch.setattr(train.jax, "devices", lambda: [Device()])
  c = small_run.config()
  c.mesh.offload_optimizer = True
  assert train.offload_kind(c) is None
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "mesh.offload_optimizer" in err[0] and "pinned_host" in err[0]


def test_cluster_environment_detection(monkeypatch):
  from parallel import distributed
  for var in ("SLURM_NTASKS", "SLURM_PROCID", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.cluster_environment() is None
  distributed.initialize()  # a single process: nothing to do
  monkeypatch.setenv("SLURM_NTASKS", "4")
  monkeypatch.setenv("SLURM_PROCID", "1")
  assert distributed.cluster_environment() == "slurm"
  with pytest.raises(ValueError, match="--num_processes"):
    distributed.initialize("127.0.0.1:1234")
