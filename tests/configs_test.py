"""Every shipped config validates on the suite's mesh, the improved recipe is what it says,
model.compute_dtype="auto" resolves by the hardware, and the learning rate follows
optim.lr_decay."""

import importlib
import os

import numpy as np
import pytest
import runs

from configs import default
from jax_ddpm.config import builders
from jax_ddpm.io import errors
from jax_ddpm.runtime import devices as host_devices
from jax_ddpm.runtime import mesh
from jax_ddpm.training import loop

CONFIGS = sorted(
  name[:-3]
  for name in os.listdir(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  )
  if name.endswith(".py") and name != "__init__.py"
)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_passes_the_training_checks(name):
  run = runs.build(importlib.import_module(f"configs.{name}").get_config())
  loop.check_machine(run, mesh.data_mesh())  # the suite's 8 devices


def test_the_improved_cifar10_config_learns_its_variance_and_samples_with_it():
  from configs import cifar10, cifar10_improved

  run = runs.build(cifar10_improved.get_config())
  assert run.unet.out_channels == 6
  assert run.step_options.learn_sigma and run.step_options.vlb_weight == 0.001
  assert run.sampler.uses_learned_variance and len(run.sampler.timesteps(run.schedule)) == 100
  assert run.schedule.num_timesteps == 4000
  paper = cifar10.get_config()  # the DDPM paper's recipe stays as it was
  assert not paper.model.learn_sigma and paper.diffusion.schedule == "linear"


def test_auto_compute_dtype_is_bfloat16_only_where_the_hardware_multiplies_it():
  assert builders.compute_dtype("auto", "cpu", cpu_bfloat16=True) == "bfloat16"
  assert builders.compute_dtype("auto", "cpu", cpu_bfloat16=False) == "float32"
  assert builders.compute_dtype("auto", "tpu") == "bfloat16"
  assert builders.compute_dtype("float32", "tpu") == "float32"  # an explicit choice stands


def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path):
  amx = tmp_path / "cpuinfo_amx"
  amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
  avx2 = tmp_path / "cpuinfo_avx2"
  avx2.write_text("processor\t: 0\nflags\t\t: fpu avx avx2 fma\n")
  assert host_devices.native_bfloat16(host_devices.cpu_flags(str(amx)))
  assert not host_devices.native_bfloat16(host_devices.cpu_flags(str(avx2)))
  assert host_devices.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_auto_compute_dtype_builds_a_network_in_a_run_config():
  config = default.get_config()
  config.model.compute_dtype = "auto"
  expected = "bfloat16" if host_devices.native_bfloat16() else "float32"
  assert runs.build(config).unet.compute_dtype == expected


def _rates(lr_decay, steps):
  config = default.get_config()
  config.optim.learning_rate, config.optim.warmup_steps = 1e-3, 100
  config.optim.lr_decay, config.training.num_train_steps = lr_decay, 1100
  schedule = builders.learning_rate(runs.typed(config))
  return np.array([float(schedule(step)) for step in steps])


def test_cosine_decay_follows_sgdr_eq5_after_the_warm_up():
  steps = [0, 50, 100, 350, 600, 850, 1100]
  eta_max = 1e-3  # eta_t = eta_max / 2 (1 + cos(pi (t - W) / (N - W))), W = 100, N = 1100
  cosine = [0.0, eta_max / 2] + [
    eta_max / 2 * (1 + np.cos(np.pi * (t - 100) / 1000)) for t in steps[2:]
  ]
  np.testing.assert_allclose(_rates("cosine", steps), cosine, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(
    _rates("constant", steps), [0.0, eta_max / 2] + [eta_max] * 5, rtol=1e-6
  )


def test_wsd_holds_the_step_then_decays_linearly_over_the_last_fraction():
  steps = [0, 100, 500, 879, 880, 990, 1100]  # W = 100, N = 1100, decay over the last 220
  wsd = [0.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3 * 110 / 220, 0.0]
  np.testing.assert_allclose(_rates("wsd", steps), wsd, rtol=1e-6, atol=1e-12)


def test_a_decay_fraction_outside_zero_to_one_is_refused_by_name():
  config = default.get_config()
  config.optim.lr_decay, config.optim.decay_fraction = "wsd", 1.5
  with pytest.raises(
    errors.ConfigError, match=r"optim.decay_fraction must be in \(0, 1\], got 1.5"
  ):
    runs.typed(config)


def test_a_run_shorter_than_its_warm_up_never_decays():
  config = default.get_config()  # e.g. a quick try of a cosine config: 50 steps, warm-up 200
  config.optim.learning_rate, config.optim.warmup_steps = 1e-3, 200
  config.optim.lr_decay, config.training.num_train_steps = "cosine", 50
  schedule = builders.learning_rate(runs.typed(config))
  np.testing.assert_allclose(
    [float(schedule(t)) for t in (0, 25, 50)], [0.0, 1.25e-4, 2.5e-4], rtol=1e-6
  )


def test_an_unknown_learning_rate_decay_is_refused_by_name():
  config = default.get_config()
  config.optim.lr_decay = "linear"
  with pytest.raises(
    errors.ConfigError, match="optim.lr_decay must be 'constant', 'cosine' or 'wsd', got 'linear'"
  ):
    runs.typed(config)
