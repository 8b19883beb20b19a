"""Sampling a trained U-Net: the compiled sampling program, uint8 conversion, grids and PNGs.

`make_sample_fn` compiles one program per (shape, sampler, steps); the weights are an argument,
so sampling another checkpoint reuses it.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

from jax_ddpm import files, parallel, samplers
from jax_ddpm.schedules import DiffusionSchedule

SAMPLERS = ("ddpm", "ddim")


def make_sample_fn(eval_graphdef: nnx.GraphDef, schedule: DiffusionSchedule,
                   shape: tuple[int, ...], mesh: jax.sharding.Mesh, *, sampler: str,
                   num_steps: int = 50, eta: float = 0.0, spacing: str = "uniform",
                   variance: str = "fixed_large", prediction: str = "eps",
                   clip_denoised: bool = True, num_frames: int = 0) -> Callable:
  """A jitted fn(params, rng) -> float32 images in [-1, 1] of `shape`, batch sharded over mesh.

  With num_frames > 0 it returns (images, samplers.Trajectory).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; allowed values: {list(SAMPLERS)}.")
  sharding = parallel.batch_sharding(mesh)

  def sample(params, rng):
    model = nnx.merge(eval_graphdef, params)

    def denoise(x_t, t):
      return model(x_t, t)

    if sampler == "ddpm":
      return samplers.ddpm_sample(denoise, schedule, shape, rng, variance=variance,
                                  prediction=prediction, clip_denoised=clip_denoised,
                                  num_frames=num_frames, sharding=sharding)
    return samplers.ddim_sample(denoise, schedule, shape, rng, num_steps=num_steps, eta=eta,
                                spacing=spacing, prediction=prediction,
                                clip_denoised=clip_denoised, num_frames=num_frames,
                                sharding=sharding)

  # Validate every argument now, before the first (long) compile.
  if sampler == "ddpm":
    samplers.frame_slots(schedule.num_timesteps, num_frames)
  else:
    samplers.ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
    samplers.frame_slots(num_steps, num_frames)
  return jax.jit(sample, out_shardings=None)


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255], the inverse of the data scaling."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
  """uint8 [N, H, W, C] tiled into one [rows*(H+p)+p, cols*(W+p)+p, C] image on white."""
  count, height, width, channels = images.shape
  columns = columns or math.ceil(math.sqrt(count))
  rows = math.ceil(count / columns)
  grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding,
                  channels), 255, np.uint8)
  for index, image in enumerate(images):
    row, column = divmod(index, columns)
    top, left = padding + row * (height + padding), padding + column * (width + padding)
    grid[top:top + height, left:left + width] = image
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, C] image (C = 1 or 3) as PNG, creating the directory."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def padded_count(count: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the mesh size that holds `count` images."""
  return -(-count // mesh.size) * mesh.size


def output_directory(workdir: str, step: int, sampling_config, num_timesteps: int) -> str:
  """workdir/samples/<step>_<sampler>_<steps>/."""
  steps = sampling_config.num_steps if sampling_config.sampler == "ddim" else num_timesteps
  return os.path.join(workdir, "samples", f"{step}_{sampling_config.sampler}_{steps}")


def _sample_settings(config, step: int) -> dict:
  """What determines the images; a resumed run must match it exactly."""
  settings = config.sampling.to_dict()
  settings.pop("num_samples")  # asking for more (or fewer) images extends the same stream
  settings["step"] = step
  return settings


def all_samples_path(directory: str, shape: tuple[int, ...]) -> str:
  """The file of every sample of a directory: samples_<N>x<H>x<W>x<C>.npz."""
  return os.path.join(directory, "samples_" + "x".join(str(d) for d in shape) + ".npz")


def sample_to_workdir(config, workdir: str, step: int | None = None) -> str:
  """--mode=sample: draws config.sampling.num_samples images from a checkpoint of `workdir`.

  Batch i is drawn from fold_in(key(sampling.seed), i), so the images do not depend on how many
  devices or processes draw them, and an interrupted run resumes at the first batch that was
  not written. Process 0 writes batch_<i>.npz (uint8 NHWC under 'arr_0') and grid_<i>.png as
  each batch finishes, and at the end samples_<N>x<H>x<W>x<C>.npz with all N images, the file
  FID tools read. Returns the output directory.
  """
  import json  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from jax_ddpm import config_checks, state  # pylint: disable=g-import-not-at-top

  config_checks.validate_model_and_diffusion(config)
  sampling_config = config.sampling
  if not isinstance(sampling_config.num_samples, int) or sampling_config.num_samples <= 0:
    raise ValueError(f"sampling.num_samples must be a positive integer, got "
                     f"{sampling_config.num_samples!r}.")
  mesh = parallel.data_mesh()
  if sampling_config.batch_size <= 0 or sampling_config.batch_size % mesh.size:
    raise ValueError(f"sampling.batch_size={sampling_config.batch_size} must be a positive "
                     f"multiple of the number of devices, {mesh.size}.")
  eval_graphdef, train_state, step = state.load_checkpoint(config, workdir, step)
  params = train_state.ema_params if sampling_config.use_ema else train_state.params
  schedule = state.schedule_from_config(config)

  directory = output_directory(workdir, step, sampling_config, schedule.num_timesteps)
  settings = _sample_settings(config, step)
  settings_path = os.path.join(directory, "settings.json")
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      saved = json.load(f)
    differences = [f"sampling.{key}: now {settings.get(key)!r}, before {saved.get(key)!r}"
                   for key in sorted(set(settings) | set(saved))
                   if json.dumps(settings.get(key)) != json.dumps(saved.get(key))]
    if differences:
      raise ValueError(f"{directory} holds samples drawn with other settings:\n  "
                       + "\n  ".join(differences) + "\nUse those settings to continue, or move "
                       "the directory away. Nothing was written.")
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(directory, exist_ok=True)
    files.save_json(settings_path, settings)

  batch_size = sampling_config.batch_size
  num_batches = -(-sampling_config.num_samples // batch_size)
  shape = (batch_size, config.data.image_size, config.data.image_size, config.data.channels)
  sample_fn = make_sample_fn(
      eval_graphdef, schedule, shape, mesh, sampler=sampling_config.sampler,
      num_steps=sampling_config.num_steps, eta=sampling_config.eta,
      spacing=sampling_config.spacing, variance=sampling_config.variance,
      prediction=config.diffusion.prediction, clip_denoised=sampling_config.clip_denoised)
  base_key = jax.random.key(sampling_config.seed)

  def batch_path(index):
    return os.path.join(directory, f"batch_{index:05d}.npz")

  todo = [i for i in range(num_batches) if not os.path.exists(batch_path(i))]
  # All processes must agree on the work list, whatever their view of the file system.
  todo = [int(i) for i in multihost_utils.broadcast_one_to_all(
      np.array(todo + [-1] * (num_batches - len(todo)), np.int32)) if i >= 0]
  if len(todo) < num_batches:
    logging.info("Resuming: %d of %d batches already in %s.", num_batches - len(todo),
                 num_batches, directory)
  started = time.perf_counter()
  for done, index in enumerate(todo, start=1):
    images = sample_fn(params, jax.random.fold_in(base_key, index))
    images = to_uint8(multihost_utils.process_allgather(images, tiled=True))
    keep = min(batch_size, sampling_config.num_samples - index * batch_size)
    images = images[:keep]
    if is_writer:
      files.save_npz(batch_path(index), arr_0=images)
      save_png(os.path.join(directory, f"grid_{index:05d}.png"), image_grid(images))
    elapsed = time.perf_counter() - started
    rate = done * batch_size / elapsed
    logging.info("Batch %d/%d: %.2f images/s, ETA %.0f s.", index + 1, num_batches, rate,
                 (len(todo) - done) * batch_size / rate)
  if is_writer:
    everything = np.concatenate([np.load(batch_path(i))["arr_0"] for i in range(num_batches)])
    path = all_samples_path(directory, everything.shape)
    files.save_npz(path, arr_0=everything)
    logging.info("Wrote %d samples to %s.", len(everything), path)
  return directory
