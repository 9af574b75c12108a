"""Transparent huge pages for the large host allocations of XLA:CPU (Linux, glibc >= 2.35).

XLA:CPU allocates every step's temporary buffer afresh, as one block. glibc serves a block that
large with a new `mmap`, so each step the kernel faults in and zeroes it again, 4 KiB at a time:
for configs/medium.py some 315,000 page faults a step, 655,000 without remat, where they cost
11% of the step (`benchmarks/page_faults.py`, BENCHMARKS.md). With the glibc tunable
`glibc.malloc.hugetlb=1`, malloc asks for transparent huge pages (`madvise`) on the memory it
maps, so the same block takes 512x fewer faults.

One cost, seen on our test machines (Firecracker VMs whose kernel reports free memory blocks to
the host, `page_reporting.page_reporting_order=11` on its command line; our reading is that the
host takes them back): after the process has paused for some seconds, its next step spends
longer in the kernel faulting its huge pages in. For configs/medium.py, 1.15 s of kernel time
instead of 0.14 s, 5.69 s for the step instead of 4.88 s (5.09 s without huge pages, which pay
their faults every step instead). Consecutive training steps do not see it
(`benchmarks/page_faults.py --pause 6`, BENCHMARKS.md).

A glibc tunable is read once, when the process starts, so `reexec()` starts the same command
again with it in `GLIBC_TUNABLES`, before anything heavy is imported. It does nothing when the
kernel's transparent huge pages are `never` (no use) or `always` (already in effect), on other C
libraries or older glibc, or when `GLIBC_TUNABLES` already names the tunable: set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to opt out.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, or None for another C library."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  major, minor = version.split(".")[:2]
  return int(major), int(minor)


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent huge page mode (always | madvise | never), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def wanted_tunables(env: dict[str, str], glibc: tuple[int, int] | None,
                    mode: str | None) -> str | None:
  """The GLIBC_TUNABLES value to restart with, or None when there is nothing to do."""
  current = env.get("GLIBC_TUNABLES", "")
  if glibc is None or glibc < (2, 35) or mode != "madvise" or TUNABLE in current:
    return None
  return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def without_tunable(value: str) -> str:
  """A GLIBC_TUNABLES value less this module's tunable: for a child process that should run as
  it would have without `reexec()`."""
  return ":".join(t for t in value.split(":") if t and not t.startswith(TUNABLE + "="))


def reexec() -> None:
  """Restart this process's command with huge pages for malloc, where that helps (see above).
  Returns only when nothing was done; call it first thing in a `__main__`."""
  if not sys.platform.startswith("linux") or not sys.orig_argv:
    return
  value = wanted_tunables(dict(os.environ), glibc_version(), thp_mode())
  if value is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": value})
