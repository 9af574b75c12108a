"""The launchers in launch/: their dry-runs print exactly what they would run.

No cluster here, so each launcher runs as a user would call it, with --dry_run, and the printed
commands or manifest are checked against what SLURM, gcloud, Kubernetes and trainer.main expect.
"""

import os
import shlex
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER_ARGS = ["--config=configs/tiny.py", "--workdir=/shared/run dir"]  # a space, to quote

sys.path.insert(0, os.path.join(REPO, "launch"))
import slurm  # noqa: E402


def launch(name, *args, env=None):
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", name), *args],
                       capture_output=True, text=True, env=env, cwd="/", timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout


@pytest.mark.parametrize("hostlist,hosts", [
    ("node7", ["node7"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[8-10],login1", ["a8", "a9", "a10", "login1"]),
    ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
])
def test_slurm_hostlist_expands_like_scontrol(hostlist, hosts):
  assert slurm.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu[a-b]"])
def test_slurm_hostlist_rejects_malformed_lists(bad):
  with pytest.raises(ValueError):
    slurm.expand_hostlist(bad)


@pytest.mark.parametrize("per,tasks_per_node", [("node", 1), ("gpu", 4)])
def test_slurm_batch_script(per, tasks_per_node):
  script = launch("slurm.py", "--nodes=3", "--gpus_per_node=4", f"--per={per}",
                  "--partition=a100", "--venv=/shared/venv", "--dry_run", "--", *TRAINER_ARGS)
  lines = script.splitlines()
  assert lines[0] == "#!/bin/bash"
  directives = dict(line.split()[1].partition("=")[::2] for line in lines
                    if line.startswith("#SBATCH"))
  assert directives["--nodes"] == "3" and directives["--gpus-per-node"] == "4"
  assert directives["--ntasks-per-node"] == str(tasks_per_node)
  assert directives["--partition"] == "a100" and "--exclusive" in directives
  assert "source /shared/venv/bin/activate" in lines
  srun = shlex.split(lines[-1])
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "python"]
  assert srun[3] == os.path.join(REPO, "launch", "slurm.py") and "--task" in srun
  assert f"--per={per}" in srun
  assert srun[srun.index("--") + 1:] == TRAINER_ARGS
  check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
  assert check.returncode == 0, check.stderr  # valid shell


@pytest.mark.parametrize("per", ["node", "gpu"])
def test_slurm_task_reads_its_place_from_slurm(per):
  env = dict(os.environ, SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NTASKS="8", SLURM_PROCID="5",
             SLURM_LOCALID="1")
  cmd = shlex.split(launch("slurm.py", "--task", f"--per={per}", "--port=2222", "--dry_run",
                           "--", *TRAINER_ARGS, env=env))
  if per == "gpu":
    assert cmd.pop(0) == "CUDA_VISIBLE_DEVICES=1"  # one GPU per process: its local index
  assert cmd[1:3] == ["-m", "trainer.main"]
  assert cmd[3:5] == TRAINER_ARGS
  assert cmd[5:] == ["--coordinator=gpu07:2222", "--num_processes=8", "--process_id=5"]


def test_slurm_task_outside_slurm_says_so():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "slurm.py"), "--task",
                        "--dry_run"], capture_output=True, text=True, env=env)
  assert out.returncode != 0 and "SLURM_JOB_NODELIST" in out.stderr


def test_tpu_pod_commands():
  out = launch("tpu.py", "--tpu=pod", "--zone=us-east5-a", "--project=proj", "--setup",
               "--dry_run", "--", *TRAINER_ARGS).splitlines()
  cmds = [shlex.split(line) for line in out]
  assert [c[:2] for c in cmds] == [["git", "-C"], ["gcloud", "compute"], ["gcloud", "compute"],
                                   ["gcloud", "compute"]]
  assert cmds[0][2:] == [REPO, "archive", "--format=tar.gz", "--output=/tmp/jaxtrain.tar.gz",
                         "HEAD"]
  assert cmds[1][2:5] == ["tpus", "tpu-vm", "scp"] and "--worker=all" in cmds[1]
  for c in cmds[2:]:  # setup and the run: one ssh to every worker
    assert c[2:6] == ["tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in c
    assert {"--zone=us-east5-a", "--project=proj"} <= set(c)
  assert "pip install" in cmds[2][-1] and "jax[tpu]" in cmds[2][-1]
  remote = cmds[3][-1].removeprefix("--command=")
  cd, run = remote.split(" && ")
  assert cd == "cd ~/jaxtrain"
  assert shlex.split(run) == ["~/jaxtrain-venv/bin/python", "-m", "trainer.main", *TRAINER_ARGS]

  background = launch("tpu.py", "--tpu=pod", "--zone=z", "--background", "--dry_run", "--",
                      *TRAINER_ARGS).splitlines()
  assert len(background) == 1 and "--project" not in background[0]
  remote = shlex.split(background[0])[-1]
  assert " nohup " in remote and remote.endswith("> ~/jaxtrain.log 2>&1 &")


def jobset(*args):
  spec = yaml.safe_load(launch("gke.py", "--image=reg/jaxtrain:1", *args, "--dry_run", "--",
                               *TRAINER_ARGS))
  assert spec["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and spec["kind"] == "JobSet"
  (workers,) = spec["spec"]["replicatedJobs"]
  job = workers["template"]["spec"]
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
  (container,) = job["template"]["spec"]["containers"]
  assert container["image"] == "reg/jaxtrain:1"
  assert container["command"][:3 + len(TRAINER_ARGS)] == ["python", "-m", "trainer.main",
                                                          *TRAINER_ARGS]
  return spec, workers, job, container


def test_gke_tpu_jobset():
  _, _, job, container = jobset("--tpu=tpu-v5p-slice", "--topology=2x2x4")
  assert job["parallelism"] == 4  # 16 chips, 4 per host
  assert job["template"]["spec"]["nodeSelector"] == {
      "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
      "cloud.google.com/gke-tpu-topology": "2x2x4"}
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  assert container["command"][3:] == TRAINER_ARGS  # jax reads the slice from GKE's environment


def test_gke_gpu_jobset_names_its_coordinator():
  spec, workers, job, container = jobset("--gpu=nvidia-h100-80gb", "--nodes=3",
                                         "--name=run7", "--volume_claim=shared")
  assert spec["metadata"]["name"] == "run7" and job["parallelism"] == 3
  assert spec["spec"]["network"]["enableDNSHostnames"] is True
  # JobSet's pod hostname: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain = jobset>
  coordinator = f"run7-{workers['name']}-0-0.run7"
  flags = container["command"][3 + len(TRAINER_ARGS):]
  assert flags[0].startswith(f"--coordinator={coordinator}:")
  assert flags[1:] == ["--num_processes=3", "--process_id=$(JOB_COMPLETION_INDEX)"]
  (env,) = container["env"]  # the variable $(...) refers to is defined in the container
  assert env["name"] == "JOB_COMPLETION_INDEX"
  assert "job-completion-index" in env["valueFrom"]["fieldRef"]["fieldPath"]
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
  (mount,) = container["volumeMounts"]
  (volume,) = job["template"]["spec"]["volumes"]
  assert volume["persistentVolumeClaim"]["claimName"] == "shared"
  assert mount["name"] == volume["name"]


def test_gke_rejects_a_topology_that_does_not_fill_hosts():
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "gke.py"), "--image=i",
                        "--tpu=tpu-v5-lite-podslice", "--topology=1x2", "--dry_run"],
                       capture_output=True, text=True)
  assert out.returncode != 0 and "chips_per_host" in out.stderr


def test_local_launcher_dry_run():
  out = launch("local.py", "--num_processes=3", "--devices_per_process=2", "--port=4444",
               "--dry_run", "--", *TRAINER_ARGS).splitlines()
  assert len(out) == 3
  for i, line in enumerate(out):
    cmd = shlex.split(line)
    assert cmd[:2] == ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
    assert cmd[3:5] == ["-m", "trainer.main"] and cmd[5:7] == TRAINER_ARGS
    assert cmd[7:] == ["--coordinator=127.0.0.1:4444", "--num_processes=3", f"--process_id={i}"]
