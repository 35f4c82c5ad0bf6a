"""Test-wide setup: 8 forced CPU devices so mesh tests run on one host, and XLA's CPU
code generation at LLVM -O0 unless XLA_FLAGS chooses a level: the tests are dominated
by compilation; the HLO (fusion, buffer assignment, memory analysis) is the same and
fast-math stays off (XLA:CPU's default), so the results do not depend on it."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()
