"""Kubernetes (GKE): a JobSet that runs trainer.main on every host of a TPU slice or GPU nodes.

  python launch/gke.py --image=IMAGE [--name=jaxtrain] [--tpu=tpu-v5p-slice --topology=2x2x2
      --chips_per_host=4 | --gpu=nvidia-h100-80gb --nodes=2 --gpus_per_node=8]
      [--volume_claim=PVC --mount=/data] [--dry_run]
      -- --config=configs/RECIPE.py --workdir=/data/run

Prints the manifest (--dry_run) or applies it with `kubectl apply -f -`. The image must hold this
repository installed with jax for the accelerator (e.g. `pip install -e . 'jax[tpu]'` or
`'jax[cuda12]'`) and start in its folder. One pod per host, in an Indexed Job:

- TPU: the node pool of the slice is picked by its accelerator and topology labels; GKE gives each
  pod the slice's worker list, from which jax finds the coordinator and its own id, so the
  command carries no multi-process flags. Hosts = chips in the topology / chips per host.
- GPU: JobSet's headless service gives pod i the name NAME-workers-0-i.NAME, so the coordinator is
  pod 0 at that name and each pod's process id is its completion index
  ($(JOB_COMPLETION_INDEX), from the pod's annotation, expanded by Kubernetes).

--volume_claim mounts a ReadWriteMany PersistentVolumeClaim at --mount in every pod: the workdir
must be there, as every process writes its shards of each checkpoint.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import yaml

PORT = 12355
WORKERS = "workers"


def manifest(args, trainer_args: list[str]) -> dict:
  command = ["python", "-m", "trainer.main", *trainer_args]
  if args.tpu:
    chips = math.prod(int(n) for n in args.topology.split("x"))
    if chips % args.chips_per_host:
      raise SystemExit(f"--topology {args.topology} has {chips} chips, not a multiple of "
                       f"--chips_per_host {args.chips_per_host}")
    hosts = chips // args.chips_per_host
    selector = {"cloud.google.com/gke-tpu-accelerator": args.tpu,
                "cloud.google.com/gke-tpu-topology": args.topology}
    resources = {"google.com/tpu": args.chips_per_host}
  else:
    hosts = args.nodes
    selector = {"cloud.google.com/gke-accelerator": args.gpu}
    resources = {"nvidia.com/gpu": args.gpus_per_node}
    if hosts > 1:
      command += [f"--coordinator={args.name}-{WORKERS}-0-0.{args.name}:{PORT}",
                  f"--num_processes={hosts}", "--process_id=$(JOB_COMPLETION_INDEX)"]
  container = {"name": "trainer", "image": args.image, "command": command,
               "resources": {"limits": resources}, "ports": [{"containerPort": PORT}]}
  pod = {"restartPolicy": "Never", "nodeSelector": selector, "containers": [container]}
  if args.gpu and hosts > 1:  # the index from the Job's pod annotation, for $(...) above
    container["env"] = [{"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]
  if args.volume_claim:
    container["volumeMounts"] = [{"name": "workdir", "mountPath": args.mount}]
    pod["volumes"] = [{"name": "workdir",
                       "persistentVolumeClaim": {"claimName": args.volume_claim}}]
  job = {"parallelism": hosts, "completions": hosts, "completionMode": "Indexed",
         "backoffLimit": 0, "template": {"spec": pod}}
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2",
      "kind": "JobSet",
      "metadata": {"name": args.name, "annotations": {
          # all pods of one slice on one node pool
          "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
      "spec": {
          # a failed pod restarts the whole set, which resumes from the newest checkpoint
          "failurePolicy": {"maxRestarts": args.max_restarts},
          "network": {"enableDNSHostnames": True},
          "replicatedJobs": [{"name": WORKERS, "replicas": 1, "template": {"spec": job}}],
      },
  }


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--image", required=True, help="container image with this repo installed")
  ap.add_argument("--name", default="jaxtrain", help="the JobSet's name (a DNS label)")
  kind = ap.add_mutually_exclusive_group(required=True)
  kind.add_argument("--tpu", help="GKE TPU accelerator label, e.g. tpu-v5p-slice")
  kind.add_argument("--gpu", help="GKE GPU accelerator label, e.g. nvidia-h100-80gb")
  ap.add_argument("--topology", default="2x2x2", help="TPU slice topology, e.g. 2x2x2 or 4x4")
  ap.add_argument("--chips_per_host", type=int, default=4)
  ap.add_argument("--nodes", type=int, default=2, help="GPU: hosts")
  ap.add_argument("--gpus_per_node", type=int, default=8)
  ap.add_argument("--volume_claim", default="", help="a ReadWriteMany PVC for the workdir")
  ap.add_argument("--mount", default="/data")
  ap.add_argument("--max_restarts", type=int, default=3)
  ap.add_argument("--dry_run", action="store_true", help="print the manifest, apply nothing")
  ap.add_argument("trainer_args", nargs="*", help="after --: arguments for trainer.main")
  args = ap.parse_args(argv)
  if args.nodes < 1 or args.gpus_per_node < 1 or args.chips_per_host < 1:
    ap.error("--nodes, --gpus_per_node and --chips_per_host must be at least 1")
  text = yaml.safe_dump(manifest(args, args.trainer_args), sort_keys=False)
  if args.dry_run:
    print(text, end="")
    return 0
  return subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True,
                        check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
