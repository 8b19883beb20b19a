"""Feature networks as batched, sharded extractors: uint8 images in, features and class
probabilities out.

Two networks (a run config's eval.feature_net): the FID Inception (the 2048-d pool3 features of
TensorFlow's 2015-12-05 graph, inception.py, from converted weights, inception_weights.py), with
its 1008-way softmax for the Inception Score (Salimans et al. 2016) when asked; or the project's
digit classifier (classifier.py, 128-d penultimate features and its class probabilities). One
compiled program per network, the batch sharded over the device mesh and gathered on every
process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np
from flax import nnx

from jax_ddpm.evaluation import classifier, inception, inception_weights, metrics
from jax_ddpm.io import errors
from jax_ddpm.runtime import mesh as mesh_lib

if TYPE_CHECKING:
  from jax_ddpm.config.sections import DataConfig, EvalConfig
  from jax_ddpm.data.sources import ImageSource

FEATURE_DIMS = {"inception": inception.FEATURE_DIM, "classifier": classifier.FEATURE_DIM}


class FeatureExtractor:
  """uint8 NHWC images -> (features [n, d], class probabilities [n, k] or None), batched."""

  def __init__(
    self, name: str, model: nnx.Module, apply: Callable, mesh: jax.sharding.Mesh, batch_size: int
  ):
    mesh_lib.check_divisible(batch_size, "eval.batch_size", mesh.size)
    self.name, self.dim = name, FEATURE_DIMS[name]
    self.mesh, self.batch_size = mesh, batch_size
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, mesh_lib.replicated(mesh))
    self._apply = jax.jit(
      lambda state, images: apply(nnx.merge(graphdef, state), images),
      out_shardings=mesh_lib.batch_sharding(mesh),
    )

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    features, probabilities = [], []
    for start in range(0, len(images), self.batch_size):
      batch = images[start : start + self.batch_size]
      count = len(batch)
      if count < self.batch_size:  # the last batch is padded; the padding is dropped below
        batch = np.concatenate(
          [batch, np.zeros((self.batch_size - count,) + batch.shape[1:], batch.dtype)]
        )
      output = self._apply(self._state, mesh_lib.shard_batch(batch, self.mesh))
      features.append(mesh_lib.gather(output[0])[:count])
      if output[1] is not None:
        probabilities.append(mesh_lib.gather(output[1])[:count])
    return (np.concatenate(features), np.concatenate(probabilities) if probabilities else None)

  def statistics(self, source: ImageSource) -> tuple[metrics.FeatureStatistics, np.ndarray | None]:
    """Feature moments of every image of `source` and the class probabilities, read and
    featurised a chunk at a time, so that a large split never sits in memory whole."""
    moments = metrics.RunningMoments(self.dim)
    probabilities = []
    chunk = self.batch_size * 16
    for start in range(0, len(source), chunk):
      features, probs = self(source.read(np.arange(start, min(start + chunk, len(source)))))
      moments.update(features)
      if probs is not None:
        probabilities.append(probs)
    return moments.statistics(), (np.concatenate(probabilities) if probabilities else None)


def _inception_apply(model, images):
  return model(inception.preprocess(images)), None


def _inception_apply_with_softmax(logits_weight: np.ndarray) -> Callable:
  """pool3 features and the 1008-way class probabilities softmax(pool3 W), without the layer's
  bias, as the reference Inception Score code computes them (Salimans et al. 2016)."""
  weight = jax.numpy.asarray(logits_weight)

  def apply(model, images):
    features = model(inception.preprocess(images))
    logits = jax.numpy.matmul(features, weight, precision=inception.PRECISION)
    return features, jax.nn.softmax(logits)

  return apply


def _classifier_apply(model, images):
  features, logits = model(images)
  return features, jax.nn.softmax(logits)


def create_extractor(
  evaluation: EvalConfig, data: DataConfig, workdir: str, mesh: jax.sharding.Mesh
) -> FeatureExtractor:
  """The feature network eval.feature_net names, its weights read (not yet compiled): every
  file it needs fails here, named, before anything is drawn or compiled."""
  if evaluation.feature_net == "inception":
    path = evaluation.inception_weights or None
    apply = (
      _inception_apply_with_softmax(inception_weights.load_logits(path))
      if evaluation.inception_score
      else _inception_apply
    )
    return FeatureExtractor(
      "inception", inception_weights.load(path), apply, mesh, evaluation.batch_size
    )
  path = classifier.path_for(evaluation, workdir)
  model = classifier.load(path)
  expected = (data.image_size, data.channels)
  if (model.config.image_size, model.config.channels) != expected:
    raise errors.InputFileError(
      f"The feature classifier at {path} takes {model.config.image_size}x"
      f"{model.config.image_size}x{model.config.channels} images, but config.data gives "
      f"{expected[0]}x{expected[0]}x{expected[1]}."
    )
  return FeatureExtractor("classifier", model, _classifier_apply, mesh, evaluation.batch_size)
