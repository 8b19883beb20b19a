"""--mode=sample: files, determinism, per-device noise, resuming, compile reuse, bad input."""

import os
import shutil

import jax
import numpy as np
import pytest
import runs

from configs import tiny
from jax_ddpm import cli
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.samplers import program as sampling
from jax_ddpm.samplers.ddpm import DDPM
from jax_ddpm.training import checkpointing, state


def sample_to_workdir(config, workdir):
  """--mode=sample."""
  return cli.sample(cli.Arguments(config, workdir))


def load_program(config, workdir):
  """The program --mode=sample and --mode=eval draw with, from workdir's newest checkpoint."""
  run = runs.build(config)
  return sampling.from_run(run, *checkpointing.load_checkpoint(run, workdir), parallel.data_mesh())


def sample_config(**overrides):
  config = tiny.get_config()
  config.sampling.num_samples = 10
  config.sampling.batch_size = 8
  for key, value in overrides.items():
    config.sampling[key] = value
  return config


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
  """A workdir with one checkpoint (step 1) of the tiny model."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  run = runs.build(sample_config())
  _, _, fresh = state.create_train_state(
    run.unet, run.config.seed, parallel.data_mesh(), run.optimizer
  )
  checkpointer = checkpointing.Checkpointer(workdir)
  checkpointer.save(1, fresh.replace(step=fresh.step + 1), run.metadata)
  checkpointer.wait_until_finished()
  return workdir


@pytest.fixture(scope="module")
def sampled(checkpoint_dir):
  return sample_to_workdir(sample_config(), checkpoint_dir)


def test_sample_mode_writes_npz_batches_grids_and_one_file_of_all_samples(sampled):
  assert sampled.endswith(os.path.join("samples", "1_ddim_4"))
  everything = np.load(os.path.join(sampled, "samples_10x16x16x1.npz"))["arr_0"]
  assert everything.dtype == np.uint8 and everything.shape == (10, 16, 16, 1)
  assert everything.min() < 64 and everything.max() > 192  # not blank
  first, second = (np.load(os.path.join(sampled, f"batch_{i:05d}.npz"))["arr_0"] for i in (0, 1))
  assert first.shape == second.shape == (8, 16, 16, 1)  # every batch file is full
  np.testing.assert_array_equal(np.concatenate([first, second])[:10], everything)
  for i in (0, 1):
    assert os.path.getsize(os.path.join(sampled, f"grid_{i:05d}.png")) > 100


def test_each_device_draws_different_noise(sampled):
  batch = np.load(os.path.join(sampled, "batch_00000.npz"))["arr_0"]  # one image per device
  flat = batch.reshape(len(batch), -1).astype(int)
  assert len({row.tobytes() for row in flat}) == len(batch)


def test_resuming_draws_exactly_the_missing_batches(checkpoint_dir, sampled, tmp_path):
  copy = str(tmp_path / "copy")
  shutil.copytree(checkpoint_dir, copy)
  directory = os.path.join(copy, os.path.relpath(sampled, checkpoint_dir))
  os.remove(os.path.join(directory, "batch_00001.npz"))
  os.remove(os.path.join(directory, "samples_10x16x16x1.npz"))
  kept = os.path.getmtime(os.path.join(directory, "batch_00000.npz"))
  sample_to_workdir(sample_config(), copy)
  assert os.path.getmtime(os.path.join(directory, "batch_00000.npz")) == kept
  for name in ("batch_00001.npz", "samples_10x16x16x1.npz"):
    np.testing.assert_array_equal(
      np.load(os.path.join(directory, name))["arr_0"], np.load(os.path.join(sampled, name))["arr_0"]
    )


def test_fewer_then_more_samples_reuse_the_batches_and_write_exactly_the_count(
  checkpoint_dir, sampled, tmp_path
):
  copy = str(tmp_path / "copy")
  shutil.copytree(checkpoint_dir, copy)
  directory = os.path.join(copy, os.path.relpath(sampled, checkpoint_dir))
  ten = np.load(os.path.join(directory, "samples_10x16x16x1.npz"))["arr_0"]
  kept = {
    name: os.path.getmtime(os.path.join(directory, name))
    for name in os.listdir(directory)
    if name.startswith("batch_")
  }
  sample_to_workdir(sample_config(num_samples=6), copy)  # fewer: nothing drawn
  np.testing.assert_array_equal(
    np.load(os.path.join(directory, "samples_6x16x16x1.npz"))["arr_0"], ten[:6]
  )
  sample_to_workdir(sample_config(num_samples=20), copy)  # more: one new batch
  twenty = np.load(os.path.join(directory, "samples_20x16x16x1.npz"))["arr_0"]
  np.testing.assert_array_equal(twenty[:10], ten)
  assert {name: os.path.getmtime(os.path.join(directory, name)) for name in kept} == kept
  assert np.load(os.path.join(directory, "batch_00002.npz"))["arr_0"].shape == (8, 16, 16, 1)


def test_a_short_batch_file_of_an_older_run_is_drawn_again_in_full(
  checkpoint_dir, sampled, tmp_path
):
  copy = str(tmp_path / "copy")
  shutil.copytree(checkpoint_dir, copy)
  directory = os.path.join(copy, os.path.relpath(sampled, checkpoint_dir))
  full = np.load(os.path.join(directory, "batch_00001.npz"))["arr_0"]
  np.savez(os.path.join(directory, "batch_00001.npz"), arr_0=full[:2])
  sample_to_workdir(sample_config(num_samples=16), copy)
  np.testing.assert_array_equal(np.load(os.path.join(directory, "batch_00001.npz"))["arr_0"], full)


def test_eval_draws_in_memory_the_images_sample_mode_writes(checkpoint_dir, sampled):
  program = load_program(sample_config(), checkpoint_dir)
  assert program.name == os.path.basename(sampled) == "1_ddim_4"
  written = np.load(os.path.join(sampled, "samples_10x16x16x1.npz"))["arr_0"]
  images, labels = program.draw(10)
  np.testing.assert_array_equal(images, written)
  assert labels is None
  other = load_program(sample_config(eta=1.0, thresholding="dynamic"), checkpoint_dir)
  assert other.name == "1_ddim_4_eta1_dynamic"  # its samples and scores go elsewhere
  reseeded = load_program(sample_config(seed=3, use_ema=False), checkpoint_dir)
  assert reseeded.name == "1_ddim_4_online_seed3"


def test_other_settings_do_not_mix_into_an_existing_sample_directory(checkpoint_dir, sampled):
  before = sorted(os.listdir(sampled))
  with pytest.raises(ValueError, match=r"other settings:\n  sampling.batch_size: now 16, before 8"):
    sample_to_workdir(sample_config(batch_size=16), checkpoint_dir)
  assert sorted(os.listdir(sampled)) == before


def test_the_sampling_program_compiles_once_for_any_weights(checkpoint_dir):
  run = runs.build(sample_config())
  eval_graphdef, loaded, _ = checkpointing.load_checkpoint(run, checkpoint_dir)
  mesh = parallel.data_mesh()
  sample_fn = sampling.make_sample_fn(eval_graphdef, run.schedule, (8, 16, 16, 1), mesh, DDPM())
  first = sample_fn(loaded.ema_params, jax.random.key(0)).images
  other_weights = jax.tree.map(lambda x: x + 0.01, loaded.params)
  second = sample_fn(other_weights, jax.random.key(1)).images
  assert sample_fn._cache_size() == 1
  assert first.shape == second.shape == (8, 16, 16, 1)
  assert float(np.abs(np.asarray(first)).max()) <= 1.0
  again = sample_fn(loaded.ema_params, jax.random.key(0)).images
  np.testing.assert_array_equal(first, again)


def test_no_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*checkpoints: train first"):
    sample_to_workdir(sample_config(), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_checkpoint_of_another_model_is_refused(checkpoint_dir):
  config = sample_config()
  config.model.ch_mult = (1, 1)
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match=r"model.ch_mult"):
    sample_to_workdir(config, checkpoint_dir)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(num_samples=0), r"sampling.num_samples must be a positive integer, got 0"),
    (
      dict(sampler="lms"),
      r"Unknown sampling.sampler 'lms'; allowed values: "
      r"\['ddpm', 'ddim', 'dpmpp_2m', 'sde_dpmpp_2m', 'unipc', 'euler', 'heun', "
      r"'euler_ancestral'\]",
    ),
    (
      dict(sampler="dpmpp_2m", num_steps=101),
      r"sampling.num_steps must be an integer in "
      r"1..100 \(T\), got 101",
    ),
    (
      dict(thresholding="soft"),
      r"Unknown sampling.thresholding 'soft'; allowed values: "
      r"\['none', 'static', 'dynamic'\]",
    ),
    (
      dict(batch_size=12),
      r"sampling.batch_size=12 must be a positive multiple of the number of "
      r"devices, 8",
    ),
  ],
)
def test_bad_sampling_settings_fail_before_anything_is_written(checkpoint_dir, overrides, message):
  before = sorted(os.listdir(os.path.join(checkpoint_dir, "samples")))
  with pytest.raises(ValueError, match=message):
    sample_to_workdir(sample_config(**overrides), checkpoint_dir)
  assert sorted(os.listdir(os.path.join(checkpoint_dir, "samples"))) == before


def test_visualize_writes_four_non_blank_pictures(checkpoint_dir):
  from PIL import Image

  from jax_ddpm.evaluation import pictures

  paths = cli.visualize(cli.Arguments(sample_config(sampler="ddpm"), checkpoint_dir))  # T = 100
  names = sorted(os.path.basename(p) for p in paths)
  assert names == [
    "forward_process.png",
    "reverse_process.gif",
    "reverse_process.png",
    "schedules.png",
  ]
  minimum_sizes = {
    "schedules.png": (800, 300),
    "forward_process.png": (100, 16),
    "reverse_process.png": (100, 32),
    "reverse_process.gif": (128, 128),
  }
  for path in paths:
    with Image.open(path) as image:
      width, height = image.size
      low_w, low_h = minimum_sizes[os.path.basename(path)]
      assert width >= low_w and height >= low_h, (path, image.size)
      assert np.asarray(image.convert("L")).std() > 10, path  # not blank
      if path.endswith(".gif"):
        assert image.n_frames == pictures.NUM_GIF_FRAMES + 1  # recorded steps + the result
