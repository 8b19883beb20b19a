"""The one in-memory scorer of sample quality, which --mode=eval and the in-training measurement
both call: images in, the numbers of a feature space out.

Against the reference statistics (mean and covariance of the features of a data split, computed
once and cached in workdir/eval/ under the feature network's name, or read from
eval.reference_stats): the Frechet distance (Heusel et al. 2017, eq. 6; FID in the Inception's
features). Against the features of eval.manifold_reference reference images: precision and
recall (k = 3, Kynkaanniemi et al. 2019), density and coverage (k = 5, Naeem et al. 2020) and
KID (Binkowski et al. 2018). From the class probabilities: the Inception Score (Salimans et al.
2016, 10 splits) or the classifier's analogue, its histogram of predicted labels, and for a
conditional model's samples the accuracy on the labels asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING

import jax
import numpy as np
from absl import logging

from jax_ddpm.data import sources
from jax_ddpm.evaluation import classifier, manifold, metrics
from jax_ddpm.io import errors
from jax_ddpm.io import paths as files

if TYPE_CHECKING:
  from jax_ddpm.config.sections import DataConfig, EvalConfig
  from jax_ddpm.evaluation.features import FeatureExtractor

# The scalars a result file's summaries hold.
SUMMARY_SCALARS = (
  "fid",
  "feature_distance",
  "inception_score",
  "classifier_score",
  "class_accuracy",
  "bits_per_dim",
  "precision",
  "recall",
  "density",
  "coverage",
  "kid",
)


def feature_tag(evaluation: EvalConfig, workdir: str) -> str:
  """Names the feature space in cache file names: "inception", or "classifier_" and the first 8
  hex digits of the classifier file's SHA-1, so a retrained classifier never meets the
  reference features of another."""
  if evaluation.feature_net != "classifier":
    return evaluation.feature_net
  path = classifier.path_for(evaluation, workdir)
  digest = hashlib.sha1(files.require_file(path, "eval.classifier").read_bytes()).hexdigest()
  return f"classifier_{digest[:8]}"


def reference_path(evaluation: EvalConfig, data: DataConfig, workdir: str) -> str:
  if evaluation.reference_stats:
    return evaluation.reference_stats
  return files.join(
    workdir,
    "eval",
    f"reference_{feature_tag(evaluation, workdir)}_{data.source}_{evaluation.reference_split}.npz",
  )


@dataclasses.dataclass
class Scorer:
  """A feature network with its reference statistics (and reference features, for the
  neighbour measures and KID); `create` reads or computes and caches them."""

  extractor: FeatureExtractor
  evaluation: EvalConfig
  reference: metrics.FeatureStatistics
  reference_file: str
  real: np.ndarray | None = None

  @classmethod
  def create(
    cls,
    extractor: FeatureExtractor,
    evaluation: EvalConfig,
    data: DataConfig,
    workdir: str,
    *,
    kid: bool = True,
  ) -> Scorer:
    path = reference_path(evaluation, data, workdir)
    reference = saved_reference(evaluation, path, extractor) or compute_reference(
      evaluation, data, path, extractor
    )
    real = None
    if evaluation.manifold_reference and not evaluation.reference_stats:
      real = reference_features(evaluation, data, workdir, extractor)
    return cls(
      extractor,
      evaluation if kid else dataclasses.replace(evaluation, kid_subsets=0),
      reference,
      path,
      real,
    )

  @property
  def distance_name(self) -> str:
    return "fid" if self.extractor.name == "inception" else "feature_distance"

  def score(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """The Frechet distance, the neighbour measures and KID where a reference has images, and
    the class-probability scores where the network gives probabilities."""
    features, probabilities = self.extractor(images)
    moments = metrics.RunningMoments(self.extractor.dim)
    moments.update(features)
    results = {self.distance_name: metrics.frechet_distance(moments.statistics(), self.reference)}
    if self.real is not None:
      results.update(manifold.manifold_scores(self.real, features, self.extractor.mesh)._asdict())
      if self.evaluation.kid_subsets:
        size = min(self.evaluation.kid_subset_size, len(self.real), len(features))
        results["kid"], results["kid_std"] = metrics.kernel_inception_distance(
          self.real, features, self.evaluation.kid_subsets, size
        )
        results["manifold_reference"] = len(self.real)
    if probabilities is not None and self.extractor.name == "inception":
      results.update(inception_score_results(probabilities, labels))
    elif probabilities is not None:
      results.update(classifier_results(probabilities, labels))
    return results


def saved_reference(
  evaluation: EvalConfig, path: str, extractor: FeatureExtractor
) -> metrics.FeatureStatistics | None:
  """The given (eval.reference_stats) or cached reference statistics; None if neither exists."""
  if not (evaluation.reference_stats or files.exists(path)):
    return None
  what = "eval.reference_stats" if evaluation.reference_stats else "reference statistics"
  stats = metrics.FeatureStatistics.load(path, what)
  if stats.dim != extractor.dim:
    raise errors.InputFileError(
      f"{what}={path!r} holds {stats.dim}-d features, but "
      f"eval.feature_net={extractor.name!r} gives {extractor.dim}-d ones."
    )
  return stats


def compute_reference(
  evaluation: EvalConfig, data: DataConfig, path: str, extractor: FeatureExtractor
) -> metrics.FeatureStatistics:
  """Feature statistics of the split eval.reference_split of the data, cached at `path`."""
  source = sources.create_split_source(data, evaluation.reference_split)
  metrics.check_full_rank_possible(
    len(source), extractor.dim, f"reference split {evaluation.reference_split!r}"
  )
  logging.info(
    "Computing %s reference statistics of %d images of split %r.",
    extractor.name,
    len(source),
    evaluation.reference_split,
  )
  stats, _ = extractor.statistics(source)
  if jax.process_index() == 0:
    stats.save(path)
  return stats


def reference_features(
  evaluation: EvalConfig, data: DataConfig, workdir: str, extractor: FeatureExtractor
) -> np.ndarray:
  """Features of eval.manifold_reference images of split eval.reference_split (a seeded subset
  if the split is larger), cached in workdir/eval/ as float32 under 'features'."""
  path = files.join(
    workdir,
    "eval",
    f"reference_{feature_tag(evaluation, workdir)}_"
    f"{data.source}_{evaluation.reference_split}_features_"
    f"{evaluation.manifold_reference}.npz",
  )
  if files.exists(path):
    return files.read_npz(path, "cached reference features", ["features"])["features"]
  source = sources.create_split_source(data, evaluation.reference_split)
  count = min(len(source), evaluation.manifold_reference)
  chosen = np.sort(np.random.default_rng(0).choice(len(source), count, replace=False))
  features = np.concatenate(
    [extractor(source.read(chosen[start : start + 4096]))[0] for start in range(0, count, 4096)]
  ).astype(np.float32)
  if jax.process_index() == 0:
    files.save_npz(path, features=features)
  return features


def _score_in_splits(probabilities: np.ndarray, labels: np.ndarray | None) -> tuple[float, float]:
  """Inception Score over 10 splits in sample order. The splits assume exchangeable samples; a
  conditional model's are ordered by the labels asked for ("grid"), so they are split in a
  fixed shuffled order."""
  order = (
    np.arange(len(probabilities))
    if labels is None
    else np.random.default_rng(0).permutation(len(probabilities))
  )
  return metrics.inception_score(probabilities[order])


def inception_score_results(probabilities: np.ndarray, labels: np.ndarray | None) -> dict:
  """Inception Score of the samples under the 2015-12-05 graph's 1008-way softmax."""
  score, spread = _score_in_splits(probabilities, labels)
  return {"inception_score": score, "inception_score_std": spread}


def classifier_results(probabilities: np.ndarray, labels: np.ndarray | None) -> dict:
  """The classifier's verdict on the samples: its Inception-Score analogue, the histogram of its
  predicted classes and, for a conditional model's samples, how often it predicts the class
  that was asked for (class_accuracy)."""
  score, spread = _score_in_splits(probabilities, labels)
  predicted = probabilities.argmax(axis=1)
  results = {
    "classifier_score": score,
    "classifier_score_std": spread,
    "label_histogram": [int(c) for c in np.bincount(predicted, minlength=probabilities.shape[1])],
  }
  if labels is not None:
    results["class_accuracy"] = float(np.mean(predicted == labels))
  return results
