"""Every shipped config validates on the suite's mesh, and the improved recipe is what it says."""

import importlib
import os

import pytest

from jax_ddpm import builders, config_checks

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
