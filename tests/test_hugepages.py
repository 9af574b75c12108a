"""trainer/hugepages.py: when the trainer restarts itself with glibc's huge-page tunable, and that
the restarted process's large allocations then sit on transparent huge pages."""

import os
import subprocess
import sys

import pytest

from trainer import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wanted_tunables():
  want = hugepages.wanted_tunables
  assert want({}, (2, 36), "madvise") == "glibc.malloc.hugetlb=1"
  assert (want({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 35), "madvise")
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  assert want({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise") is None  # opt-out
  assert want({}, (2, 34), "madvise") is None  # the tunable came in glibc 2.35
  assert want({}, None, "madvise") is None  # musl
  assert want({}, (2, 36), "always") is None and want({}, (2, 36), "never") is None
  assert want({}, (2, 36), None) is None


def test_without_tunable_drops_only_ours():
  drop = hugepages.without_tunable
  assert drop("glibc.malloc.hugetlb=1") == ""
  assert drop("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1") == "glibc.malloc.arena_max=2"
  assert drop("glibc.malloc.hugetlb=0:glibc.mem.tagging=1") == "glibc.mem.tagging=1"
  assert drop("glibc.malloc.hugetlbx=1") == "glibc.malloc.hugetlbx=1"
  assert drop("") == ""


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(f)) == "madvise"
  assert hugepages.thp_mode(str(tmp_path / "missing")) is None


# Restart (or not), then malloc and touch 256 MiB (through libc itself: numpy asks for huge pages
# on its own) and report how much of the process's anonymous memory is on huge pages.
PROBE = """
from trainer import hugepages
hugepages.reexec()
import ctypes, os
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(256 << 20)
ctypes.memset(block, 1, 256 << 20)
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")]
print(os.environ.get("GLIBC_TUNABLES", "-"), int(huge[0].split()[1]) >> 10)
"""


def _probe(tunables=None):
  """Run PROBE with GLIBC_TUNABLES unset or set to `tunables`: (its final value, MiB of huge
  pages)."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["PYTHONPATH"] = REPO
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                       env=env, check=True).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(hugepages.thp_mode() != "madvise" or (hugepages.glibc_version() or (0, 0))
                    < (2, 35), reason="needs glibc >= 2.35 and transparent huge pages on madvise")
def test_restarted_process_allocates_on_huge_pages():
  tunables, huge = _probe()
  assert tunables == "glibc.malloc.hugetlb=1"
  assert huge >= 128, huge  # most of the 256 MiB (the kernel may lack free huge pages)
  tunables, huge = _probe("glibc.malloc.hugetlb=0")  # opted out: 4 KiB pages
  assert tunables == "glibc.malloc.hugetlb=0" and huge < 64, huge


@pytest.mark.skipif(hugepages.thp_mode() != "madvise" or (hugepages.glibc_version() or (0, 0))
                    < (2, 35), reason="needs glibc >= 2.35 and transparent huge pages on madvise")
def test_the_trainer_restarts_before_it_imports_jax():
  """`python -m trainer.main` restarts itself for the tunable before its heavy imports, so they
  happen once (in the restarted process), not once per process: -X importtime, which the
  restarted command keeps, lists jax's top-level import once."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer.main",
                         "--config.train.stepz=3"], cwd=REPO, capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  top_level = [line for line in proc.stderr.splitlines()
               if line.startswith("import time:") and line.split("|")[-1] == " jax"]
  assert len(top_level) == 1, top_level
