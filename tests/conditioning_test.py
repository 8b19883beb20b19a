"""Class-conditional models: labels from data to denoiser, label dropout, classifier-free
guidance."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runs
from PIL import Image
from samplers_test import SCHEDULE, Z, gaussian_mixture_eps

from configs import tiny
from jax_ddpm import cli
from jax_ddpm.config import builders
from jax_ddpm.data import pipeline as input_pipeline
from jax_ddpm.data import sources as data_sources
from jax_ddpm.diffusion import guidance
from jax_ddpm.evaluation import scoring
from jax_ddpm.samplers import base
from jax_ddpm.samplers.dpm_solver import DPMSolverPP2M
from jax_ddpm.training import checkpointing, loop, step

# Two overlapping classes in 2-D that differ only along the first axis.
MEANS, STD = [[-0.5, 0.0], [0.5, 0.0]], 0.4
NULL = guidance.null_label(2)
NUM_SAMPLES = 4000


def mixture_denoiser():
  """The exact conditional eps of each class and, for the null label, of their 50/50 mixture."""
  unconditional = gaussian_mixture_eps(MEANS, [STD, STD], [0.5, 0.5])
  per_class = [gaussian_mixture_eps([mean], [STD], [1.0]) for mean in MEANS]

  def denoise(x_t, t, y):
    eps = jnp.where((y == 0)[:, None], per_class[0](x_t, t), per_class[1](x_t, t))
    return jnp.where((y == NULL)[:, None], unconditional(x_t, t), eps)

  return denoise


def test_guidance_one_is_the_conditional_zero_the_unconditional_and_others_one_call():
  denoise = mixture_denoiser()
  calls = []

  def counted(x_t, t, y):
    calls.append(len(x_t))
    return denoise(x_t, t, y)

  x_t = jax.random.normal(jax.random.key(0), (64, 2))
  t = jnp.full((64,), 500, jnp.int32)
  y = jnp.arange(64, dtype=jnp.int32) % 2
  conditional, unconditional = denoise(x_t, t, y), denoise(x_t, t, jnp.full_like(y, NULL))
  np.testing.assert_array_equal(guidance.guide(counted, y, 1.0, 2)(x_t, t), conditional)
  np.testing.assert_array_equal(guidance.guide(counted, y, 0.0, 2)(x_t, t), unconditional)
  assert calls == [64, 64]
  guided = guidance.guide(counted, y, 3.0, 2)(x_t, t)
  assert calls[2:] == [128]  # both branches in one forward pass
  expected = np.asarray(unconditional) + 3.0 * (np.asarray(conditional) - np.asarray(unconditional))
  np.testing.assert_allclose(guided, expected, rtol=0, atol=1e-6)


def test_guidance_leaves_a_learned_variance_to_the_conditional_branch():
  """2C outputs: the first C channels are guided, the variance channels are the conditional's."""

  def denoise(x_t, t, y):
    return jnp.concatenate([x_t * (1.0 + y[:, None]), x_t + 10.0 * y[:, None]], axis=-1)

  x_t = jax.random.normal(jax.random.key(1), (8, 2))
  t = jnp.full((8,), 500, jnp.int32)
  y = jnp.ones((8,), jnp.int32)
  guided = np.asarray(guidance.guide(denoise, y, 3.0, 2, learn_sigma=True)(x_t, t))
  conditional, unconditional = (
    np.asarray(denoise(x_t, t, labels)) for labels in (y, jnp.full_like(y, NULL))
  )
  np.testing.assert_allclose(
    guided[:, :2],
    unconditional[:, :2] + 3.0 * (conditional[:, :2] - unconditional[:, :2]),
    atol=1e-5,
  )
  np.testing.assert_array_equal(guided[:, 2:], conditional[:, 2:])


def guided_samples(w):
  y = jnp.zeros((NUM_SAMPLES,), jnp.int32)  # every sample asks for class 0, mean (-0.5, 0)
  denoise = guidance.guide(mixture_denoiser(), y, w, 2)
  return np.asarray(
    base.run(
      DPMSolverPP2M(num_steps=20),
      denoise,
      SCHEDULE,
      (NUM_SAMPLES, 2),
      jax.random.key(3),
      thresholding="none",
    ),
    np.float64,
  )


def tilted_density_mass_on_the_class_side(w):
  """The mass on x_1 < 0 of p(x|y)^w p(x)^(1-w) (Ho & Salimans 2022, Sec. 3.2), on a grid."""
  x = np.linspace(-5, 5, 40001)

  def log_normal(mean):
    return -0.5 * (x - mean) ** 2 / STD**2

  log_p = w * log_normal(-0.5) + (1 - w) * np.logaddexp(log_normal(-0.5), log_normal(0.5))
  p = np.exp(log_p - log_p.max())
  return p[x < 0].sum() / p.sum()


def test_guided_samples_concentrate_on_the_class_mode_as_the_tilted_density_predicts():
  samples = {w: guided_samples(w) for w in (0.0, 1.0, 2.0, 4.0)}
  se = Z / np.sqrt(NUM_SAMPLES)
  # w = 0: the mixture (mean 0, variance 0.25 + 0.16); w = 1: class 0's N((-0.5, 0), 0.16 I).
  assert abs(samples[0.0][:, 0].mean()) < se * np.sqrt(0.41)
  assert abs(samples[1.0][:, 0].mean() + 0.5) < se * STD
  assert abs(samples[1.0][:, 0].var() / STD**2 - 1) < 0.05
  sides, spreads = [], []
  for w in (1.0, 2.0, 4.0):
    side = np.mean(samples[w][:, 0] < 0)
    # The guided flow follows the tilted density's score at every t; its samples end up at
    # least as concentrated as the tilted density at t = 0 (in fact more: guidance overshoots).
    assert side >= tilted_density_mass_on_the_class_side(w) - se / 2, (w, side)
    sides.append(side)
    spreads.append(samples[w][:, 0].std())
  assert sides[0] < sides[1] <= sides[2] and spreads[0] > spreads[1] > spreads[2], (sides, spreads)
  # Along x_2 the classes and the mixture agree, so guidance changes nothing there.
  for w in (0.0, 2.0, 4.0):
    np.testing.assert_allclose(samples[w][:, 1], samples[1.0][:, 1], rtol=0, atol=1e-5)


def test_label_dropout_replaces_labels_by_the_null_label_at_its_rate():
  options = step.StepOptions(
    prediction="eps",
    ema=step.EMARule(0.9, False),
    learning_rate=lambda step: 0.0,
    num_classes=10,
    label_dropout=0.2,
  )
  labels = jnp.arange(100_000, dtype=jnp.int32) % 10
  dropped = np.asarray(step._dropped_labels({"label": labels}, options, jax.random.key(0)))
  null = dropped == guidance.null_label(10)
  assert abs(null.mean() - 0.2) < Z * np.sqrt(0.2 * 0.8 / len(labels)), null.mean()
  np.testing.assert_array_equal(dropped[~null], np.asarray(labels)[~null])
  none = step.StepOptions(**{**options.__dict__, "label_dropout": 0.0})
  np.testing.assert_array_equal(
    step._dropped_labels({"label": labels}, none, jax.random.key(0)), labels
  )


def test_the_unet_embeds_one_more_label_the_null_label():
  config = tiny.get_config()
  config.model.num_classes = 10
  assert runs.build(config).unet.num_classes == 11 and guidance.null_label(10) == 10
  config.model.num_classes = None
  assert runs.build(config).unet.num_classes is None


def test_grid_labels_give_each_class_an_equal_run_and_lists_repeat():
  grid = guidance.Conditioning(num_classes=10, labels="grid")
  np.testing.assert_array_equal(grid.batch_labels(jax.random.key(0), 20), np.repeat(range(10), 2))
  listed = guidance.Conditioning(num_classes=10, labels=(3, 7))
  np.testing.assert_array_equal(listed.batch_labels(jax.random.key(0), 5), [3, 7, 3, 7, 3])
  drawn = guidance.Conditioning(num_classes=10, labels="random").batch_labels(
    jax.random.key(0), 1000
  )
  assert set(np.asarray(drawn).tolist()) == set(range(10))


def conditional_config():
  config = tiny.get_config()
  config.model.num_classes = 10  # the fake source draws labels 0..9
  config.training.num_train_steps = 4
  config.training.checkpoint_every_steps = 2
  config.training.sample_every_steps = 4
  config.training.log_every_steps = 2
  config.sampling.guidance_scale = 2.0
  config.sampling.num_samples = config.sampling.batch_size = 16
  return config


@pytest.fixture(scope="module")
def conditional_runs(tmp_path_factory):
  """The conditional tiny run to step 4 in one go, and the same run resumed from its step-2
  checkpoint (a copy of the workdir without the checkpoint of step 4)."""
  straight = str(tmp_path_factory.mktemp("straight"))
  runs.train(conditional_config(), straight)
  resumed = str(tmp_path_factory.mktemp("resumed") / "run")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  runs.train(conditional_config(), resumed)
  return straight, resumed


def test_a_resumed_conditional_run_repeats_the_straight_run_exactly(conditional_runs):
  config = conditional_config()
  run = runs.build(config)
  finals = [checkpointing.load_checkpoint(run, workdir)[1] for workdir in conditional_runs]
  assert int(finals[0].step) == int(finals[1].step) == 4
  for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sample_mode_writes_the_requested_labels_beside_the_images(conditional_runs):
  config = conditional_config()
  config.sampling.labels = "2,5"
  directory = cli.sample(cli.Arguments(config, conditional_runs[0]))
  assert os.path.basename(directory) == "4_ddim_4_w2"
  written = np.load(os.path.join(directory, "samples_16x16x16x1.npz"))
  assert sorted(written.files) == ["arr_0", "labels"]
  np.testing.assert_array_equal(written["labels"], [2, 5] * 8)
  assert os.path.exists(os.path.join(directory, "grid_00000.png"))


def test_classifier_accuracy_is_scored_on_the_requested_labels():
  probabilities = np.eye(3)[[0, 1, 2, 2] * 5] * 0.9 + 0.1 / 3
  results = scoring.classifier_results(probabilities, np.array([0, 1, 1, 2] * 5))
  assert results["class_accuracy"] == 0.75 and results["label_histogram"] == [5, 5, 10]
  assert "class_accuracy" not in scoring.classifier_results(probabilities, None)
  # Samples ordered by class (labels "grid"): the score is not cut down by class-pure splits.
  ordered = np.eye(10)[np.repeat(np.arange(10), 20)]
  score = scoring.classifier_results(ordered, np.repeat(np.arange(10), 20))["classifier_score"]
  in_order = scoring.classifier_results(ordered, None)["classifier_score"]
  assert in_order == pytest.approx(1.0) and score > 7.0, (in_order, score)  # 10 at most


def test_labelled_sources_pair_each_image_with_its_class(tmp_path):
  for name, colour in (("cats", 0), ("dogs", 255)):
    os.makedirs(tmp_path / name)
    for i in range(2):
      Image.fromarray(np.full((8, 8), colour, np.uint8)).save(tmp_path / name / f"{i}.png")
  data = tiny.get_config().data
  data.source, data.path, data.image_size = "folder", str(tmp_path), 8
  source = data_sources.create_source(data, labels=True)
  images, labels = source.read_labelled(np.arange(4))
  np.testing.assert_array_equal(labels, [0, 0, 1, 1])
  assert (images[2:] == 255).all() and (images[:2] == 0).all()
  data = tiny.get_config().data
  data.source = "mnist_embedded"
  digits = data_sources.create_source(data, labels=True)
  assert digits.num_classes == 10 and data_sources.create_source(data).num_classes is None


def test_the_step_reader_yields_labels_of_the_same_examples_as_the_images():
  images = np.arange(20, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
  source = data_sources.ArraySource(images, np.arange(20, dtype=np.int32))
  batches = iter(
    input_pipeline.grain_batches(
      source,
      first_step=3,
      global_batch=8,
      seed=7,
      random_flip=False,
      process_index=1,
      process_count=2,
      labels=True,
    )
  )
  batch = next(batches)
  pixel = np.round((batch["image"][:, 0, 0, 0] + 1) * 127.5).astype(int)
  np.testing.assert_array_equal(pixel, batch["label"])


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(sampling_labels="3,12"), r"sampling.labels=\[3, 12\]: each must be a class in 0..9"),
    (dict(sampling_labels="cats"), r"sampling.labels='cats' is not 'grid', 'random' or a comma"),
    (dict(num_classes=None, sampling_labels="3"), r"the model is unconditional"),
    (dict(num_classes=None, guidance=2.0), r"the model is unconditional"),
    (dict(label_dropout=0.0), r"a model trained with training.label_dropout=0 never learnt"),
    (dict(guidance=-1.0), r"sampling.guidance_scale must be >= 0"),
    (dict(num_classes=4), r"data.source='fake' has 10 classes, more than model.num_classes=4"),
    (dict(source="folder"), r"needs one subfolder per class"),
  ],
)
def test_bad_conditioning_fails_before_compiling(tmp_path, monkeypatch, change, message):
  config = conditional_config()
  config.model.num_classes = change.get("num_classes", 10)
  config.sampling.labels = change.get("sampling_labels", "grid")
  config.sampling.guidance_scale = change.get("guidance", 2.0 if config.model.num_classes else 1.0)
  config.training.label_dropout = change.get("label_dropout", 0.1)
  if change.get("source") == "folder":
    os.makedirs(tmp_path / "images")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "images" / "loose.png")
    config.data.source, config.data.path = "folder", str(tmp_path / "images")

  def no_model_yet(*args, **kwargs):
    raise AssertionError("the model was built (and compiled) before the input was checked")

  monkeypatch.setattr(loop, "create_train_state", no_model_yet)
  with pytest.raises(ValueError, match=message):
    runs.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints") or not os.listdir(
    tmp_path / "run" / "checkpoints"
  )


def test_conditional_configs_validate_and_build_a_guided_sampler():
  from configs import cifar10_cond, mnist_cond
  from jax_ddpm.runtime import mesh

  for module in (mnist_cond, cifar10_cond):
    run = runs.build(module.get_config())
    loop.check_machine(run, mesh.data_mesh())
    assert run.unet.num_classes == 11
    assert builders.conditioning(run.config) == guidance.Conditioning(10, "grid", 2.0)
    assert run.sampler == DPMSolverPP2M(num_steps=20, spacing="logsnr")


def test_visualize_draws_the_guided_reverse_process_of_a_conditional_model(conditional_runs):
  paths = cli.visualize(cli.Arguments(conditional_config(), conditional_runs[1]))
  assert sorted(os.path.basename(p) for p in paths) == [
    "forward_process.png",
    "reverse_process.gif",
    "reverse_process.png",
    "schedules.png",
  ]
