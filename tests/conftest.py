"""Force 8 CPU devices before jax is imported anywhere, so mesh tests run on any machine."""

import os

# LLVM at -O1, as trainer/train.py compiles its steps on CPU: compiling is most of this suite.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=1").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
