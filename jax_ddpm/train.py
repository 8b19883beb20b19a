"""Training: the pure train step and `train_and_evaluate(config, workdir)`.

One train step (DDPM Algorithm 1): x_0 from the data, t ~ U{0..T-1}, eps ~ N(0, I), a gradient
step on the squared error of the network's prediction (eq. 14's L_simple for an eps network;
for config.diffusion.prediction = x0 or v the same mean squared error against x_0 or v, see
`diffusion.training_losses`), then the EMA of the parameters. The step is
one jitted function of (state, batch): the batch is sharded over the mesh's 'data' axis, the
state replicated, and its random keys are the run's key folded with the step, so a resumed run
repeats an uninterrupted one exactly.
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

from jax_ddpm import (checkpointing, config_checks, diffusion, files, input_pipeline, parallel,
                      samplers, sampling, summaries)
from jax_ddpm.schedules import DiffusionSchedule
from jax_ddpm.state import (TrainState, create_train_state, create_optimizer, ema_decay_at,
                            learning_rate_schedule, run_metadata, schedule_from_config)


def train_step(state: TrainState, x0: jax.Array, *, graphdef: nnx.GraphDef,
               schedule: DiffusionSchedule, optimizer: optax.GradientTransformation,
               config) -> tuple[TrainState, dict]:
  """One step of DDPM Algorithm 1 plus the EMA update; returns (new state, metrics)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  t_key, eps_key, dropout_key = jax.random.split(key, 3)
  batch = x0.shape[0]
  t = diffusion.sample_timesteps(t_key, batch, schedule.num_timesteps)
  eps = jax.random.normal(eps_key, x0.shape, jnp.float32)

  def loss_fn(params):
    model = nnx.merge(graphdef, params)
    rngs = nnx.Rngs(dropout=dropout_key)
    losses = diffusion.training_losses(schedule, lambda x_t, t: model(x_t, t, rngs=rngs), x0, t,
                                       eps, config.diffusion.prediction)
    loss = jnp.mean(losses)
    injected = tuple(config.debug.inject_nonfinite_at_steps)
    if injected:  # fault injection (tests): a NaN loss, hence NaN gradients, at these steps
      loss = jnp.where(jnp.isin(state.step, jnp.asarray(injected)), jnp.nan, loss)
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, config.optim)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  # A non-finite loss or gradient would poison the weights and Adam's moments for good: such an
  # update is withheld (both policies); "halt" then stops the run on the host.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  new_state = state.replace(
      step=state.step + 1, params=keep_if_finite(params, state.params),
      ema_params=keep_if_finite(ema_params, state.ema_params),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
  metrics = {"loss": loss, "grad_norm": grad_norm,
             "learning_rate": learning_rate_schedule(config.optim)(state.step),
             "nonfinite": (~finite).astype(jnp.int32)}
  return new_state, metrics


def make_train_fn(graphdef, schedule, optimizer, config, mesh, *, donate: bool = True
                  ) -> Callable:
  """jit(state, batch) -> (state, metrics), k = steps_per_dispatch steps per call.

  For k > 1 the batch is [k, B, H, W, C] and the steps run in one lax.scan; metrics are [k].
  The incoming state's buffers are donated (`donate=False` exists for benchmarks/NOTES.md).
  """
  step = functools.partial(train_step, graphdef=graphdef, schedule=schedule,
                           optimizer=optimizer, config=config)
  k = config.training.steps_per_dispatch

  def train_fn(state, batch):
    if k == 1:
      return step(state, batch)
    return jax.lax.scan(step, state, batch)

  replicated = parallel.replicated(mesh)
  return jax.jit(train_fn, donate_argnums=(0,) if donate else (),
                 in_shardings=(replicated, parallel.batch_sharding(mesh, int(k > 1))),
                 out_shardings=(replicated, replicated))


def write_sample_grid(sample_fn, state: TrainState, config, workdir: str, writer, step: int):
  """DDIM samples from the EMA params: an image summary and samples/train_step_<step>.png."""
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)
  images = multihost_utils.process_allgather(sample_fn(state.ema_params, rng), tiled=True)
  images = sampling.to_uint8(images)[:config.training.num_sample_images]
  grid = sampling.image_grid(images)
  writer.write_images(step, {"samples": grid[None]})
  if jax.process_index() == 0:
    sampling.save_png(files.join(workdir, "samples", f"train_step_{step:08d}.png"), grid)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes training) a model as `config` says, writing everything under workdir."""
  mesh = parallel.data_mesh()
  config_checks.validate_training(config, mesh.size, jax.process_count())
  preemption = PreemptionWatch()  # from here on SIGTERM means: checkpoint, then exit
  try:
    return _train(config, workdir, mesh, preemption)
  finally:
    preemption.close()


def _train(config, workdir: str, mesh, preemption: "PreemptionWatch") -> TrainState:
  source = input_pipeline.create_source(config.data)
  input_pipeline.check_source_shape(source, config.data)

  meta = run_metadata(config)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.training.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    checkpointer.check_compatible(latest, meta)

  schedule = schedule_from_config(config)
  optimizer = create_optimizer(config.optim)
  train_graphdef, eval_graphdef, state = create_train_state(config, mesh, optimizer)
  if latest is not None:
    state, restored_step = checkpointer.restore_latest(
        state, fallback=config.training.restore_fallback)
    logging.info("Resumed from the checkpoint of step %d in %s.", restored_step,
                 checkpointer.directory)
  start_step = int(state.step)
  training = config.training
  k = training.steps_per_dispatch
  if k > 1 and jax.default_backend() == "cpu":
    logging.warning("training.steps_per_dispatch=%d on CPU: XLA's CPU backend runs convolutions "
                    "inside loops far more slowly (15x measured, benchmarks/NOTES.md, 6); 1 is "
                    "faster here.", k)

  writer = summaries.create_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(_flatten(config.to_dict()))
  train_fn = make_train_fn(train_graphdef, schedule, optimizer, config, mesh)
  num_images = sampling.padded_count(training.num_sample_images, mesh)
  shape = (num_images, config.data.image_size, config.data.image_size, config.data.channels)
  sample_fn = sampling.make_sample_fn(
      eval_graphdef, schedule, shape, mesh, samplers.DDIM(num_steps=training.sample_ddim_steps),
      **sampling.sampler_options(config))
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=training.num_train_steps, writer=writer,
      every_steps=training.log_every_steps)

  batches = input_pipeline.BatchIterator(
      source, first_step=start_step, global_batch=training.batch_size, seed=config.seed,
      random_flip=config.data.random_flip, sharding=parallel.batch_sharding(mesh, int(k > 1)),
      steps_per_dispatch=k)
  pending_metrics = []
  step = start_step
  wait_time = 0.0
  unchecked = None  # (first step, metrics) of the last dispatch, checked after the next one
  in_flight = parallel.DispatchLimit()
  try:
    while step < training.num_train_steps:
      waited = time.perf_counter()
      batch = next(batches)
      wait_time += time.perf_counter() - waited
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_fn(state, batch)
      in_flight.add(metrics)
      if training.nonfinite_policy == "halt":
        # Checking one dispatch behind keeps the device busy while the host looks.
        _halt_if_nonfinite(unchecked, checkpointer)
        unchecked = (step, metrics)
      step += k
      pending_metrics.append(metrics)
      report_progress(step)
      if step % training.log_every_steps == 0 or step == training.num_train_steps:
        scalars = _mean_metrics(pending_metrics)
        scalars.pop("nonfinite")
        scalars["nonfinite_steps"] = int(state.nonfinite_steps)
        scalars["data_wait_seconds"] = wait_time  # time the step loop waited on the input
        writer.write_scalars(step, scalars)
        pending_metrics, wait_time = [], 0.0
      preempted = preemption.reached(step)
      if (step % training.checkpoint_every_steps == 0 or step == training.num_train_steps
          or preempted):
        if training.nonfinite_policy == "halt":
          _halt_if_nonfinite(unchecked, checkpointer)  # never save past a halt
        checkpointer.save(step, state, meta)
      if preempted:
        logging.warning("Preemption notice (SIGTERM): saved the checkpoint of step %d; "
                        "exiting. The same command resumes from it.", step)
        break
      if step % training.sample_every_steps == 0 or step == training.num_train_steps:
        with report_progress.timed("sample"):
          write_sample_grid(sample_fn, state, config, workdir, writer, step)
    if training.nonfinite_policy == "halt":
      _halt_if_nonfinite(unchecked, checkpointer)
  finally:
    batches.close()
    checkpointer.close()  # waits for the last asynchronous save
    writer.flush()
  return state


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

