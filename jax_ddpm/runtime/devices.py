"""What the host CPU offers XLA: how many CPU devices to start, and whether it computes bfloat16.

XLA's CPU backend runs one device on all cores but uses the second core poorly; one device per
core runs the same mesh code faster (docs/benchmarks.md): one per core, a power of two, at most
8. This module imports no JAX: the flag must be in XLA_FLAGS before JAX starts its CPU client. A
CPU with AMX or AVX512-BF16 multiplies bfloat16 natively, where bfloat16 compute trains faster;
elsewhere it is emulated and slower.
"""

import os

FLAG = "xla_force_host_platform_device_count"
# /proc/cpuinfo flags of native bfloat16 arithmetic: AMX tiles, AVX-512 bf16 dot products.
BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")


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


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
  """The instruction-set flags the kernel reports for the first CPU (empty if unreadable).

  /proc/cpuinfo describes this host, so it is read as a local file, never through files.py.
  """
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def native_bfloat16(flags: frozenset[str] | None = None) -> bool:
  """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16)."""
  flags = cpu_flags() if flags is None else flags
  return any(flag in flags for flag in BFLOAT16_FLAGS)
