"""--mode=eval: sample quality of a checkpoint as FID (or a classifier feature distance).

Protocol (written into every result file, so a number never travels without it):
  1. Samples: eval.num_samples images drawn in memory with config.sampling (EMA weights,
     sampler, steps, eta, seed) by the program --mode=sample uses, so they are the images it
     would write; or read from the `.npz` named by eval.samples (key 'arr_0', uint8 NHWC, as
     written by the sample mode and by OpenAI's guided-diffusion tools). For large sample sets
     drawn over hours, --mode=sample resumes where it stopped; point eval.samples at its file.
  2. Features: eval.feature_net = inception (FID: 2048-d pool3 of the 2015-12-05 Inception,
     `models/inception.py`) or classifier (128-d penultimate features of the project's
     classifier trained on the dataset, `feature_classifier.py`).
  3. Reference: mean and covariance of the same features over split eval.reference_split of
     config.data (all of its images), computed once and cached as `.npz` (mu, sigma, count),
     or read from eval.reference_stats (e.g. published TTUR statistics, same keys).
  4. Frechet distance between the two Gaussians (`metrics.frechet_distance`); with
     eval.inception_score the Inception Score (10 splits, the graph's 1008-way softmax); with the
     classifier its Inception-Score analogue and the histogram of predicted labels (and
     for a conditional model the accuracy on the requested labels).
  5. Against the features of eval.manifold_reference images of the same split: precision and
     recall (k = 3), density and coverage (k = 5) (`manifold.py`), and KID
     (`metrics.kernel_inception_distance`, eval.kid_subsets of eval.kid_subset_size).
The DDPM paper reports FID of 50,000 samples against the CIFAR-10 training set.

With eval.bits_per_dim, also the negative log-likelihood bound of real images in bits/dim
(likelihood.py; DDPM Table 2's "NLL Test"), written to `workdir/eval/<step>_bits_per_dim_<split>.json`.

Feature extraction is one compiled program per feature network, the batch sharded over the
device mesh; every process computes, process 0 writes `workdir/eval/<samples>_<net>_<N>.json`
(<samples>: <step>_<sampler>_<network calls>[_<options>][_w<guidance scale>], the name of sample mode's
directory for the same settings, or the given file's name) and CLU scalars.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from jax_ddpm.config import builders
from jax_ddpm.config import checks as config_checks
from jax_ddpm.data import sources as data_sources
from jax_ddpm.io import errors
from jax_ddpm.evaluation import classifier as feature_classifier
from jax_ddpm.evaluation import inception_weights as fid_weights
from jax_ddpm.io import paths as files
from jax_ddpm.evaluation import likelihood
from jax_ddpm.evaluation import manifold
from jax_ddpm.evaluation import metrics
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.cli import sample_mode
from jax_ddpm.training import state
from jax_ddpm.io import summaries
from jax_ddpm.evaluation import inception

FEATURE_NETS = ("inception", "classifier")
FEATURE_DIMS = {"inception": inception.FEATURE_DIM, "classifier": feature_classifier.FEATURE_DIM}


class FeatureExtractor:
  """uint8 NHWC images -> (features [n, d], class probabilities [n, k] or None), batched."""

  def __init__(self, name: str, model: nnx.Module, apply: Callable, mesh: jax.sharding.Mesh,
               batch_size: int):
    self.name, self.dim = name, FEATURE_DIMS[name]
    self.mesh, self.batch_size = mesh, batch_size
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, parallel.replicated(mesh))
    self._apply = jax.jit(lambda state, images: apply(nnx.merge(graphdef, state), images),
                          out_shardings=parallel.batch_sharding(mesh))

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    features, probabilities = [], []
    sharding = parallel.batch_sharding(self.mesh)
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      count = len(batch)
      if count < self.batch_size:  # the last batch is padded; the padding is dropped below
        batch = np.concatenate([batch, np.zeros((self.batch_size - count,) + batch.shape[1:],
                                                batch.dtype)])
      batch = jax.make_array_from_callback(batch.shape, sharding, lambda index, b=batch: b[index])
      output = multihost_utils.process_allgather(self._apply(self._state, batch), tiled=True)
      features.append(np.asarray(output[0])[:count])
      if output[1] is not None:
        probabilities.append(np.asarray(output[1])[:count])
    return (np.concatenate(features),
            np.concatenate(probabilities) if probabilities else None)

  def statistics(self, source: data_sources.ImageSource
                 ) -> tuple[metrics.FeatureStatistics, Optional[np.ndarray]]:
    """Feature moments of every image of `source` and the class probabilities.

    The images are read and featurised a chunk at a time, so a large split or sample set never
    sits in memory whole.
    """
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


def create_extractor(config, workdir: str, mesh: jax.sharding.Mesh) -> FeatureExtractor:
  """The feature network config.eval names, with its weights loaded (not yet compiled)."""
  name = config.eval.feature_net
  if name == "inception":
    path = config.eval.inception_weights or None
    apply = (_inception_apply_with_softmax(fid_weights.load_logits(path))
             if config.eval.inception_score else _inception_apply)
    return FeatureExtractor(name, fid_weights.load(path), apply, mesh, config.eval.batch_size)
  model = feature_classifier.load(classifier_path(config, workdir))
  expected = (config.data.image_size, config.data.channels)
  if (model.config.image_size, model.config.channels) != expected:
    raise errors.InputFileError(
        f"The feature classifier at {classifier_path(config, workdir)} takes "
        f"{model.config.image_size}x{model.config.image_size}x{model.config.channels} images, "
        f"but config.data gives {expected[0]}x{expected[0]}x{expected[1]}.")
  return FeatureExtractor(name, model, _classifier_apply, mesh, config.eval.batch_size)


def classifier_path(config, workdir: str) -> str:
  return config.eval.classifier or files.join(workdir, "feature_classifier.npz")


def feature_tag(config, workdir: str) -> str:
  """Names the feature space in cache file names: "inception", or "classifier_" and the first
  8 hex digits of the classifier file's SHA-1, so a retrained classifier never meets the
  reference features of another."""
  if config.eval.feature_net != "classifier":
    return config.eval.feature_net
  path = classifier_path(config, workdir)
  digest = hashlib.sha1(files.require_file(path, "eval.classifier").read_bytes()).hexdigest()
  return f"classifier_{digest[:8]}"


def reference_path(config, workdir: str) -> str:
  if config.eval.reference_stats:
    return config.eval.reference_stats
  data = config.data
  return files.join(workdir, "eval", f"reference_{feature_tag(config, workdir)}_{data.source}_"
                      f"{config.eval.reference_split}.npz")


def validate(config, mesh: jax.sharding.Mesh) -> None:
  """Checks config.eval before any file is read or program compiled."""
  ev = config.eval
  if ev.feature_net not in FEATURE_NETS:
    raise errors.ConfigError(f"Unknown eval.feature_net {ev.feature_net!r}; allowed values: "
                     f"{list(FEATURE_NETS)}.")
  if not isinstance(ev.num_samples, int) or ev.num_samples < 0 or (
      ev.num_samples == 0 and not ev.bits_per_dim):
    raise errors.ConfigError(f"eval.num_samples must be a positive integer (or 0 with "
                             f"eval.bits_per_dim=True), got {ev.num_samples!r}.")
  if ev.num_samples:
    metrics.check_full_rank_possible(ev.num_samples, FEATURE_DIMS[ev.feature_net],
                                     f"eval.num_samples={ev.num_samples}")
  if ev.bits_per_dim:
    if not isinstance(ev.bpd_images, int) or ev.bpd_images < 0:
      raise errors.ConfigError(f"eval.bpd_images must be an integer >= 0 (0: the whole split), "
                               f"got {ev.bpd_images!r}.")
    try:
      likelihood.strata(config.diffusion.num_timesteps, ev.bpd_timesteps)
    except (ValueError, TypeError) as error:
      raise errors.ConfigError(str(error)) from None
  if ev.batch_size <= 0 or ev.batch_size % mesh.size:
    raise errors.ConfigError(f"eval.batch_size={ev.batch_size} must be a positive multiple of the "
                     f"number of devices, {mesh.size}.")


def saved_reference(config, workdir: str, extractor: FeatureExtractor
                    ) -> Optional[metrics.FeatureStatistics]:
  """The given (eval.reference_stats) or cached reference statistics, or None if neither exists."""
  path = reference_path(config, workdir)
  if not (config.eval.reference_stats or files.exists(path)):
    return None
  what = "eval.reference_stats" if config.eval.reference_stats else "reference statistics"
  stats = metrics.FeatureStatistics.load(path, what)
  if stats.dim != extractor.dim:
    raise errors.InputFileError(f"{what}={path!r} holds {stats.dim}-d features, but "
                                f"eval.feature_net={extractor.name!r} gives {extractor.dim}-d ones.")
  return stats


def compute_reference(config, workdir: str, extractor: FeatureExtractor
                      ) -> metrics.FeatureStatistics:
  """Feature statistics of the dataset split eval.reference_split, cached in workdir/eval/."""
  source = data_sources.create_split_source(config.data, config.eval.reference_split)
  metrics.check_full_rank_possible(len(source), extractor.dim,
                                   f"reference split {config.eval.reference_split!r}")
  logging.info("Computing %s reference statistics of %d images of split %r.", extractor.name,
               len(source), config.eval.reference_split)
  stats, _ = extractor.statistics(source)
  if jax.process_index() == 0:
    stats.save(reference_path(config, workdir))
  return stats


def _checked_images(images: np.ndarray, path: str, what: str) -> np.ndarray:
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise errors.InputFileError(f"{what}={path!r}: expected uint8 images [N, H, W, 1 or 3] under "
                                f"'arr_0', got {images.dtype} {images.shape}.")
  return images


def _given_samples(config) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """eval.samples (and its 'labels', if it has them), checked against the configured image
  shape and eval.num_samples."""
  arrays = files.read_npz(config.eval.samples, "eval.samples")
  if "arr_0" not in arrays:
    raise errors.InputFileError(f"eval.samples={config.eval.samples!r} has no ['arr_0'] array "
                                f"(it has {sorted(arrays)}).")
  images = _checked_images(arrays["arr_0"], config.eval.samples, "eval.samples")
  labels = arrays.get("labels")
  if labels is not None and labels.shape != images.shape[:1]:
    raise errors.InputFileError(f"eval.samples={config.eval.samples!r}: 'labels' has shape "
                                f"{labels.shape}, but there are {len(images)} images.")
  size, channels = config.data.image_size, config.data.channels
  if images.shape[1:] != (size, size, channels):
    raise errors.InputFileError(
        f"eval.samples={config.eval.samples!r} holds images of shape {images.shape[1:]}, but "
        f"config.data gives {size}x{size}x{channels}.")
  if len(images) < config.eval.num_samples:
    raise errors.InputFileError(f"eval.samples={config.eval.samples!r} holds {len(images)} images; "
                                f"eval.num_samples={config.eval.num_samples}.")
  return images, labels


def _draw_samples(config, workdir: str, step: Optional[int], mesh):
  """(images, labels or None, protocol) of eval.num_samples images drawn in memory by sample
  mode's program: the images `--mode=sample` writes for the same config.sampling."""
  program = sample_mode.load_program(config, workdir, step, mesh)
  images, labels = program.draw(config.eval.num_samples, config.sampling.batch_size)
  return images, labels, {"samples": program.name, **program.settings}


def evaluate(config, workdir: str, step: Optional[int] = None) -> dict:
  """--mode=eval; returns the results written to workdir/eval/<name>.json: sample quality
  (eval.num_samples > 0) and the bound in bits/dim (eval.bits_per_dim)."""
  mesh = parallel.data_mesh()
  validate(config, mesh)
  ev = config.eval
  if not ev.samples or ev.bits_per_dim:
    config_checks.validate_model_and_diffusion(config)
  # Every user-named file is read before sampling or compiling: a bad one fails in seconds.
  bpd_source = None
  if ev.bits_per_dim:
    bpd_source = data_sources.create_split_source(
        config.data, ev.bpd_split, labels=config.model.num_classes is not None)
    data_sources.check_source_shape(bpd_source, config.data)
  results = {}
  if ev.num_samples:
    results.update(sample_quality(config, workdir, step, mesh))
  if ev.bits_per_dim:
    results.update(_likelihood(config, workdir, step, mesh, bpd_source))
  return results


def _likelihood(config, workdir: str, step: Optional[int], mesh, source) -> dict:
  """The bound in bits/dim of the checkpoint's eval.bpd_split, written as its own JSON."""
  eval_graphdef, train_state, step = state.load_checkpoint(config, workdir, step)
  params = train_state.ema_params if config.sampling.use_ema else train_state.params
  started = time.perf_counter()
  results = likelihood.evaluate_bits_per_dim(config, eval_graphdef, params,
                                             builders.schedule(config), mesh, source)
  results.update({"bpd_seconds": time.perf_counter() - started, "protocol.step": step,
                  "protocol.use_ema": bool(config.sampling.use_ema),
                  "protocol.variance": likelihood.bound_options(config).variance.value,
                  "bpd_split": config.eval.bpd_split, "data.source": config.data.source})
  if jax.process_index() == 0:
    _write_results(workdir, results, f"{step}_bits_per_dim_{config.eval.bpd_split}")
  return results


def sample_quality(config, workdir: str, step: Optional[int], mesh) -> dict:
  """FID (or feature distance) and the other sample scores of the module docstring."""
  ev = config.eval
  if not ev.samples:
    sample_mode.check_sampling_request(config.sampling, mesh)
  extractor = create_extractor(config, workdir, mesh)
  reference = saved_reference(config, workdir, extractor)
  if ev.samples:
    (images, labels), protocol = _given_samples(config), {"samples": ev.samples}
  else:
    images, labels, protocol = _draw_samples(config, workdir, step, mesh)
  images = images[:ev.num_samples]
  labels = None if labels is None else labels[:ev.num_samples]
  if reference is None:
    reference = compute_reference(config, workdir, extractor)
  started = time.perf_counter()
  features, probabilities = extractor(images)
  moments = metrics.RunningMoments(extractor.dim)
  moments.update(features)
  results = {
      "fid" if extractor.name == "inception" else "feature_distance":
          metrics.frechet_distance(moments.statistics(), reference),
      "feature_net": extractor.name, "num_samples": int(ev.num_samples),
      "reference": reference_path(config, workdir), "reference_count": reference.count,
      "reference_split": ev.reference_split,
      **{f"protocol.{k}": v for k, v in protocol.items()}}
  if probabilities is not None and extractor.name == "inception":
    results.update(inception_score_results(probabilities, labels))
  elif probabilities is not None:
    results.update(classifier_results(probabilities, labels))
  results.update(neighbour_results(config, workdir, extractor, features))
  results["feature_seconds"] = time.perf_counter() - started
  if jax.process_index() == 0:
    # Named after the samples: sample_mode.Program.name, or the given file.
    source = epath.Path(ev.samples).stem if ev.samples else protocol["samples"]
    _write_results(workdir, results, f"{source}_{extractor.name}_{ev.num_samples}")
  return results


def neighbour_results(config, workdir: str, extractor: FeatureExtractor,
                      features: np.ndarray) -> dict:
  """Precision, recall, density, coverage (manifold.py) and KID of the samples' features
  against eval.manifold_reference reference images; {} when that is 0 or the reference is a
  given statistics file (eval.reference_stats: no images to compare with)."""
  ev = config.eval
  if not ev.manifold_reference or ev.reference_stats:
    return {}
  real = reference_features(config, workdir, extractor)
  scores = manifold.manifold_scores(real, features, extractor.mesh)
  kid, kid_std = metrics.kernel_inception_distance(real, features, ev.kid_subsets,
                                                   min(ev.kid_subset_size, len(real),
                                                       len(features)))
  return {**scores._asdict(), "kid": kid, "kid_std": kid_std, "manifold_reference": len(real)}


def reference_features(config, workdir: str, extractor: FeatureExtractor) -> np.ndarray:
  """Features of eval.manifold_reference images of split eval.reference_split (a seeded subset
  if the split is larger), cached in workdir/eval/ as float32 under 'features'."""
  data, ev = config.data, config.eval
  path = files.join(workdir, "eval", f"reference_{feature_tag(config, workdir)}_{data.source}_"
                    f"{ev.reference_split}_features_{ev.manifold_reference}.npz")
  if files.exists(path):
    return files.read_npz(path, "cached reference features", ["features"])["features"]
  source = data_sources.create_split_source(data, ev.reference_split)
  count = min(len(source), ev.manifold_reference)
  chosen = np.sort(np.random.default_rng(0).choice(len(source), count, replace=False))
  features = np.concatenate([extractor(source.read(chosen[start:start + 4096]))[0]
                             for start in range(0, count, 4096)]).astype(np.float32)
  if jax.process_index() == 0:
    files.save_npz(path, features=features)
  return features


def _score_in_splits(probabilities: np.ndarray, labels: Optional[np.ndarray]
                     ) -> tuple[float, float]:
  """Inception Score over 10 splits in sample order. The splits assume exchangeable samples; a
  conditional model's are ordered by the labels asked for ("grid"), so they are split in a
  fixed shuffled order."""
  order = (np.arange(len(probabilities)) if labels is None
           else np.random.default_rng(0).permutation(len(probabilities)))
  return metrics.inception_score(probabilities[order])


def inception_score_results(probabilities: np.ndarray, labels: Optional[np.ndarray]) -> dict:
  """Inception Score of the samples under the 2015-12-05 graph's 1008-way softmax."""
  score, spread = _score_in_splits(probabilities, labels)
  return {"inception_score": score, "inception_score_std": spread}


def classifier_results(probabilities: np.ndarray, labels: Optional[np.ndarray]) -> dict:
  """The classifier's verdict on the samples: its Inception-Score analogue, the histogram of
  its predicted classes and, for a conditional model's samples, how often it predicts the
  class that was asked for (class_accuracy)."""
  score, spread = _score_in_splits(probabilities, labels)
  predicted = probabilities.argmax(axis=1)
  results = {"classifier_score": score, "classifier_score_std": spread,
             "label_histogram": [int(c) for c in np.bincount(
                 predicted, minlength=probabilities.shape[1])]}
  if labels is not None:
    results["class_accuracy"] = float(np.mean(predicted == labels))
  return results


def _write_results(workdir: str, results: dict, name: str) -> None:
  step = int(results.get("protocol.step", 0))
  path = files.join(workdir, "eval", name + ".json")
  files.save_json(path, results)
  writer = summaries.create_writer(workdir, just_logging=jax.process_index() > 0)
  scalars = {f"eval/{k}": v for k, v in results.items()
             if k in ("fid", "feature_distance", "inception_score", "classifier_score",
                      "class_accuracy", "bits_per_dim",
                      "precision", "recall", "density", "coverage", "kid")}
  writer.write_scalars(step, scalars)
  writer.flush()
  logging.info("Wrote %s: %s", path, scalars)


def train_classifier(config, workdir: str) -> dict:
  """--mode=train_classifier: trains the feature classifier on config.data's training split."""
  images, labels = data_sources.read_labelled(config.data, "train")
  model, report = feature_classifier.train(
      images, labels, num_steps=config.eval.classifier_steps,
      batch_size=config.eval.classifier_batch_size, seed=config.seed)
  path = classifier_path(config, workdir)
  if jax.process_index() == 0:
    feature_classifier.save(model, path)
  logging.info("Feature classifier saved to %s: %s", path, report)
  return report

