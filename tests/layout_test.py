"""The module layering of DESIGN.md: config checks and builders sit below every driver."""

import subprocess
import sys

ROOT = __file__.rsplit("/tests/", 1)[0]
DRIVERS = ("jax_ddpm.state", "jax_ddpm.sampling", "jax_ddpm.sample_mode", "jax_ddpm.train",
           "jax_ddpm.evaluate", "jax_ddpm.visualize", "jax_ddpm.checkpointing")


def test_config_checks_and_builders_import_no_driver_so_there_is_no_cycle():
  program = ("import sys, jax_ddpm.config_checks, jax_ddpm.builders; "
             "print(' '.join(sorted(m for m in sys.modules if m.startswith('jax_ddpm'))))")
  loaded = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.split()
  assert "jax_ddpm.builders" in loaded and "jax_ddpm.samplers" in loaded
  assert not set(loaded) & set(DRIVERS), sorted(set(loaded) & set(DRIVERS))
