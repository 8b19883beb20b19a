"""Every shipped config validates on the suite's mesh, the improved recipe is what it says, and
model.compute_dtype="auto" resolves by the hardware."""

import importlib
import os

import pytest

from configs import default
from jax_ddpm import builders, config_checks, host_devices

CONFIGS = sorted(name[:-3] for name in os.listdir(os.path.join(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))), "configs"))
                 if name.endswith(".py") and name != "__init__.py")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_passes_the_training_checks(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config_checks.validate_training(config, num_devices=8, num_processes=1)


def test_the_improved_cifar10_config_learns_its_variance_and_samples_with_it():
  from configs import cifar10, cifar10_improved  # pylint: disable=g-import-not-at-top
  config = cifar10_improved.get_config()
  assert builders.unet_config(config).out_channels == 6
  assert builders.step_options(config).learn_sigma and builders.step_options(config).vlb_weight == 0.001
  sampler = builders.sampler(config)
  assert sampler.uses_learned_variance and len(sampler.timesteps(builders.schedule(config))) == 100
  assert builders.schedule(config).num_timesteps == 4000
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
  assert builders.unet_config(config).compute_dtype == expected
