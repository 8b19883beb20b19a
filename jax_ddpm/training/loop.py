"""The training loop: `train_and_evaluate(run, workdir)` trains, or resumes, a run.

A short loop over the named actions of a `Trainer`: dispatch train steps (step.py), write
metrics, checkpoint, draw a sample grid, measure sample quality (measurement.py), each when due.
A preemption notice (SIGTERM) checkpoints the step in flight and ends the run; a non-finite loss
halts it (training.nonfinite_policy = halt) with the last checkpoint kept. Every check of the run
against the machine and the files (device counts, data, weights, the workdir's checkpoints) runs
before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import logging

from jax_ddpm.data import captions, pipeline, sources
from jax_ddpm.evaluation import features, inception_weights, metrics, scoring
from jax_ddpm.io import errors, summaries
from jax_ddpm.io import images as image_io
from jax_ddpm.io import paths as files
from jax_ddpm.runtime import mesh as mesh_lib
from jax_ddpm.runtime.preemption import PreemptionWatch
from jax_ddpm.samplers import program
from jax_ddpm.training import checkpointing, measurement, progress
from jax_ddpm.training.state import TrainState, create_train_state
from jax_ddpm.training.step import make_train_fn

if TYPE_CHECKING:
  from jax_ddpm.config.builders import Run


def train_and_evaluate(run: Run, workdir: str) -> TrainState:
  """Trains (or resumes training) `run`, writing everything under workdir."""
  mesh = mesh_lib.data_mesh()
  check_machine(run, mesh)
  preemption = PreemptionWatch()  # from here on SIGTERM means: checkpoint, then exit
  trainer = None
  try:
    trainer = Trainer(run, workdir, mesh)
    while trainer.step < run.config.training.num_train_steps:
      trainer.dispatch()
      trainer.write_metrics_if_due()
      preempted = preemption.reached(trainer.step)
      trainer.checkpoint_if_due(preempted)
      if preempted:
        logging.warning(
          "Preemption notice (SIGTERM): saved the checkpoint of step %d; "
          "exiting. The same command resumes from it.",
          trainer.step,
        )
        break
      trainer.sample_if_due()
      trainer.eval_if_due(stop=preemption.pending)
    trainer.check_finite(trainer.unchecked)
    return trainer.state
  finally:
    if trainer is not None:
      trainer.close()  # waits for the last asynchronous save, still under the SIGTERM watch
    preemption.close()


def check_machine(run: Run, mesh: jax.sharding.Mesh) -> None:
  """What the run asks of this machine: batches the devices and processes divide, and the
  in-training measurement's sample count and weights file."""
  training, evaluation = run.config.training, run.config.eval
  mesh_lib.check_divisible(training.batch_size, "training.batch_size", mesh.size)
  mesh_lib.check_divisible(
    training.batch_size, "training.batch_size", jax.process_count(), "processes"
  )
  if not training.eval_every_steps:
    return
  metrics.check_full_rank_possible(
    training.eval_num_samples,
    features.FEATURE_DIMS[evaluation.feature_net],
    f"training.eval_num_samples={training.eval_num_samples}",
  )
  if evaluation.feature_net == "inception":  # read at start-up: fail before any compile
    files.require_file(
      evaluation.inception_weights or inception_weights.default_path(),
      "eval.inception_weights",
      inception_weights.HOW_TO_GET,
    )
  mesh_lib.check_divisible(run.config.sampling.batch_size, "sampling.batch_size", mesh.size)


class Trainer:
  """A run's live parts (state, compiled step, input, checkpoints, summaries) and its periodic
  actions; `train_and_evaluate` is the loop, each method here one named action of it."""

  def __init__(self, run: Run, workdir: str, mesh: jax.sharding.Mesh):
    self.run, self.workdir, self.training = run, workdir, run.config.training
    self.batches = self.writer = None  # set up below; close() handles a set-up that failed
    source = checked_source(run.config, workdir)
    run.codec  # noqa: B018 (a latent run reads its autoencoder now: fail before any compile)
    self.checkpointer = checkpointing.Checkpointer(workdir, keep=self.training.keep_checkpoints)
    try:
      self._set_up(source, mesh)
    except BaseException:
      # The caller gets no trainer to close: an orbax manager left open (e.g. after an
      # unreadable checkpoint) keeps its threads and event loop until exit.
      self.close()
      raise

  def _set_up(self, source: sources.ImageSource, mesh: jax.sharding.Mesh):
    """The state (restored or fresh), summaries, compiled functions, input and progress report."""
    config = self.run.config
    train_graphdef, eval_graphdef = self._restore_or_init(mesh)
    self.step = int(self.state.step)
    self.writer = summaries.create_writer(self.workdir, just_logging=jax.process_index() > 0)
    if self.step == 0:
      self.writer.write_hparams(_flatten(self.run.metadata["config"]))
    self._compile(train_graphdef, eval_graphdef, mesh)
    k = self.training.steps_per_dispatch
    self.batches = pipeline.BatchIterator(
      source,
      first_step=self.step,
      global_batch=self.training.batch_size,
      seed=config.seed,
      random_flip=config.data.random_flip,
      sharding=mesh_lib.batch_sharding(mesh, int(k > 1)),
      steps_per_dispatch=k,
      labels=config.model.num_classes is not None or config.model.prompts,
    )
    self.report_progress = progress.reporter(
      self.training.num_train_steps, self.writer, self.training.log_every_steps
    )
    self.pending_metrics, self.wait_time = [], 0.0
    self.unchecked = None  # (first step, metrics) of the last dispatch, checked after the next
    self.in_flight = mesh_lib.DispatchLimit()

  def _restore_or_init(self, mesh: jax.sharding.Mesh):
    """A fresh state, or the latest checkpoint's if the workdir has one of this model."""
    latest = self.checkpointer.latest_step()
    if latest is not None:
      self.checkpointer.check_compatible(latest, self.run.metadata)
    train_graphdef, eval_graphdef, self.state = create_train_state(
      self.run.network, self.run.config.seed, mesh, self.run.optimizer, self.run.history_timesteps
    )
    if latest is not None:
      self.state, restored_step = self.checkpointer.restore_latest(
        self.state, fallback=self.training.restore_fallback
      )
      logging.info(
        "Resumed from the checkpoint of step %d in %s.", restored_step, self.checkpointer.directory
      )
    return train_graphdef, eval_graphdef

  def _compile(self, train_graphdef, eval_graphdef, mesh: jax.sharding.Mesh):
    """The train step, the sample-grid program and the measurement (compiled at first call)."""
    run, k = self.run, self.training.steps_per_dispatch
    if k > 1 and jax.default_backend() == "cpu":
      logging.warning(
        "training.steps_per_dispatch=%d on CPU: XLA's CPU backend runs convolutions "
        "inside loops far more slowly (docs/benchmarks.md); 1 is faster here.",
        k,
      )
    self.train_fn = make_train_fn(
      train_graphdef,
      run.schedule,
      run.optimizer,
      run.step_options,
      mesh,
      steps_per_dispatch=k,
      encode=run.encode,
    )
    count = program.padded_count(self.training.num_sample_images, mesh)
    self.sample_fn = program.make_sample_fn(
      eval_graphdef,
      run.schedule,
      (count, *run.sample_shape),
      mesh,
      run.grid_sampler,
      run.sampling_options,
      decode=run.decode,
    )
    self.measurement = (
      self._measurement(eval_graphdef, mesh) if self.training.eval_every_steps else None
    )

  def _measurement(self, eval_graphdef, mesh: jax.sharding.Mesh) -> measurement.Measurement:
    """The in-training measurement: its feature network (the run's own classifier, trained
    now if the workdir lacks it), cached references and compiled sampler."""
    run = self.run
    evaluation = run.config.eval
    if evaluation.feature_net == "classifier":
      path = measurement.classifier_path(self.workdir)
      measurement.train_classifier_if_missing(run.config, path)
      evaluation = dataclasses.replace(evaluation, classifier=path)
    evaluation = dataclasses.replace(evaluation, inception_score=False)
    extractor = features.create_extractor(evaluation, run.config.data, self.workdir, mesh)
    scorer = scoring.Scorer.create(extractor, evaluation, run.config.data, self.workdir, kid=False)
    batch_size = run.config.sampling.batch_size
    sample_fn = program.make_sample_fn(
      eval_graphdef,
      run.schedule,
      (batch_size, *run.sample_shape),
      mesh,
      run.measurement_sampler,
      run.sampling_options,
      decode=run.decode,
    )
    return measurement.Measurement(
      sample_fn, scorer, self.training.eval_num_samples, batch_size, run.config.sampling.seed
    )

  def _due(self, every: int) -> bool:
    return self.step % every == 0 or self.step == self.training.num_train_steps

  def dispatch(self):
    """k train steps in one call; with the 'halt' policy, checks the previous call's flags."""
    waited = time.perf_counter()
    batch = next(self.batches)
    self.wait_time += time.perf_counter() - waited
    with jax.profiler.StepTraceAnnotation("train", step_num=self.step):
      self.state, step_metrics = self.train_fn(self.state, batch)
    self.in_flight.add(step_metrics)
    if self.training.nonfinite_policy == "halt":
      # Checking one dispatch behind keeps the device busy while the host looks.
      self.check_finite(self.unchecked)
      self.unchecked = (self.step, step_metrics)
    self.step += self.training.steps_per_dispatch
    self.pending_metrics.append(step_metrics)
    self.report_progress(self.step)

  def write_metrics_if_due(self):
    """Mean loss, gradient norm, learning rate and input wait since the last write."""
    if not self._due(self.training.log_every_steps):
      return
    scalars = _mean_metrics(self.pending_metrics)
    scalars.pop("nonfinite")
    scalars["nonfinite_steps"] = int(self.state.nonfinite_steps)
    scalars["data_wait_seconds"] = self.wait_time  # time the step loop waited on the input
    self.writer.write_scalars(self.step, scalars)
    self.pending_metrics, self.wait_time = [], 0.0

  def checkpoint_if_due(self, now: bool = False):
    if self._due(self.training.checkpoint_every_steps) or now:
      self.check_finite(self.unchecked)  # never save past a halt
      self.checkpointer.save(self.step, self.state, self.run.metadata)

  def sample_if_due(self):
    """DDIM samples from the EMA params: an image summary and samples/train_step_<step>.png."""
    if not self._due(self.training.sample_every_steps):
      return
    with self.report_progress.timed("sample"):
      rng = jax.random.key(self.run.config.seed + 1)
      images, labels = program.draw_batch(self.sample_fn, self.state.ema_params, rng, self.step)
      count = self.training.num_sample_images
      grid = (
        image_io.image_grid(images[:count])
        if labels is None
        else image_io.class_grid(images[:count], labels[:count])
      )
      self.writer.write_images(self.step, {"samples": grid[None]})
      if jax.process_index() == 0:
        files.save_png(files.join(self.workdir, "samples", f"train_step_{self.step:08d}.png"), grid)

  def eval_if_due(self, stop: Callable[[], bool]):
    """Sample quality of the EMA params as train_eval/ scalars (measurement.py)."""
    if self.measurement is None or not self._due(self.training.eval_every_steps):
      return
    with self.report_progress.timed("eval"):
      scalars = self.measurement(self.state.ema_params, stop)
    if scalars is None:
      logging.info(
        "Preemption notice: skipped the sample-quality measurement of step %d.", self.step
      )
      return
    self.writer.write_scalars(self.step, scalars)
    logging.info(
      "Sample quality at step %d: %s",
      self.step,
      {k: round(float(v), 4) for k, v in scalars.items()},
    )

  def check_finite(self, unchecked):
    """Raises FloatingPointError if the dispatch `unchecked` = (first step, metrics) went bad."""
    if self.training.nonfinite_policy == "halt":
      _halt_if_nonfinite(unchecked, self.checkpointer)

  def close(self):
    """Stops the input workers, waits for the last asynchronous save, flushes the summaries."""
    if self.batches is not None:
      self.batches.close()
    self.checkpointer.close()
    if self.writer is not None:
      self.writer.flush()


def checked_source(config, workdir: str | None = None) -> sources.ImageSource:
  """The data section's source, with labels for a conditional model and captions for a text
  model; fails naming the keys when its images have another shape or its labels do not fit
  model.num_classes."""
  num_classes = config.model.num_classes
  labelled = num_classes is not None or config.model.prompts
  source = sources.create_source(config.data, labels=labelled)
  sources.check_source_shape(source, config.data)
  if config.model.prompts:
    return captioned_source(source, workdir)
  if num_classes is not None:
    found = source.num_classes
    if found is None:
      raise errors.ConfigError(
        f"model.num_classes={num_classes} asks for a conditional model, "
        f"but data.source={config.data.source!r} yields no labels."
      )
    if found > num_classes:
      raise errors.ConfigError(
        f"data.source={config.data.source!r} has {found} classes, more "
        f"than model.num_classes={num_classes}."
      )
  return source


def captioned_source(source: sources.ImageSource, workdir: str | None):
  """The digits with their captions as labels, cut at the terciles of (up to 10000 of) the
  training digits; the terciles are written to workdir/caption_bins.json."""
  bins = captions.CaptionBins.from_images(source.read(np.arange(min(len(source), 10_000))))
  if workdir is not None and jax.process_index() == 0:
    files.save_json(files.join(workdir, "caption_bins.json"), dataclasses.asdict(bins))
  return captions.CaptionedSource(source, bins)


def _halt_if_nonfinite(unchecked, checkpointer: checkpointing.Checkpointer) -> None:
  """Raises FloatingPointError if the dispatch `unchecked` = (first step, metrics) went bad."""
  if unchecked is None:
    return
  first_step, step_metrics = unchecked
  flags = np.atleast_1d(np.asarray(jax.device_get(step_metrics["nonfinite"])))
  if flags.any():
    bad_step = first_step + int(np.argmax(flags))
    checkpointer.wait_until_finished()
    latest = checkpointer.latest_step()
    kept = (
      f"the last checkpoint, step {latest}, is kept in {checkpointer.directory}"
      if latest is not None
      else "no checkpoint had been written yet"
    )
    raise FloatingPointError(
      f"Non-finite loss or gradient at step {bad_step} (training.nonfinite_policy='halt'); "
      f"its update was not applied and {kept}. Set training.nonfinite_policy='skip' to "
      "withhold such updates and go on."
    )


def _mean_metrics(step_metrics: list[dict]) -> dict[str, float]:
  host = jax.device_get(step_metrics)
  return {name: float(np.mean([np.mean(m[name]) for m in host])) for name in host[0]}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
  return flat
