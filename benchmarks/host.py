"""What host a benchmark ran on: CPU model, cores, the ISA extensions that change CPU speed ratios.

The same benchmark gives different ratios on different hosts: XLA:CPU and torch pick different
kernels when AVX-512, AVX512-BF16 or AMX are there (issue 21: `train_throughput.py` measured
0.90 of torch in float32 and 0.32 in bfloat16 on an Intel Sapphire Rapids host with AMX,
against 1.17 float32 on an AMD Zen 3 host without AVX-512). So every benchmark's JSON records
`host_info()` next to its figures, and BENCHMARKS.md names the host of every speed table.

python benchmarks/host.py  # prints the JSON of this host
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform

# /proc/cpuinfo flag names (Linux spells them so) that move matmul and bf16 speed, x86 then Arm.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
             "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")
PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers")


def parse_cpuinfo(text: str) -> dict[str, str]:
  """The fields of the first processor block of /proc/cpuinfo text (all CPUs of a host are
  alike; Arm kernels put some fields after the blocks, which are read too if not yet seen)."""
  fields: dict[str, str] = {}
  for line in text.splitlines():
    key, sep, value = line.partition(":")
    key = key.strip()
    if not sep or not key:
      continue
    if key == "processor" and "processor" in fields:
      continue  # a later block: only fields the first one lacked are taken from it
    fields.setdefault(key, value.strip())
  return fields


def isa_summary(flags: dict[str, bool]) -> str:
  """A short human line, e.g. "AVX2, no AVX-512, no AMX" or "AVX-512 (+BF16), AMX (BF16, INT8)"."""
  if not any(flags.values()):
    return "no ISA flags known"
  if flags.get("asimd") or flags.get("sve"):
    parts = [name.upper() for name in ("asimd", "sve", "sve2", "bf16", "i8mm") if flags.get(name)]
    return ", ".join(parts)
  parts = ["AVX2" if flags.get("avx2") else "no AVX2"]
  if flags.get("avx512f"):
    extra = [n for f, n in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"),
                            ("avx512_fp16", "FP16")) if flags.get(f)]
    parts.append("AVX-512" + (f" (+{', '.join(extra)})" if extra else ""))
  else:
    parts.append("no AVX-512")
  if flags.get("amx_tile"):
    kinds = [n for f, n in (("amx_bf16", "BF16"), ("amx_int8", "INT8")) if flags.get(f)]
    parts.append("AMX" + (f" ({', '.join(kinds)})" if kinds else ""))
  else:
    parts.append("no AMX")
  return ", ".join(parts)


def _version(package: str) -> str | None:
  """The installed version, read from the package metadata: importing torch to ask would cost
  seconds and threads in a benchmark's process."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def host_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
  """{cpu_model, vendor, cpu_family, cpu_model_number, logical_cpus, usable_cpus, isa: {flag:
  bool for ISA_FLAGS}, isa_summary, machine, python, versions: {package: version or None}}.
  Without /proc/cpuinfo (macOS, Windows) the model is platform.processor() and the flags are
  unknown (all False, isa_summary says so)."""
  try:
    with open(cpuinfo_path) as f:
      fields = parse_cpuinfo(f.read())
  except OSError:
    fields = {}
  present = set((fields.get("flags") or fields.get("Features") or "").split())
  isa = {flag: flag in present for flag in ISA_FLAGS}
  model = (fields.get("model name") or fields.get("Hardware") or fields.get("cpu model")
           or platform.processor() or platform.machine())
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"cpu_model": model, "vendor": fields.get("vendor_id") or fields.get("CPU implementer"),
          "cpu_family": fields.get("cpu family"), "cpu_model_number": fields.get("model"),
          "logical_cpus": os.cpu_count(), "usable_cpus": usable, "isa": isa,
          "isa_summary": isa_summary(isa), "machine": platform.machine(),
          "python": platform.python_version(), "versions": {p: _version(p) for p in PACKAGES}}


def describe(host: dict) -> str:
  """One line for a benchmark's output: "host: MODEL (ISA summary), N usable cores"."""
  return f"host: {host['cpu_model']} ({host['isa_summary']}), {host['usable_cpus']} usable cores"


if __name__ == "__main__":
  print(json.dumps(host_info(), indent=1))
