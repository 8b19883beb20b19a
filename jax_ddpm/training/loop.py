"""Training: the pure train step and `train_and_evaluate(config, workdir)`.

One train step (DDPM Algorithm 1): x_0 from the data, t ~ U{0..T-1} (or by importance,
timestep_sampling.py, or up to training.max_timestep only), eps ~ N(0, I), a gradient step on
the squared error of the network's prediction (eq. 14's L_simple for an eps network; for
config.diffusion.prediction = x0 or v the same mean squared error against x_0 or v;
training.loss_weighting weights it per timestep, training.objective = vlb replaces it by the
bound; see `diffusion.training_losses`), then the EMA of the parameters. A class-conditional
model gets the batch's labels, each replaced by the null label with probability
training.label_dropout (Ho & Salimans 2022, Algorithm 1). The step is one jitted function of
(state, batch): the batch is sharded over the mesh's 'data' axis, the state replicated, and its
random keys are the run's key folded with the step, so a resumed run repeats an uninterrupted
one exactly.

`train_and_evaluate` is a short loop over the named actions of a `TrainingRun`: dispatch steps,
write metrics, checkpoint, draw a sample grid, measure sample quality (training_eval.py), each
when due.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import periodic_actions
from flax import nnx
from jax.experimental import multihost_utils

from jax_ddpm.config import builders
from jax_ddpm.training import checkpointing
from jax_ddpm.config import checks as config_checks
from jax_ddpm.data import sources as data_sources
from jax_ddpm.diffusion import process as diffusion
from jax_ddpm.io import errors
from jax_ddpm.io import paths as files
from jax_ddpm.diffusion import guidance
from jax_ddpm.io import images as image_io
from jax_ddpm.data import pipeline as input_pipeline
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.samplers import program as sampling
from jax_ddpm.io import summaries
from jax_ddpm.diffusion import timesteps as timestep_sampling
from jax_ddpm.training import measurement as training_eval
from jax_ddpm.diffusion.schedules import DiffusionSchedule
from jax_ddpm.training.state import TrainState, create_train_state, run_metadata


def draw_timesteps(key: jax.Array, state: TrainState, batch_size: int, num_timesteps: int,
                   options: builders.StepOptions):
  """(t [B], per-example loss weights): by importance from the state's history, or uniform over
  {0..T-1} (DDPM Algorithm 1, line 3), or over {0..max_timestep} (training.max_timestep)."""
  if options.importance_sampling:
    return timestep_sampling.draw(key, state.timestep_history, batch_size)
  count = num_timesteps if options.max_timestep is None else options.max_timestep + 1
  return diffusion.sample_timesteps(key, batch_size, count), 1.0


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               schedule: DiffusionSchedule, optimizer: optax.GradientTransformation,
               options: builders.StepOptions) -> tuple[TrainState, dict]:
  """One step of DDPM Algorithm 1 plus the EMA update; returns (new state, metrics).

  batch: {"image": x_0 [B, H, W, C]} and, for a conditional model, "label" [B].
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  t_key, eps_key, dropout_key = jax.random.split(key, 3)
  x0 = batch["image"]
  t, t_weights = draw_timesteps(t_key, state, x0.shape[0], schedule.num_timesteps, options)
  eps = jax.random.normal(eps_key, x0.shape, jnp.float32)
  y = _dropped_labels(batch, options, jax.random.fold_in(key, 3))

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=dropout_key)
    losses = diffusion.training_losses(schedule, lambda x_t, t: model(x_t, t, y, rngs=rngs), x0,
                                       t, eps, options.prediction, options.loss_weights,
                                       learn_sigma=options.learn_sigma,
                                       vlb_weight=options.vlb_weight,
                                       objective=options.objective)
    loss = jnp.mean(losses * t_weights)
    injected = options.inject_nonfinite_at_steps
    if injected:  # fault injection (tests): a NaN loss, hence NaN gradients, at these steps
      loss = jnp.where(jnp.isin(state.step, jnp.asarray(injected)), jnp.nan, loss)
    return loss, losses

  (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = options.ema.decay_at(state.step)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  # A non-finite loss or gradient would poison the weights and Adam's moments for good: such an
  # update is withheld (both policies); "halt" then stops the run on the host.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  history = state.timestep_history
  if options.importance_sampling:
    history = keep_if_finite(timestep_sampling.record(history, t, losses), history)
  new_state = state.replace(
      step=state.step + 1, params=keep_if_finite(params, state.params),
      ema_params=keep_if_finite(ema_params, state.ema_params),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      timestep_history=history)
  metrics = {"loss": loss, "grad_norm": grad_norm,
             "learning_rate": options.learning_rate(state.step),
             "nonfinite": (~finite).astype(jnp.int32)}
  return new_state, metrics


def _dropped_labels(batch: dict, options: builders.StepOptions, key: jax.Array):
  """A conditional model's labels, each replaced by the null label with probability
  label_dropout (Ho & Salimans 2022, Algorithm 1); None for an unconditional model."""
  if options.num_classes is None:
    return None
  y = batch["label"]
  dropped = jax.random.bernoulli(key, options.label_dropout, y.shape)
  return jnp.where(dropped, guidance.null_label(options.num_classes), y)


def make_train_fn(graphdef, schedule: DiffusionSchedule, optimizer: optax.GradientTransformation,
                  options: builders.StepOptions, mesh: jax.sharding.Mesh, *,
                  steps_per_dispatch: int = 1, donate: bool = True) -> Callable:
  """jit(state, batch) -> (state, metrics), k = steps_per_dispatch steps per call.

  For k > 1 the batch is [k, B, H, W, C] and the steps run in one lax.scan; metrics are [k].
  The incoming state's buffers are donated (`donate=False` exists for benchmarks/NOTES.md).
  """
  step = functools.partial(train_step, graphdef=graphdef, schedule=schedule,
                           optimizer=optimizer, options=options)
  k = steps_per_dispatch

  def train_fn(state, batch):
    if k == 1:
      return step(state, batch)
    return jax.lax.scan(step, state, batch)

  replicated = parallel.replicated(mesh)
  return jax.jit(train_fn, donate_argnums=(0,) if donate else (),
                 in_shardings=(replicated, parallel.batch_sharding(mesh, int(k > 1))),
                 out_shardings=(replicated, replicated))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes training) a model as `config` says, writing everything under workdir."""
  mesh = parallel.data_mesh()
  config_checks.validate_training(config, mesh.size, jax.process_count())
  training_eval.validate(config, mesh.size)
  preemption = PreemptionWatch()  # from here on SIGTERM means: checkpoint, then exit
  run = None
  try:
    run = TrainingRun(config, workdir, mesh)
    while run.step < run.training.num_train_steps:
      run.dispatch()
      run.write_metrics_if_due()
      preempted = preemption.reached(run.step)
      run.checkpoint_if_due(preempted)
      if preempted:
        logging.warning("Preemption notice (SIGTERM): saved the checkpoint of step %d; "
                        "exiting. The same command resumes from it.", run.step)
        break
      run.sample_if_due()
      run.eval_if_due(stop=preemption.pending)
    run.check_finite(run.unchecked)
    return run.state
  finally:
    if run is not None:
      run.close()  # waits for the last asynchronous save, still under the SIGTERM watch
    preemption.close()


class TrainingRun:
  """A run's parts (state, compiled step, input, checkpoints, summaries) and its periodic actions.

  `train_and_evaluate` is the loop; each method here is one named action of it.
  """

  def __init__(self, config, workdir: str, mesh: jax.sharding.Mesh):
    self.config, self.workdir, self.training = config, workdir, config.training
    source = _checked_source(config)
    self.meta = run_metadata(config)
    self.checkpointer = checkpointing.Checkpointer(workdir, keep=self.training.keep_checkpoints)
    try:
      self._set_up(source, mesh)
    except BaseException:
      # The caller gets no run to close: an orbax manager left open (e.g. after an unreadable
      # checkpoint) keeps its threads and event loop until exit.
      self.close()
      raise

  def _set_up(self, source, mesh):
    """The state (restored or fresh), summaries, compiled functions, input and progress report."""
    config = self.config
    train_graphdef, eval_graphdef = self._restore_or_init(mesh)
    self.step = int(self.state.step)
    self.writer = summaries.create_writer(self.workdir, just_logging=jax.process_index() > 0)
    if self.step == 0:
      self.writer.write_hparams(_flatten(config.to_dict()))
    self._compile(train_graphdef, eval_graphdef, mesh)
    k = self.training.steps_per_dispatch
    self.batches = input_pipeline.BatchIterator(
        source, first_step=self.step, global_batch=self.training.batch_size, seed=config.seed,
        random_flip=config.data.random_flip, sharding=parallel.batch_sharding(mesh, int(k > 1)),
        steps_per_dispatch=k, labels=config.model.num_classes is not None)
    self.report_progress = periodic_actions.ReportProgress(
        num_train_steps=self.training.num_train_steps, writer=self.writer,
        every_steps=self.training.log_every_steps)
    self.pending_metrics, self.wait_time = [], 0.0
    self.unchecked = None  # (first step, metrics) of the last dispatch, checked after the next
    self.in_flight = parallel.DispatchLimit()

  def _restore_or_init(self, mesh):
    """A fresh state, or the latest checkpoint's if the workdir has one of this model."""
    latest = self.checkpointer.latest_step()
    if latest is not None:
      self.checkpointer.check_compatible(latest, self.meta)
    self.optimizer = builders.optimizer(self.config)
    train_graphdef, eval_graphdef, self.state = create_train_state(
        builders.unet_config(self.config), self.config.seed, mesh, self.optimizer,
        builders.history_timesteps(self.config))
    if latest is not None:
      self.state, restored_step = self.checkpointer.restore_latest(
          self.state, fallback=self.training.restore_fallback)
      logging.info("Resumed from the checkpoint of step %d in %s.", restored_step,
                   self.checkpointer.directory)
    return train_graphdef, eval_graphdef

  def _compile(self, train_graphdef, eval_graphdef, mesh):
    """The train step and the sample-grid program (compiled at their first call)."""
    config, k = self.config, self.training.steps_per_dispatch
    if k > 1 and jax.default_backend() == "cpu":
      logging.warning("training.steps_per_dispatch=%d on CPU: XLA's CPU backend runs convolutions "
                      "inside loops far more slowly (15x measured, benchmarks/NOTES.md, 6); 1 is "
                      "faster here.", k)
    schedule = builders.schedule(config)
    self.train_fn = make_train_fn(train_graphdef, schedule, self.optimizer,
                                  builders.step_options(config), mesh, steps_per_dispatch=k)
    num_images = sampling.padded_count(self.training.num_sample_images, mesh)
    shape = (num_images, config.data.image_size, config.data.image_size, config.data.channels)
    self.sample_fn = sampling.make_sample_fn(
        eval_graphdef, schedule, shape, mesh,
        builders.grid_sampler(config),
        **builders.sampling_options(config))
    self.training_eval = (
        training_eval.TrainingEval(config, self.workdir, mesh, eval_graphdef, schedule)
        if self.training.eval_every_steps else None)

  def _due(self, every: int) -> bool:
    return self.step % every == 0 or self.step == self.training.num_train_steps

  def dispatch(self):
    """k train steps in one call; with the 'halt' policy, checks the previous call's flags."""
    waited = time.perf_counter()
    batch = next(self.batches)
    self.wait_time += time.perf_counter() - waited
    with jax.profiler.StepTraceAnnotation("train", step_num=self.step):
      self.state, metrics = self.train_fn(self.state, batch)
    self.in_flight.add(metrics)
    if self.training.nonfinite_policy == "halt":
      # Checking one dispatch behind keeps the device busy while the host looks.
      self.check_finite(self.unchecked)
      self.unchecked = (self.step, metrics)
    self.step += self.training.steps_per_dispatch
    self.pending_metrics.append(metrics)
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
      self.checkpointer.save(self.step, self.state, self.meta)

  def sample_if_due(self):
    """DDIM samples from the EMA params: an image summary and samples/train_step_<step>.png."""
    if not self._due(self.training.sample_every_steps):
      return
    with self.report_progress.timed("sample"):
      rng = jax.random.key(self.config.seed + 1)
      images, labels = sampling.draw_batch(self.sample_fn, self.state.ema_params, rng, self.step)
      count = self.training.num_sample_images
      grid = (image_io.image_grid(images[:count]) if labels is None
              else image_io.class_grid(images[:count], labels[:count]))
      self.writer.write_images(self.step, {"samples": grid[None]})
      if jax.process_index() == 0:
        image_io.save_png(files.join(self.workdir, "samples",
                                       f"train_step_{self.step:08d}.png"), grid)

  def eval_if_due(self, stop: Callable[[], bool]):
    """Sample quality of the EMA params as train_eval/ scalars (training_eval.py)."""
    if self.training_eval is None or not self._due(self.training.eval_every_steps):
      return
    with self.report_progress.timed("eval"):
      scalars = self.training_eval(self.state.ema_params, stop)
    if scalars is None:
      logging.info("Preemption notice: skipped the sample-quality measurement of step %d.",
                   self.step)
      return
    self.writer.write_scalars(self.step, scalars)
    logging.info("Sample quality at step %d: %s", self.step,
                 {k: round(float(v), 4) for k, v in scalars.items()})

  def check_finite(self, unchecked):
    """Raises FloatingPointError if the dispatch `unchecked` = (first step, metrics) went bad."""
    if self.training.nonfinite_policy == "halt":
      _halt_if_nonfinite(unchecked, self.checkpointer)

  def close(self):
    """Stops the input workers, waits for the last asynchronous save, flushes the summaries."""
    if hasattr(self, "batches"):
      self.batches.close()
    self.checkpointer.close()
    if hasattr(self, "writer"):
      self.writer.flush()


def _checked_source(config) -> data_sources.ImageSource:
  """config.data's source, with labels for a conditional model; fails naming the keys when its
  images have another shape or its labels do not fit model.num_classes."""
  num_classes = config.model.num_classes
  source = data_sources.create_source(config.data, labels=num_classes is not None)
  data_sources.check_source_shape(source, config.data)
  if num_classes is not None:
    found = source.num_classes
    if found is None:
      raise errors.ConfigError(f"model.num_classes={num_classes} asks for a conditional model, "
                               f"but data.source={config.data.source!r} yields no labels.")
    if found > num_classes:
      raise errors.ConfigError(f"data.source={config.data.source!r} has {found} classes, more "
                               f"than model.num_classes={num_classes}.")
  return source


class PreemptionWatch:
  """Whether a preemption notice (SIGTERM) has arrived, agreed on by every process.

  With several processes JAX's preemption service catches SIGTERM and picks a step that all
  processes reach (`reached_preemption_sync_point`); a single process installs its own handler.
  """

  def __init__(self):
    self._received = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._received = True

  def pending(self) -> bool:
    """A notice this process has seen and not yet acted on: with one process, whether SIGTERM
    arrived; with several, False (they agree on a step only at the step boundaries)."""
    return jax.process_count() == 1 and self._received

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _halt_if_nonfinite(unchecked, checkpointer) -> None:
  """Raises FloatingPointError if the dispatch `unchecked` = (first step, metrics) went bad."""
  if unchecked is None:
    return
  first_step, metrics = unchecked
  flags = np.atleast_1d(np.asarray(jax.device_get(metrics["nonfinite"])))
  if flags.any():
    bad_step = first_step + int(np.argmax(flags))
    checkpointer.wait_until_finished()
    latest = checkpointer.latest_step()
    kept = (f"the last checkpoint, step {latest}, is kept in {checkpointer.directory}"
            if latest is not None else "no checkpoint had been written yet")
    raise FloatingPointError(
        f"Non-finite loss or gradient at step {bad_step} (training.nonfinite_policy='halt'); "
        f"its update was not applied and {kept}. Set training.nonfinite_policy='skip' to "
        "withhold such updates and go on.")


def _mean_metrics(metrics: list[dict]) -> dict[str, float]:
  host = jax.device_get(metrics)
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

