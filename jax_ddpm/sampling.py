"""Sampling a trained U-Net: the compiled sampling program, uint8 conversion, grids and PNGs.

`make_sample_fn` compiles one program per (shape, sampler, steps); the weights are an argument,
so sampling another checkpoint reuses it.
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from jax_ddpm import errors, files, parallel, samplers
from jax_ddpm.schedules import DiffusionSchedule

def make_sample_fn(eval_graphdef: nnx.GraphDef, schedule: DiffusionSchedule,
                   shape: tuple[int, ...], mesh: jax.sharding.Mesh, sampler: samplers.Sampler,
                   *, prediction: str = "eps", thresholding: str = "static",
                   threshold_percentile: float = 0.995, num_frames: int = 0) -> Callable:
  """A jitted fn(params, rng) -> float32 images in [-1, 1] of `shape`, batch sharded over mesh.

  With num_frames > 0 it returns (images, samplers.Trajectory). Every argument is checked
  here, before the first (long) compile.
  """
  sharding = parallel.batch_sharding(mesh)
  options = dict(prediction=prediction, thresholding=thresholding,
                 threshold_percentile=threshold_percentile, num_frames=num_frames,
                 sharding=sharding)

  def sample(params, rng):
    model = nnx.merge(eval_graphdef, params)
    return samplers.run(sampler, lambda x_t, t: model(x_t, t), schedule, shape, rng, **options)

  jax.eval_shape(lambda: samplers.run(sampler, lambda x_t, t: x_t, schedule, shape,
                                      jax.random.key(0), **options))
  return jax.jit(sample, out_shardings=None)


def sampler_options(config) -> dict:
  """make_sample_fn's keyword arguments from a run config."""
  return dict(prediction=config.diffusion.prediction,
              thresholding=config.sampling.thresholding,
              threshold_percentile=config.sampling.threshold_percentile)


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
  """Writes a uint8 [H, W, C] image (C = 1 or 3) as PNG (local path or URL), atomically."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  files.save_bytes(path, buffer.getvalue())


def padded_count(count: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the mesh size that holds `count` images."""
  return -(-count // mesh.size) * mesh.size


def output_directory(workdir: str, step: int, sampler: samplers.Sampler,
                     schedule: DiffusionSchedule) -> str:
  """workdir/samples/<step>_<sampler>_<steps>/."""
  steps = len(sampler.timesteps(schedule))
  return files.join(workdir, "samples", f"{step}_{sampler.name}_{steps}")


def _sample_settings(config, step: int) -> dict:
  """What determines the images; a resumed run must match it exactly."""
  settings = config.sampling.to_dict()
  settings.pop("num_samples")  # asking for more (or fewer) images extends the same stream
  settings["step"] = step
  return settings


def all_samples_path(directory: str, shape: tuple[int, ...]) -> str:
  """The file of every sample of a directory: samples_<N>x<H>x<W>x<C>.npz."""
  return files.join(directory, "samples_" + "x".join(str(d) for d in shape) + ".npz")


def batch_path(directory: str, index: int) -> str:
  return files.join(directory, f"batch_{index:05d}.npz")


def _check_settings(directory: str, settings: dict) -> None:
  """Refuses a directory whose samples were drawn with other settings."""
  settings_path = files.join(directory, "settings.json")
  if not files.exists(settings_path):
    return
  saved = files.load_json(settings_path)
  differences = [f"sampling.{key}: now {settings.get(key)!r}, before {saved.get(key)!r}"
                 for key in sorted(set(settings) | set(saved))
                 if json.dumps(settings.get(key)) != json.dumps(saved.get(key))]
  if differences:
    raise errors.ConfigError(
        f"{directory} holds samples drawn with other settings:\n  " + "\n  ".join(differences)
        + "\nUse those settings to continue, or move the directory away. Nothing was written.")


def _batches_to_draw(directory: str, num_batches: int, batch_size: int) -> list[int]:
  """Indices of the batches not yet on disk whole, agreed on by every process.

  A batch file always holds a full batch; one with fewer images (written by an older version
  for a short last batch) is drawn again.
  """
  def complete(index):
    path = batch_path(directory, index)
    return files.exists(path) and len(files.read_npz(path, "sample batch", ["arr_0"])
                                      ["arr_0"]) == batch_size
  todo = [i for i in range(num_batches) if not complete(i)]
  todo = [int(i) for i in multihost_utils.broadcast_one_to_all(
      np.array(todo + [-1] * (num_batches - len(todo)), np.int32)) if i >= 0]
  if len(todo) < num_batches:
    logging.info("Resuming: %d of %d batches already in %s.", num_batches - len(todo),
                 num_batches, directory)
  return todo


def _write_all_samples(directory: str, num_samples: int, num_batches: int) -> str:
  """samples_<N>x...npz: the first N images of the directory's batches, in order."""
  everything = np.concatenate([files.read_npz(batch_path(directory, i), "sample batch",
                                              ["arr_0"])["arr_0"] for i in range(num_batches)])
  everything = everything[:num_samples]
  path = all_samples_path(directory, everything.shape)
  files.save_npz(path, arr_0=everything)
  logging.info("Wrote %d samples to %s.", len(everything), path)
  return path


def check_sampling_request(sampling_config, mesh: jax.sharding.Mesh) -> None:
  if not isinstance(sampling_config.num_samples, int) or sampling_config.num_samples <= 0:
    raise errors.ConfigError(f"sampling.num_samples must be a positive integer, got "
                             f"{sampling_config.num_samples!r}.")
  if sampling_config.batch_size <= 0 or sampling_config.batch_size % mesh.size:
    raise errors.ConfigError(f"sampling.batch_size={sampling_config.batch_size} must be a "
                             f"positive multiple of the number of devices, {mesh.size}.")


def sample_to_workdir(config, workdir: str, step: int | None = None) -> str:
  """--mode=sample: draws config.sampling.num_samples images from a checkpoint of `workdir`.

  Batch i is drawn from fold_in(key(sampling.seed), i), so the images do not depend on how many
  devices or processes draw them, and an interrupted run resumes at the first batch that was
  not written. Process 0 writes batch_<i>.npz (a full batch of uint8 NHWC under 'arr_0') and
  grid_<i>.png as each batch finishes, and at the end samples_<N>x<H>x<W>x<C>.npz with the
  first N = num_samples images, the file FID tools read. A later run that asks for fewer images
  draws nothing new; one that asks for more draws only the missing batches. Returns the
  output directory.
  """
  from jax_ddpm import config_checks, state  # pylint: disable=g-import-not-at-top

  config_checks.validate_model_and_diffusion(config)
  sampling_config = config.sampling
  mesh = parallel.data_mesh()
  check_sampling_request(sampling_config, mesh)
  eval_graphdef, train_state, step = state.load_checkpoint(config, workdir, step)
  params = train_state.ema_params if sampling_config.use_ema else train_state.params
  schedule = state.schedule_from_config(config)

  sampler = samplers.from_config(sampling_config)
  directory = output_directory(workdir, step, sampler, schedule)
  settings = _sample_settings(config, step)
  _check_settings(directory, settings)
  is_writer = jax.process_index() == 0
  if is_writer:
    files.save_json(files.join(directory, "settings.json"), settings)

  batch_size = sampling_config.batch_size
  num_batches = -(-sampling_config.num_samples // batch_size)
  todo = _batches_to_draw(directory, num_batches, batch_size)
  shape = (batch_size, config.data.image_size, config.data.image_size, config.data.channels)
  sample_fn = make_sample_fn(eval_graphdef, schedule, shape, mesh, sampler,
                             **sampler_options(config))
  base_key = jax.random.key(sampling_config.seed)
  started = time.perf_counter()
  for done, index in enumerate(todo, start=1):
    images = sample_fn(params, jax.random.fold_in(base_key, index))
    images = to_uint8(multihost_utils.process_allgather(images, tiled=True))
    if is_writer:
      files.save_npz(batch_path(directory, index), arr_0=images)
      save_png(files.join(directory, f"grid_{index:05d}.png"), image_grid(images))
    rate = done * batch_size / (time.perf_counter() - started)
    logging.info("Batch %d/%d: %.2f images/s, ETA %.0f s.", index + 1, num_batches, rate,
                 (len(todo) - done) * batch_size / rate)
  if is_writer:
    _write_all_samples(directory, sampling_config.num_samples, num_batches)
  return directory
