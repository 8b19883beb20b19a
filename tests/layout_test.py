"""The module layering of DESIGN.md: config checks and builders sit below every driver."""

import subprocess
import sys

ROOT = __file__.rsplit("/tests/", 1)[0]
DRIVERS = ("jax_ddpm.training.state", "jax_ddpm.samplers.program", "jax_ddpm.cli.sample_mode",
           "jax_ddpm.training.loop", "jax_ddpm.evaluation.scoring", "jax_ddpm.evaluation.pictures",
           "jax_ddpm.training.checkpointing")


def test_config_checks_and_builders_import_no_driver_so_there_is_no_cycle():
  program = ("import sys, jax_ddpm.config.checks, jax_ddpm.config.builders; "
             "print(' '.join(sorted(m for m in sys.modules if m.startswith('jax_ddpm'))))")
  loaded = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.split()
  assert "jax_ddpm.config.builders" in loaded and "jax_ddpm.samplers" in loaded
  assert not set(loaded) & set(DRIVERS), sorted(set(loaded) & set(DRIVERS))
