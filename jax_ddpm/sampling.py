"""The compiled sampling program of a U-Net, and drawing images with it.

`make_sample_fn` compiles one program per (shape, sampler, options); the weights are an
argument, so sampling another checkpoint reuses it. `draw_batch` is the one way images are
drawn from it: batch i from fold_in(key, i), gathered from every process as uint8, so sample
mode (sample_mode.py, which writes them), eval (evaluate.py, which scores them in memory) and
the benchmarks see the same images for the same seed, whatever the device count.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jax_ddpm import image_io, parallel, samplers
from jax_ddpm.schedules import DiffusionSchedule


def make_sample_fn(eval_graphdef: nnx.GraphDef, schedule: DiffusionSchedule,
                   shape: tuple[int, ...], mesh: jax.sharding.Mesh, sampler: samplers.Sampler,
                   *, prediction: str = "eps", thresholding: str = "static",
                   threshold_percentile: float = 0.995, num_frames: int = 0) -> Callable:
  """A jitted fn(params, rng) -> float32 images in [-1, 1] of `shape`, batch sharded over mesh.

  With num_frames > 0 it returns (images, samplers.Trajectory). Every argument is checked
  here, before the first (long) compile; `builders.sampling_options(config)` gives the keyword
  arguments of a run config.
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


def gather_uint8(images: jax.Array) -> np.ndarray:
  """A batch sharded over every process's devices, whole on each process, as uint8."""
  return image_io.to_uint8(multihost_utils.process_allgather(images, tiled=True))


def draw_batch(sample_fn: Callable, params, base_key: jax.Array, index: int) -> np.ndarray:
  """Batch `index` of the stream seeded by base_key: uint8 NHWC, whole on every process."""
  return gather_uint8(sample_fn(params, jax.random.fold_in(base_key, index)))


def draw_images(sample_fn: Callable, params, base_key: jax.Array, count: int,
                batch_size: int) -> np.ndarray:
  """The first `count` images of the stream (batches 0, 1, ... of `batch_size`), in memory."""
  batches = [draw_batch(sample_fn, params, base_key, index)
             for index in range(-(-count // batch_size))]
  return np.concatenate(batches)[:count]


def padded_count(count: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the mesh size that holds `count` images."""
  return -(-count // mesh.size) * mesh.size
