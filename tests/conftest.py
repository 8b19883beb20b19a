"""Test-session setup: 8 simulated CPU devices, so data-parallel code runs on a real mesh.

XLA reads the flag when jax is first imported, which is after this file runs.
"""

import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session and the command-line runs it starts: a
# program compiled once (the tiny train step, say) loads from disk in every later process.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax_ddpm_compilation_cache_")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The slowest files first: the two workers (pyproject.toml) then finish at about the same time.
SLOWEST_FIRST = (
  "preemption_test.py",
  "pod_rehearsal_test.py",
  "train_test.py",
  "evaluation_test.py",
  "conditioning_test.py",
  "latent_text_test.py",
  "reliability_test.py",
  "convert_test.py",
  "unet_test.py",
  "bad_input_test.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))
