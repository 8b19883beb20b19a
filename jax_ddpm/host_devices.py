"""How many XLA CPU devices to start on a CPU-only host: one per core, a power of two, at most 8.

XLA's CPU backend runs one device on all cores but uses the second core poorly (see
benchmarks/NOTES.md); one device per core runs the same mesh code faster. This module imports
no JAX: the flag must be in XLA_FLAGS before JAX is first imported.
"""

import os

FLAG = "xla_force_host_platform_device_count"


def cpu_device_count(cores: int | None = None) -> int:
  cores = min(cores or os.cpu_count() or 1, 8)
  return 1 << (cores.bit_length() - 1)


def with_cpu_devices(xla_flags: str, count: int | None = None) -> str:
  """`xla_flags` plus the device-count flag, unless it already names a count.

  The flag only shapes the CPU backend: on GPU and TPU hosts jax.devices() is unaffected.
  """
  if FLAG in xla_flags:
    return xla_flags
  return f"{xla_flags} --{FLAG}={count or cpu_device_count()}".strip()
