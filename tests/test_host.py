"""benchmarks/host.py: the host description every benchmark JSON carries (issue 21)."""

import os

import pytest

from benchmarks import host, train_throughput

# Two processors of an Intel Sapphire Rapids host as Linux prints them (flags shortened to those
# around the ISA extensions; the second block repeats the first).
SAPPHIRE_RAPIDS = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512dq \
avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni avx512_fp16 avx_vnni amx_bf16 \
amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu
"""

ZEN3 = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse4_2 fma avx f16c avx2 sha_ni vaes vpclmulqdq
"""


def _write(tmp_path, text):
  path = tmp_path / "cpuinfo"
  path.write_text(text)
  return str(path)


def test_sapphire_rapids_flags(tmp_path):
  info = host.host_info(_write(tmp_path, SAPPHIRE_RAPIDS))
  assert info["cpu_model"] == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
  assert (info["vendor"], info["cpu_family"], info["cpu_model_number"]) == ("GenuineIntel", "6",
                                                                           "143")
  present = {f for f, on in info["isa"].items() if on}
  assert present == {"sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
                     "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                     "amx_bf16", "amx_int8"}
  assert info["isa_summary"] == "AVX2, AVX-512 (+VNNI, BF16, FP16), AMX (BF16, INT8)"


def test_zen3_flags_and_no_cpuinfo(tmp_path):
  info = host.host_info(_write(tmp_path, ZEN3))
  assert info["cpu_model"] == "AMD EPYC" and info["vendor"] == "AuthenticAMD"
  assert {f for f, on in info["isa"].items() if on} == {"sse4_2", "avx", "avx2", "fma", "f16c"}
  assert info["isa_summary"] == "AVX2, no AVX-512, no AMX"
  missing = host.host_info(str(tmp_path / "absent"))  # macOS, Windows: no /proc/cpuinfo
  assert not any(missing["isa"].values()) and missing["isa_summary"] == "no ISA flags known"
  assert missing["cpu_model"]


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo on this OS")
def test_this_host_against_proc_cpuinfo():
  """This machine, against its /proc/cpuinfo read here line by line."""
  model = flags = None
  with open("/proc/cpuinfo") as f:
    for line in f:
      if model is None and line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
      if flags is None and line.startswith(("flags", "Features")):
        flags = set(line.split(":", 1)[1].split())
  info = host.host_info()
  if model is not None:
    assert info["cpu_model"] == model
  for flag in host.ISA_FLAGS:
    assert info["isa"][flag] == (flag in (flags or set())), flag
  assert info["usable_cpus"] == len(os.sched_getaffinity(0)) and info["logical_cpus"] >= 1
  import jax
  assert info["versions"]["jax"] == jax.__version__


def test_throughput_benchmark_records_the_host():
  """train_throughput.py writes host_info() into its JSON (the full run takes many minutes, so
  this checks that main() builds its results with it)."""
  import inspect
  source = inspect.getsource(train_throughput.main)
  assert '"host": host' in source and "host = host_info()" in source
  assert train_throughput.host_info is host.host_info
