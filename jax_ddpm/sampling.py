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

from jax_ddpm import parallel, samplers
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
