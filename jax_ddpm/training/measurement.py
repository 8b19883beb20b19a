"""Sample quality measured while training: every training.eval_every_steps, from the EMA weights.

Each measurement draws training.eval_num_samples images in memory with config.sampling's
sampler (training.eval_num_steps network calls where that is > 0), always from the same noise,
so the series follows the weights alone; featurises them with eval.feature_net; and writes, as
scalars under train_eval/ at the training step:
  fid or feature_distance   Frechet distance to the statistics of the split
                            eval.reference_split (metrics.frechet_distance)
  precision, recall         k = 3 neighbourhoods (Kynkaanniemi et al. 2019), and
  density, coverage         k = 5 (Naeem et al. 2020), against eval.manifold_reference images of
                            the same split (manifold.py); left out when that is 0
  seconds                   the measurement's own wall time.
The sample count is smaller than a final evaluation's, so these numbers follow a run; they are
not the numbers --mode=eval reports.

Feature networks: the FID Inception (converted weights, fid_weights.py); or, for
eval.feature_net = classifier, a digit classifier trained once for the run at its start
(training.eval_classifier_steps steps, much shorter than --mode=train_classifier's, so that
the default MNIST run can afford it) and kept at workdir/eval/training_classifier.npz, so a
resumed run measures in the same features. Reference statistics and features are computed
once and cached in workdir/eval/, named after the feature network's file digest.

A measurement never delays a checkpoint (the loop checkpoints first) and stops between batches
when `stop()` says so (a preemption notice), writing nothing.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jax_ddpm.config import builders
from jax_ddpm.data import sources as data_sources
from jax_ddpm.io import errors
from jax_ddpm.evaluation import scoring as evaluate
from jax_ddpm.evaluation import classifier as feature_classifier
from jax_ddpm.evaluation import inception_weights as fid_weights
from jax_ddpm.io import paths as files
from jax_ddpm.evaluation import manifold
from jax_ddpm.evaluation import metrics
from jax_ddpm.samplers import program as sampling

CLASSIFIER_NAME = "training_classifier.npz"


LABELLED_SOURCES = ("mnist_embedded", "idx", "folder", "fake")  # data_sources.read_labelled


def validate(config, num_devices: int) -> None:
  """training.eval_* keys; with measurements on, enough images for a full-rank covariance, a
  sampling batch the devices divide, and the feature network's inputs."""
  training = config.training
  for key in ("eval_every_steps", "eval_num_steps", "eval_num_samples",
              "eval_classifier_steps"):
    if not isinstance(training[key], int) or training[key] < 0:
      raise errors.ConfigError(f"training.{key} must be an integer >= 0, got {training[key]!r}.")
  if not training.eval_every_steps:
    return
  if training.eval_every_steps % training.steps_per_dispatch:
    raise errors.ConfigError(f"training.eval_every_steps={training.eval_every_steps} must be a "
                             f"multiple of training.steps_per_dispatch="
                             f"{training.steps_per_dispatch}.")
  if config.eval.feature_net not in evaluate.FEATURE_NETS:
    raise errors.ConfigError(f"Unknown eval.feature_net {config.eval.feature_net!r}; allowed "
                             f"values: {list(evaluate.FEATURE_NETS)}.")
  metrics.check_full_rank_possible(training.eval_num_samples,
                                   evaluate.FEATURE_DIMS[config.eval.feature_net],
                                   f"training.eval_num_samples={training.eval_num_samples}")
  if config.eval.feature_net == "inception":  # read at start-up: fail before any compile
    files.require_file(config.eval.inception_weights or fid_weights.default_path(),
                       "eval.inception_weights", fid_weights.HOW_TO_GET)
  elif not training.eval_classifier_steps:
    raise errors.ConfigError("training.eval_classifier_steps must be > 0: the in-training "
                             "measurement trains its classifier for that many steps.")
  elif config.data.source not in LABELLED_SOURCES:
    raise errors.ConfigError(
        f"training.eval_every_steps with eval.feature_net='classifier' trains a classifier on "
        f"labelled data; data.source={config.data.source!r} has no labels this project reads "
        f"(labelled: {list(LABELLED_SOURCES)}). Use eval.feature_net='inception'.")
  if config.sampling.batch_size <= 0 or config.sampling.batch_size % num_devices:
    raise errors.ConfigError(f"sampling.batch_size={config.sampling.batch_size} (the batch of "
                             "the in-training measurement) must be a positive multiple of the "
                             f"number of devices, {num_devices}.")


def _measured_config(config, workdir: str):
  """`config` as this module measures with: its own classifier file."""
  config = config.copy_and_resolve_references()
  config.eval.inception_score = False
  if config.eval.feature_net == "classifier":
    config.eval.classifier = files.join(workdir, "eval", CLASSIFIER_NAME)
  return config


def _train_classifier_if_missing(config) -> None:
  path = config.eval.classifier
  missing = not files.exists(path)
  if jax.process_count() > 1:  # one answer for all processes: process 0's
    missing = bool(multihost_utils.broadcast_one_to_all(np.asarray(missing)))
  if not missing:
    return
  images, labels = data_sources.read_labelled(config.data, "train")
  started = time.perf_counter()
  model, report = feature_classifier.train(
      images, labels, num_steps=config.training.eval_classifier_steps,
      batch_size=config.eval.classifier_batch_size, seed=config.seed)
  if jax.process_index() == 0:
    feature_classifier.save(model, path)
  if jax.process_count() > 1:  # every process then loads the file process 0 wrote
    multihost_utils.sync_global_devices("training_eval: classifier saved")
  logging.info("Trained the in-training feature classifier in %.0f s: %s; saved to %s.",
               time.perf_counter() - started, report, path)


class TrainingEval:
  """The feature network, cached references and compiled sampler of in-training measurements."""

  def __init__(self, config, workdir: str, mesh: jax.sharding.Mesh, eval_graphdef, schedule):
    self.config = _measured_config(config, workdir)
    self.count = config.training.eval_num_samples
    self.batch_size = config.sampling.batch_size
    self.mesh = mesh
    if self.config.eval.feature_net == "classifier":
      _train_classifier_if_missing(self.config)
    self.extractor = evaluate.create_extractor(self.config, workdir, mesh)
    self.reference = (evaluate.saved_reference(self.config, workdir, self.extractor)
                      or evaluate.compute_reference(self.config, workdir, self.extractor))
    self.real = (evaluate.reference_features(self.config, workdir, self.extractor)
                 if self.config.eval.manifold_reference else None)
    self.sampler = builders.measurement_sampler(self.config)
    shape = (self.batch_size, config.data.image_size, config.data.image_size,
             config.data.channels)
    self.sample_fn = sampling.make_sample_fn(eval_graphdef, schedule, shape, mesh, self.sampler,
                                             **builders.sampling_options(self.config))
    self.base_key = jax.random.key(self.config.sampling.seed)
    self.distance_name = "fid" if self.extractor.name == "inception" else "feature_distance"

  def __call__(self, params, stop: Callable[[], bool] = lambda: False) -> Optional[dict]:
    """train_eval/ scalars of images drawn with `params`; None if `stop()` cut it short."""
    started = time.perf_counter()
    images = []
    for index in range(-(-self.count // self.batch_size)):
      if stop():
        return None
      images.append(sampling.draw_batch(self.sample_fn, params, self.base_key, index)[0])
    features, _ = self.extractor(np.concatenate(images)[:self.count])
    moments = metrics.RunningMoments(self.extractor.dim)
    moments.update(features)
    scalars = {self.distance_name: metrics.frechet_distance(moments.statistics(),
                                                            self.reference)}
    if self.real is not None:
      scalars.update(manifold.manifold_scores(self.real, features, self.mesh)._asdict())
    scalars["seconds"] = time.perf_counter() - started
    return {f"train_eval/{name}": value for name, value in scalars.items()}
