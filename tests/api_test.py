"""The public Python API (jax_ddpm/__init__.py): three lines from a workdir to a grid, the same
images as --mode=sample on any device count, and every name it documents."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jax_ddpm
from configs import tiny
from jax_ddpm import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def api_config():
  config = tiny.get_config()
  config.training.num_train_steps = 4
  config.training.checkpoint_every_steps = 2
  config.training.sample_every_steps = 4
  config.training.log_every_steps = 2
  config.sampling.num_samples = config.sampling.batch_size = 16
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The tiny config trained for 4 steps through the API, checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("api"))
  model = jax_ddpm.train(api_config(), workdir)
  return workdir, model


def test_train_returns_the_trained_model(trained):
  workdir, model = trained
  assert model.step == 4 and int(model.state.step) == 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_three_lines_from_a_workdir_to_a_grid(trained, tmp_path):
  workdir, _ = trained
  model = jax_ddpm.load(workdir)
  images = model.sample(16, sampler="dpmpp_2m", steps=4, seed=0)
  path = jax_ddpm.save_grid(images, str(tmp_path / "grid.png"))
  assert images.dtype == np.uint8 and images.shape == (16, 16, 16, 1) and images.std() > 0
  with Image.open(path) as grid:
    assert grid.size == (74, 74)  # 4 x 4 images of 16 pixels, 2-pixel padding


def test_the_api_draws_bitwise_what_sample_mode_writes_on_eight_devices_and_on_one(trained):
  workdir, _ = trained
  config = api_config()
  directory = cli.sample(cli.Arguments(config, workdir))
  written = np.load(os.path.join(directory, "samples_16x16x16x1.npz"))["arr_0"]
  np.testing.assert_array_equal(jax_ddpm.load(workdir).sample(16), written)
  program = (
    "import sys, numpy as np, jax_ddpm; "
    f"images = jax_ddpm.load({workdir!r}).sample(16); "
    "np.save(sys.argv[1], images); import jax; print(jax.device_count())"
  )
  output = os.path.join(workdir, "one_device.npy")
  result = subprocess.run(
    [sys.executable, "-c", program, output],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split()[-1] == "1"
  np.testing.assert_array_equal(np.load(output), written)


def test_load_takes_a_step_the_trained_weights_and_a_config(trained):
  workdir, model = trained
  earlier = jax_ddpm.load(workdir, step=2)
  assert earlier.step == 2
  assert not np.array_equal(earlier.sample(16), model.sample(16))
  online = jax_ddpm.load(workdir, ema=False)
  assert not np.array_equal(online.sample(16), model.sample(16))
  configured = jax_ddpm.load(workdir, config=api_config())
  np.testing.assert_array_equal(configured.sample(16), model.sample(16))
  with pytest.raises(ValueError, match=r"No checkpoint of step 3 .*available: \[2, 4\]"):
    jax_ddpm.load(workdir, step=3)


def test_sample_takes_any_sampler_seed_and_batch_and_refuses_unknown_names(trained):
  _, model = trained
  for name in jax_ddpm.SAMPLERS:
    assert model.sample(8, sampler=name, steps=4).shape == (8, 16, 16, 1)
  assert not np.array_equal(model.sample(8, seed=1), model.sample(8, seed=0))
  np.testing.assert_array_equal(model.sample(8, batch_size=8), model.sample(8, batch_size=8))
  with pytest.raises(ValueError, match=r"Unknown sampling.sampler 'lms'; allowed values"):
    model.sample(8, sampler="lms")
  with pytest.raises(ValueError, match=r"sampling.batch_size=12 must be a positive multiple"):
    model.sample(8, batch_size=12)


def test_the_trajectory_records_x_t_and_the_predicted_x0_of_every_step(trained):
  _, model = trained
  path = model.trajectory(3)
  assert path.x_t.shape == path.x0.shape == (4, 3, 16, 16, 1)  # DDIM-4 of configs/tiny.py
  assert list(path.timesteps) == sorted(path.timesteps, reverse=True)
  assert path.images.shape == (3, 16, 16, 1) and path.images.dtype == np.uint8


def test_the_forward_process_helpers_follow_ddpm_eq_4():
  schedule = jax_ddpm.schedule("tiny")
  images = jax_ddpm.training_images("tiny", 2)
  assert images.shape == (2, 16, 16, 1)
  first = jax_ddpm.noised(images, 0, schedule).astype(int)  # sqrt(1 - alpha-bar_0) = 0.01
  assert np.abs(first - images).max() <= 8 and np.abs(first - images).mean() < 2
  noisy = jax_ddpm.noised(images, schedule.num_timesteps - 1, schedule).astype(float)
  assert abs(np.corrcoef(noisy.ravel(), images.ravel())[0, 1]) < 0.5


def test_load_config_names_the_shipped_configs_and_changes_keys_by_section():
  config = jax_ddpm.load_config("mnist", training={"num_train_steps": 100})
  assert config.training.num_train_steps == 100 and config.model.ch == 16
  with pytest.raises(
    FileNotFoundError,
    match=r"--config='mnst' is neither a file nor a shipped "
    r"config; shipped: \[.*'mnist'",
  ):
    jax_ddpm.load_config("mnst")
  with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['training.bogus'\]"):
    jax_ddpm.train(jax_ddpm.load_config("tiny").to_dict() | {"training": {"bogus": 1}}, "unused")


def test_every_public_name_is_documented_with_an_example():
  for name in jax_ddpm.__all__:
    value = getattr(jax_ddpm, name)
    if callable(value) and not isinstance(value, type):
      assert value.__doc__ and ">>>" in value.__doc__, name
  assert ">>>" in jax_ddpm.__doc__ and ">>>" in jax_ddpm.Model.sample.__doc__
