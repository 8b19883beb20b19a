"""A checkpoint written before the package was split into subpackages restores, and samples,
bitwise as it did (tests/fixtures/make_checkpoint.py wrote it, with what it must give)."""

import json
import os

import jax
import numpy as np

import jax_ddpm
from jax_ddpm.config import builders, run_config
from jax_ddpm.training import checkpointing

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
WORKDIR = os.path.join(FIXTURES, "checkpoint_v0")


def recorded():
  with open(os.path.join(FIXTURES, "checkpoint_v0_sums.json")) as f:
    return json.load(f)


def test_the_flat_layouts_checkpoint_restores_every_array_bitwise():
  expected = recorded()
  run = builders.build(run_config.from_dict(expected["config"]))
  _, restored, step = checkpointing.load_checkpoint(run, WORKDIR)
  assert step == expected["step"] == 2
  sums = {
    jax.tree_util.keystr(path): float(np.asarray(leaf, np.float64).sum())
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored)
  }
  assert sums == expected["sums"]


def test_the_flat_layouts_checkpoint_loads_by_its_saved_config_and_draws_the_same_images():
  model = jax_ddpm.load(WORKDIR)  # no config given: the one saved beside the checkpoint
  assert model.step == 2 and model.config.model.ch == 8
  images = model.sample(8)
  with np.load(os.path.join(FIXTURES, "checkpoint_v0_samples.npz"), allow_pickle=False) as f:
    np.testing.assert_array_equal(images, f["images"])
