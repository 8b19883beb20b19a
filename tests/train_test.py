"""Training end to end: data-parallel equivalence, the 35.7M model, summaries, errors.

Exact resume after kills is pinned by preemption_test.py.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import runs

from configs import cifar10, tiny
from jax_ddpm.data import pipeline as input_pipeline
from jax_ddpm.data import sources as data_sources
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.training import checkpointing, loop, state
from jax_ddpm.training import step as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_steps(config, mesh, num_steps):
  """Losses and final state of `num_steps` train steps on `mesh`, fed the pipeline's batches."""
  run = runs.build(config)
  graphdef, _, current = state.create_train_state(run.unet, run.config.seed, mesh, run.optimizer)
  train_fn = train.make_train_fn(graphdef, run.schedule, run.optimizer, run.step_options, mesh)
  source = data_sources.create_source(run.config.data)
  losses = []
  for step in range(num_steps):
    batch = input_pipeline.local_batch(
      source, step, config.training.batch_size, config.seed, config.data.random_flip, 0, 1
    )
    current, metrics = train_fn(
      current, {"image": jax.device_put(batch, parallel.batch_sharding(mesh))}
    )
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(current)


def test_one_device_and_eight_devices_train_identically():
  config = tiny.get_config()
  losses_1, state_1 = run_steps(config, parallel.data_mesh(jax.devices()[:1]), 3)
  losses_8, state_8 = run_steps(config, parallel.data_mesh(), 3)
  np.testing.assert_allclose(losses_8, losses_1, atol=1e-5, rtol=0)
  assert losses_1[0] != losses_1[-1]  # the parameters did move
  for a, b in zip(jax.tree.leaves(state_1.params), jax.tree.leaves(state_8.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_cifar10_config_uses_the_papers_plain_ema_from_step_0():
  config = cifar10.get_config()
  ema = runs.build(config).step_options.ema
  decays = [float(ema.decay_at(s)) for s in (0, 1000, 89_000)]
  assert decays == [np.float32(0.9999)] * 3


def test_cifar10_config_builds_the_35m_model_and_traces_its_train_step():
  """The paper's config end to end up to XLA (compiling the 35.7M step on 8 CPU devices would
  take a minute and a half; its forward pass is compared with diffusers in convert_test.py)."""
  config = cifar10.get_config()
  run = runs.build(config)
  mesh = parallel.data_mesh()
  graphdef, _, current = state.abstract_train_state(run.unet, config.seed, mesh, run.optimizer)
  assert sum(x.size for x in jax.tree.leaves(current.params)) == 35_746_307
  train_fn = train.make_train_fn(graphdef, run.schedule, run.optimizer, run.step_options, mesh)
  batch = {"image": jax.ShapeDtypeStruct((config.training.batch_size, 32, 32, 3), np.float32)}
  after, metrics = jax.eval_shape(train_fn, current, batch)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), after) == jax.tree.map(
    lambda a: (a.shape, a.dtype), current
  )
  assert metrics["loss"].shape == () and after.step.dtype == current.step.dtype


def main_command(workdir, *overrides):
  return [
    sys.executable,
    os.path.join(ROOT, "main.py"),
    "--config=" + os.path.join(ROOT, "configs", "tiny.py"),
    f"--workdir={workdir}",
    *overrides,
  ]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """The tiny config run to the end in one go, through the command line."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  subprocess.run(main_command(workdir), check=True, cwd=ROOT, capture_output=True)
  return workdir


def test_workdir_holds_summaries_checkpoints_and_sample_pngs(straight_run):
  from tensorboard.backend.event_processing import event_accumulator

  accumulator = event_accumulator.EventAccumulator(straight_run, size_guidance={"tensors": 0})
  accumulator.Reload()
  tags = accumulator.Tags()["tensors"]
  for tag in ("loss", "grad_norm", "learning_rate", "steps_per_sec", "samples"):
    assert tag in tags, (tag, tags)
  # training.eval_every_steps = 0: no sample-quality measurement, nothing of it prepared.
  assert not any(tag.startswith("train_eval/") for tag in tags)
  assert not os.path.exists(os.path.join(straight_run, "eval"))
  losses = accumulator.Tensors("loss")
  assert [event.step for event in losses] == [2, 4, 6]
  image_event = accumulator.Tensors("samples")[0]
  assert image_event.step == 6
  assert sorted(int(s) for s in os.listdir(os.path.join(straight_run, "checkpoints"))) == [3, 6]
  png = os.path.join(straight_run, "samples", "train_step_00000006.png")
  from PIL import Image

  with Image.open(png) as image:
    assert image.size == (38, 38)  # 2 x 2 grid of 16 x 16 with 2-pixel padding


def test_a_workdir_of_another_model_is_refused_and_left_untouched(straight_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight_run, workdir)
  before = {
    path: os.path.getmtime(os.path.join(root, path))
    for root, _, names in os.walk(workdir)
    for path in names
  }
  config = tiny.get_config()
  config.model.ch = 32
  config.training.num_train_steps = 12
  with pytest.raises(
    checkpointing.IncompatibleCheckpointError,
    match=r"latest step 6\) of a different model:\n  model.ch: config 32 vs "
    r"checkpoint 16",
  ):
    runs.train(config, workdir)
  after = {
    path: os.path.getmtime(os.path.join(root, path))
    for root, _, names in os.walk(workdir)
    for path in names
  }
  assert before == after


@pytest.mark.parametrize(
  "change, message",
  [
    (
      ("training", "batch_size", 12),
      r"training.batch_size=12 must be a positive multiple of "
      r"the number of devices, 8",
    ),
    (("data", "image_size", 15), r"image_size=15 must be divisible by 2\^\(levels-1\) = 2"),
    (("data", "source", "imagenet"), r"Unknown data.source 'imagenet'; allowed values"),
    (("diffusion", "schedule", "cosin"), r"Unknown diffusion.schedule 'cosin'"),
    (
      ("training", "steps_per_dispatch", 4),
      r"num_train_steps=6 must be a multiple of "
      r"training.steps_per_dispatch=4",
    ),
  ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, change, message, monkeypatch):
  config = tiny.get_config()
  section, key, value = change
  config[section][key] = value

  def no_model_yet(*args, **kwargs):
    raise AssertionError("the model was built (and compiled) before the config was checked")

  monkeypatch.setattr(loop, "create_train_state", no_model_yet)
  with pytest.raises(ValueError, match=message):
    runs.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_unknown_config_key_on_the_command_line_is_named(tmp_path):
  result = subprocess.run(
    main_command(str(tmp_path), "--config.training.bogus_key=1"),
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode != 0 and "bogus_key" in result.stderr
  assert not os.listdir(tmp_path)


def test_steps_per_dispatch_scan_matches_single_steps():
  config = tiny.get_config()
  config.training.num_train_steps = 2
  mesh = parallel.data_mesh()
  _, single = run_steps(config, mesh, 2)
  config.training.steps_per_dispatch = 2  # every interval a multiple of it, as the checks ask
  config.training.checkpoint_every_steps = config.training.sample_every_steps = 2
  run = runs.build(config)
  graphdef, _, current = state.create_train_state(run.unet, config.seed, mesh, run.optimizer)
  train_fn = train.make_train_fn(
    graphdef, run.schedule, run.optimizer, run.step_options, mesh, steps_per_dispatch=2
  )
  source = data_sources.create_source(config.data)
  batches = np.stack(
    [input_pipeline.local_batch(source, s, 8, config.seed, True, 0, 1) for s in range(2)]
  )
  current, metrics = train_fn(
    current, {"image": jax.device_put(batches, parallel.batch_sharding(mesh, 1))}
  )
  assert metrics["loss"].shape == (2,) and int(current.step) == 2
  for a, b in zip(jax.tree.leaves(jax.device_get(current.params)), jax.tree.leaves(single.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
