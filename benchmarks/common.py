"""Shared helpers of the benchmarks: timing by median of repeats, and naming the machine."""

import os
import platform
import resource
import statistics
import time


def machine_description() -> str:
  import jax

  devices = jax.devices()
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return (
    f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on {len(devices)} "
    f"{devices[0].platform} device(s) ({devices[0].device_kind})"
  )


def time_call(fn, repeats: int = 5, warmup: int = 1) -> tuple[float, float, float]:
  """(median, min, max) seconds of fn(), which must block until its result is ready."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times), max(times)


def print_table(header: list[str], rows: list[list]) -> None:
  widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
  line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
  print(line)
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for row in rows:
    print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")


def model_config(name: str, overrides: dict | None = None):
  """The run config of a benchmarked model: "small" (configs/mnist.py's network at width 32,
  1.1M parameters, the width every speed table in the README and NOTES.md measured; the default
  is width 16 since README's "The default recipe, measured"),
  "cifar10" (configs/cifar10.py, the DDPM paper's 35.7M network) or "tiny" (configs/tiny.py,
  for the benchmark's own test), with `overrides` ({"model.remat": True, ...}) applied.

  The config is locked, so a misspelt override key raises KeyError naming the near miss.
  """
  from configs import cifar10, mnist, tiny

  configs = {"small": mnist, "cifar10": cifar10, "tiny": tiny}
  if name not in configs:
    raise ValueError(f"Unknown model {name!r}; allowed values: {list(configs)}.")
  config = configs[name].get_config()
  if name == "small":
    config.model.ch = 32
  config.lock()
  config.update_from_flattened_dict(overrides or {})
  return config


def peak_rss_mb() -> float:
  """The peak resident memory of this process so far, in MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(config):
  """The built run (jax_ddpm.config.builders.Run) of a ConfigDict."""
  from jax_ddpm.config import builders, run_config

  return builders.build(run_config.from_config_dict(config))
