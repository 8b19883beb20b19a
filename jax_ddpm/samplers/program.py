"""The compiled sampling program of a U-Net, and drawing images with it.

`make_sample_fn` compiles one program per (shape, sampler, options); the weights are an
argument, so sampling another checkpoint reuses it. `draw_batch` is the one way images are
drawn from it: batch i from fold_in(key, i), gathered from every process as uint8, so sample
mode (sample_mode.py, which writes them), eval (evaluate.py, which scores them in memory) and
the benchmarks see the same images for the same seed, whatever the device count.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jax_ddpm.diffusion import guidance
from jax_ddpm.io import images as image_io
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm import samplers
from jax_ddpm.diffusion.schedules import DiffusionSchedule

LABEL_STREAM = 0x1abe1  # the labels of a batch are drawn from fold_in(its key, LABEL_STREAM)


class Samples(NamedTuple):
  """One batch drawn by a sample function."""
  images: jax.Array  # float32 [B, H, W, C] in [-1, 1]
  labels: Optional[jax.Array] = None  # int32 [B], the classes asked of a conditional model
  trajectory: Optional[samplers.Trajectory] = None  # with num_frames > 0


def make_sample_fn(eval_graphdef: nnx.GraphDef, schedule: DiffusionSchedule,
                   shape: tuple[int, ...], mesh: jax.sharding.Mesh, sampler: samplers.Sampler,
                   *, prediction: str = "eps", learn_sigma: bool = False,
                   thresholding: str = "static",
                   threshold_percentile: float = 0.995, num_frames: int = 0,
                   conditioning: Optional[guidance.Conditioning] = None) -> Callable:
  """A jitted fn(params, rng) -> Samples of `shape`, the batch sharded over the mesh.

  A conditional model (`conditioning`) is asked for conditioning.batch_labels, guided with
  conditioning.guidance_scale. Every argument is checked here, before the first (long)
  compile; `builders.sampling_options(config)` gives the keyword arguments of a run config.
  """
  sharding = parallel.batch_sharding(mesh)
  options = dict(prediction=prediction, learn_sigma=learn_sigma, thresholding=thresholding,
                 threshold_percentile=threshold_percentile, num_frames=num_frames,
                 sharding=sharding)

  def sample(params, rng):
    model = nnx.merge(eval_graphdef, params)
    labels, denoise = None, lambda x_t, t: model(x_t, t)
    if conditioning is not None:
      labels = conditioning.batch_labels(jax.random.fold_in(rng, LABEL_STREAM), shape[0])
      denoise = guidance.guide(lambda x_t, t, y: model(x_t, t, y), labels,
                               conditioning.guidance_scale, conditioning.num_classes, learn_sigma)
    output = samplers.run(sampler, denoise, schedule, shape, rng, **options)
    images, trajectory = output if num_frames else (output, None)
    return Samples(images, labels, trajectory)

  stand_in = lambda x_t, t: jnp.concatenate([x_t] * (2 if learn_sigma else 1), axis=-1)
  jax.eval_shape(lambda: samplers.run(sampler, stand_in, schedule, shape, jax.random.key(0),
                                      **options))
  return jax.jit(sample, out_shardings=None)


def gather(array: Optional[jax.Array]) -> Optional[np.ndarray]:
  """A batch sharded over every process's devices, whole on each process (None stays None)."""
  return None if array is None else np.asarray(
      multihost_utils.process_allgather(array, tiled=True))


def draw_batch(sample_fn: Callable, params, base_key: jax.Array, index: int
               ) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Batch `index` of the stream seeded by base_key, whole on every process: uint8 NHWC images
  and, for a conditional model, their int32 labels (else None)."""
  samples = sample_fn(params, jax.random.fold_in(base_key, index))
  return image_io.to_uint8(gather(samples.images)), gather(samples.labels)


def draw_images(sample_fn: Callable, params, base_key: jax.Array, count: int,
                batch_size: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """The first `count` images (and labels) of the stream, batches 0, 1, ..., in memory."""
  batches = [draw_batch(sample_fn, params, base_key, index)
             for index in range(-(-count // batch_size))]
  images = np.concatenate([b[0] for b in batches])[:count]
  labels = None if batches[0][1] is None else np.concatenate([b[1] for b in batches])[:count]
  return images, labels


def padded_count(count: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the mesh size that holds `count` images."""
  return -(-count // mesh.size) * mesh.size
