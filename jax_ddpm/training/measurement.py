"""Sample quality measured while training: every training.eval_every_steps, from the EMA weights.

Each measurement draws training.eval_num_samples images in memory with the run's measurement
sampler (the config's, in training.eval_num_steps network calls where that is > 0), always from
the same noise, so that the series follows the weights alone, and scores them with the Scorer of
evaluation/scoring.py: the Frechet distance (fid or feature_distance), precision, recall,
density and coverage, written as train_eval/ scalars with the measurement's own seconds. Fewer
samples than --mode=eval draws: the numbers follow a run, they do not rank recipes.

With eval.feature_net = classifier, the classifier is trained once for the run, at its start
(training.eval_classifier_steps steps), and kept at workdir/eval/training_classifier.npz, so
that a resumed run measures in the same features. A measurement stops between batches when
`stop()` says so (a preemption notice), writing nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import multihost_utils

from jax_ddpm.data import sources
from jax_ddpm.evaluation import classifier
from jax_ddpm.io import paths as files
from jax_ddpm.samplers import program

if TYPE_CHECKING:
  from jax_ddpm.config.run_config import RunConfig
  from jax_ddpm.evaluation.scoring import Scorer

CLASSIFIER_NAME = "training_classifier.npz"
SCALARS = ("precision", "recall", "density", "coverage")


def classifier_path(workdir: str) -> str:
  return files.join(workdir, "eval", CLASSIFIER_NAME)


def train_classifier_if_missing(config: RunConfig, path: str) -> None:
  """The run's feature classifier at `path`, trained on the data's labels unless it is there
  (one answer for every process: process 0's)."""
  missing = not files.exists(path)
  if jax.process_count() > 1:
    missing = bool(multihost_utils.broadcast_one_to_all(np.asarray(missing)))
  if not missing:
    return
  images, labels = sources.read_labelled(config.data, "train")
  classifier.train_and_save(
    images,
    labels,
    path,
    num_steps=config.training.eval_classifier_steps,
    batch_size=config.eval.classifier_batch_size,
    seed=config.seed,
  )


class Measurement:
  """Draws `count` images with a compiled sample function and scores them."""

  def __init__(self, sample_fn: Callable, scorer: Scorer, count: int, batch_size: int, seed: int):
    self.sample_fn, self.scorer = sample_fn, scorer
    self.count, self.batch_size = count, batch_size
    self.base_key = jax.random.key(seed)

  def __call__(self, params, stop: Callable[[], bool] = lambda: False) -> dict | None:
    """train_eval/ scalars of images drawn with `params`; None if `stop()` cut it short."""
    started = time.perf_counter()
    images = []
    for index in range(-(-self.count // self.batch_size)):
      if stop():
        return None
      images.append(program.draw_batch(self.sample_fn, params, self.base_key, index)[0])
    results = self.scorer.score(np.concatenate(images)[: self.count])
    scalars = {
      name: results[name] for name in (self.scorer.distance_name, *SCALARS) if name in results
    }
    scalars["seconds"] = time.perf_counter() - started
    return {f"train_eval/{name}": value for name, value in scalars.items()}
