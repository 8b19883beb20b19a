"""Latent diffusion's first stage as a run of its own: training the autoencoder
(models/autoencoder.py), its checkpoints, and loading it for the diffusion stage.

`make_train_step` is the pure, jitted Adam step on the autoencoder's loss (reconstruction + a
small KL term); `train_and_save` is --mode=train_autoencoder: that step over the data section's
batches (data/pipeline.py), CLU summaries, orbax checkpoints in the workdir that resume after
preemption, each saved with the latent scale factor, and a picture of reconstructions;
`latent_scale` is 1 / the standard deviation of the training latents z ~ q(z | x) (LDM Sec.
4.3.2), so that z * scale has unit variance, as the diffusion schedule assumes of its data;
checkpointing.load_codec reads it back with the weights for the diffusion stage. `fit` trains
on in-memory images (tests, notebooks).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from jax_ddpm.data import pipeline, sources
from jax_ddpm.io import errors, summaries
from jax_ddpm.io import images as image_io
from jax_ddpm.io import paths as files
from jax_ddpm.models import autoencoder as autoencoder_lib
from jax_ddpm.runtime import mesh as mesh_lib
from jax_ddpm.runtime.preemption import PreemptionWatch
from jax_ddpm.training import checkpointing
from jax_ddpm.training import state as state_lib

if TYPE_CHECKING:
  from jax_ddpm.config.run_config import RunConfig


class FitResult(NamedTuple):
  model: autoencoder_lib.Autoencoder
  losses: np.ndarray  # [steps, 3]: total, reconstruction, KL per pixel
  scale_factor: float


def to_float(images: np.ndarray) -> jnp.ndarray:
  """uint8 images -> float32 in [-1, 1]."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
  """A jitted fn(params, opt_state, images float [-1, 1], rng) -> (params, opt_state, (total,
  reconstruction, kl))."""

  def objective(params, images, rng):
    return autoencoder_lib.loss(nnx.merge(graphdef, params), images, rng)

  @jax.jit
  def step(params, opt_state, images, rng):
    (total, (reconstruction, kl)), grads = jax.value_and_grad(objective, has_aux=True)(
      params, images, rng
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jnp.stack([total, reconstruction, kl])

  return step


def latent_scale(model: autoencoder_lib.Autoencoder, images: np.ndarray, seed: int = 0) -> float:
  """1 / std of z ~ q(z | x) over `images` (uint8), LDM's scale factor."""
  mean, log_variance = jax.jit(lambda x: model.encode(x))(to_float(images))
  z = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(jax.random.key(seed), mean.shape)
  return float(1.0 / jnp.std(z))


def fit(
  config: autoencoder_lib.AutoencoderConfig,
  images: np.ndarray,
  *,
  steps: int,
  batch_size: int,
  learning_rate: float = 1e-3,
  seed: int = 0,
) -> FitResult:
  """The autoencoder trained for `steps` Adam steps on batches drawn from uint8 `images`."""
  model = autoencoder_lib.Autoencoder(config, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)
  step = make_train_step(graphdef, optimizer)
  order = np.random.default_rng(seed)
  rng, losses = jax.random.key(seed), []
  for index in range(steps):
    batch = to_float(images[order.choice(len(images), batch_size, replace=False)])
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(rng, index))
    losses.append(metrics)
  model = nnx.merge(graphdef, params)
  return FitResult(model, np.asarray(jnp.stack(losses)), latent_scale(model, images[:1000]))


def metadata(
  config: RunConfig, network: autoencoder_lib.AutoencoderConfig, scale_factor: float | None = None
) -> dict:
  """The JSON beside each checkpoint: the architecture (what a reader checks), the latent
  scale factor measured at that step, and the whole run config."""
  return {
    "autoencoder": checkpointing.autoencoder_record(network),
    "scale_factor": scale_factor,
    "config": dataclasses.asdict(config),
  }


def train_and_save(
  config: RunConfig, network: autoencoder_lib.AutoencoderConfig, workdir: str
) -> dict:
  """--mode=train_autoencoder: trains (or resumes) `network` (the autoencoder section's,
  config/builders.py's autoencoder_config) on the data section's images; returns the last
  checkpoint's metadata (with its scale factor) and the held-out reconstruction error."""
  section, mesh = config.autoencoder, mesh_lib.data_mesh()
  mesh_lib.check_divisible(section.batch_size, "autoencoder.batch_size", mesh.size)
  source = sources.create_source(config.data)
  sources.check_source_shape(source, config.data)
  if len(source) <= section.heldout_images:
    raise errors.ConfigError(
      f"autoencoder.heldout_images={section.heldout_images} leaves none of the "
      f"{len(source)} images of data.source={config.data.source!r} to train on."
    )
  # Every k-th image held out: spread over the source, whatever order its labels come in.
  heldout_indices = np.arange(len(source))[:: len(source) // section.heldout_images]
  heldout_indices = heldout_indices[: section.heldout_images]
  heldout = source.read(heldout_indices)
  source = Subset(source, np.setdiff1d(np.arange(len(source)), heldout_indices))
  scale_images = source.read(np.arange(min(section.scale_images, len(source))))
  optimizer = optax.adam(section.learning_rate)
  graphdef, state = state_lib.create_autoencoder_state(network, config.seed, optimizer, mesh)
  checkpointer = checkpointing.Checkpointer(workdir, keep=2)
  batches = writer = None
  preemption = PreemptionWatch()  # from here on SIGTERM means: checkpoint, then exit
  try:
    latest = checkpointer.latest_step()
    if latest is not None:
      checkpointer.check_compatible(latest, metadata(config, network))
      state, _ = checkpointer.restore_latest(state)
      logging.info("Resumed the autoencoder from step %d.", int(state.step))
    writer = summaries.create_writer(workdir, just_logging=jax.process_index() > 0)
    batches = pipeline.BatchIterator(
      source,
      first_step=int(state.step),
      global_batch=section.batch_size,
      seed=config.seed,
      random_flip=config.data.random_flip,
      sharding=mesh_lib.batch_sharding(mesh),
    )
    stage = _Stage(config, network, graphdef, optimizer, checkpointer, writer, preemption)
    state = _train(stage, state, batches, scale_images)
    checkpointer.wait_until_finished()
    if int(state.step) < section.num_train_steps:  # preempted: the checkpoint is the result
      return metadata(config, network)
    model = nnx.merge(graphdef, state.params)
    result = metadata(config, network, latent_scale(model, scale_images))
    result["heldout_mse"] = _write_reconstructions(model, heldout, workdir, writer, int(state.step))
    return result
  finally:
    if batches is not None:
      batches.close()
    checkpointer.close()
    if writer is not None:
      writer.flush()
    preemption.close()


@dataclasses.dataclass(frozen=True)
class _Stage:
  """The live parts of the first stage's run that its step loop uses."""

  config: RunConfig
  network: autoencoder_lib.AutoencoderConfig
  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  checkpointer: checkpointing.Checkpointer
  writer: summaries.MultiWriter
  preemption: PreemptionWatch


def _train(stage: _Stage, state, batches, scale_images: np.ndarray):
  """The step loop: scalars every log_every_steps, a checkpoint (with the scale factor measured
  on scale_images) every checkpoint_every_steps, at the end and at a preemption notice (SIGTERM:
  the step in flight is saved and the loop ends; the same command resumes)."""
  config, section = stage.config, stage.config.autoencoder
  step_fn = make_train_step(stage.graphdef, stage.optimizer)
  base_key, pending = jax.random.key(config.seed), []
  started, step = time.perf_counter(), int(state.step)
  while step < section.num_train_steps:
    params, opt_state, metrics = step_fn(
      state.params, state.opt_state, next(batches)["image"], jax.random.fold_in(base_key, step)
    )
    step += 1
    state = state_lib.AutoencoderState(jnp.asarray(step, jnp.int32), params, opt_state)
    pending.append(metrics)
    if step % section.log_every_steps == 0 or step == section.num_train_steps:
      _write_metrics(stage.writer, step, pending, time.perf_counter() - started)
      pending, started = [], time.perf_counter()
    preempted = stage.preemption.reached(step)
    if step % section.checkpoint_every_steps == 0 or step == section.num_train_steps or preempted:
      scale = latent_scale(nnx.merge(stage.graphdef, state.params), scale_images)
      stage.checkpointer.save(step, state, metadata(config, stage.network, scale))
    if preempted:
      logging.warning("Preemption notice (SIGTERM): saved the autoencoder at step %d.", step)
      break
  return state


def _write_metrics(writer, step: int, pending: list, seconds: float) -> None:
  """The mean loss and its two terms over the steps since the last write, and their rate."""
  total, reconstruction, kl = np.mean(jax.device_get(pending), axis=0)
  writer.write_scalars(
    step,
    {
      "loss": total,
      "reconstruction_mse": reconstruction,
      "kl_per_pixel": kl,
      "steps_per_second": len(pending) / seconds,
    },
  )


def _write_reconstructions(model, heldout: np.ndarray, workdir: str, writer, step: int) -> float:
  """samples/reconstructions.png (rows of 32 held-out digits spread over them, each row above
  its reconstructions from the posterior mean) and the mean squared error of all held-out images
  on [-1, 1]."""
  decode = jax.jit(lambda x: model.decode(model.encode(x)[0]))
  errors_per_batch = []
  for start in range(0, len(heldout), 256):
    x = to_float(heldout[start : start + 256])
    errors_per_batch.append(np.asarray(jnp.sum((decode(x) - x) ** 2)))
  error = float(np.sum(errors_per_batch) / heldout.size)
  inputs = heldout[np.linspace(0, len(heldout) - 1, min(len(heldout), 32)).astype(int)]
  shown = image_io.to_uint8(decode(to_float(inputs)))
  rows = [r for i in range(0, len(inputs), 8) for r in (inputs[i : i + 8], shown[i : i + 8])]
  grid = image_io.image_grid(np.concatenate(rows), columns=8)
  writer.write_scalars(step, {"heldout_mse": error})
  writer.write_images(step, {"reconstructions": grid[None]})
  if jax.process_index() == 0:
    files.save_png(files.join(workdir, "samples", "reconstructions.png"), grid)
  logging.info("Held-out reconstruction MSE %.4f on %d images.", error, len(heldout))
  return error


class Subset:
  """The examples `indices` of a source: the autoencoder's training images."""

  def __init__(self, source: sources.ImageSource, indices: np.ndarray):
    self.source, self.indices, self.num_classes = source, indices, source.num_classes

  def __len__(self) -> int:
    return len(self.indices)

  def read(self, indices: np.ndarray) -> np.ndarray:
    return self.source.read(self.indices[indices])

  def read_labelled(self, indices: np.ndarray):
    return self.source.read_labelled(self.indices[indices])
