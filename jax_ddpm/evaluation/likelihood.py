"""Negative log-likelihood of real images in bits per dimension, from the variational bound.

DDPM eq. (5) bounds -log p_theta(x_0) by L_T + sum_{t>1} L_{t-1} + L_0; in code indices
(i = t - 1) that is `diffusion.prior_bpd` + the KL terms of indices 1..T-1 + the decoder's NLL at
index 0 (`diffusion.vlb_terms`), each per dimension and in bits, so their sum is the bits/dim of
DDPM Table 2 and Improved DDPM Table 1. Data must be 8-bit images (the decoder is discretised).

All T terms cost T network calls per image (eval.bpd_timesteps = 0, exact). With K > 0 each
image instead gets K of the T - 1 KL terms, one drawn uniformly from each of K contiguous strata
of indices, each weighted by its stratum's size: an unbiased estimate of the sum, whose extra
spread shows in the reported standard error. The decoder term and the prior are always exact.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from jax_ddpm.data import sources as data_sources
from jax_ddpm.diffusion import process as diffusion
from jax_ddpm.data import pipeline as input_pipeline
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.diffusion.process import Prediction, Variance
from jax_ddpm.diffusion.schedules import DiffusionSchedule


@dataclasses.dataclass(frozen=True)
class BoundOptions:
  """How the model's p_theta(x_{t-1} | x_t) is formed for the bound.

  variance: the model's reverse variance (learned for a learned-variance network, else the
    fixed choice it samples with); clip_denoised: clip the predicted x_0 to [-1, 1], as the
    samplers and Improved DDPM's likelihood evaluation do.
  """
  prediction: Prediction
  variance: Variance
  learn_sigma: bool = False
  clip_denoised: bool = True


def strata(num_timesteps: int, num_terms: int) -> np.ndarray:
  """Edges [K + 1] of K contiguous strata covering the KL indices 1..T-1 (K = 0: all T - 1)."""
  count = num_timesteps - 1
  num_terms = count if num_terms == 0 else num_terms
  if not 1 <= num_terms <= count:
    raise ValueError(f"eval.bpd_timesteps must be in 0..{count} (T - 1), got {num_terms}.")
  return np.round(np.linspace(1, num_timesteps, num_terms + 1)).astype(np.int64)


def stratified_timesteps(edges: np.ndarray, batch_size: int, rng: np.random.Generator
                         ) -> np.ndarray:
  """[K, B] indices: row k uniform in [edges[k], edges[k+1]) for each image."""
  low, high = edges[:-1, None], edges[1:, None]
  return (low + np.floor(rng.random((len(low), batch_size)) * (high - low))).astype(np.int32)


def make_terms_fn(eval_graphdef: nnx.GraphDef, schedule: DiffusionSchedule,
                  mesh: jax.sharding.Mesh, options: BoundOptions) -> Callable:
  """A jitted fn(params, x0, labels, t, key) -> [B] bits/dim of the bound's term at index t of
  each image (`diffusion.vlb_terms`), x_t drawn from q(x_t | x_0) with noise from key."""

  def terms(params, x0, labels, t, key):
    model = nnx.merge(eval_graphdef, params)
    eps = jax.random.normal(key, x0.shape, jnp.float32)
    eps = jax.lax.with_sharding_constraint(eps, parallel.batch_sharding(mesh))
    x_t = diffusion.q_sample(schedule, x0, t, eps)
    output, variance_output = diffusion.split_output(model(x_t, t, labels), options.learn_sigma)
    return diffusion.vlb_terms(schedule, x0, x_t, t, output.astype(jnp.float32),
                               prediction=options.prediction, variance=options.variance,
                               variance_output=variance_output,
                               clip_denoised=options.clip_denoised)

  return jax.jit(terms, out_shardings=parallel.batch_sharding(mesh))


def _sharded(array: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  sharding = parallel.batch_sharding(mesh)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _gathered(array: jax.Array) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def bits_per_dim(terms_fn: Callable, params, schedule: DiffusionSchedule,
                 source: data_sources.ImageSource, mesh: jax.sharding.Mesh, *,
                 batch_size: int, num_images: int, num_terms: int, seed: int,
                 conditional: bool) -> dict:
  """The bound in bits/dim of the first num_images images of `source` (0: all), its standard
  error over images, and its parts (decoder, KL sum, prior), averaged."""
  count = len(source) if num_images == 0 else min(num_images, len(source))
  edges = strata(schedule.num_timesteps, num_terms)
  widths = np.diff(edges).astype(np.float64)
  rng, key = np.random.default_rng(seed), jax.random.key(seed)
  parts = []  # per batch: [3, images] of decoder, KL sum, prior
  prior_fn = jax.jit(lambda x0: diffusion.prior_bpd(schedule, x0))
  for start in range(0, count, batch_size):
    indices = np.arange(start, min(start + batch_size, count))
    if conditional:
      images, labels = source.read_labelled(indices)
    else:
      images, labels = source.read(indices), None
    real = len(images)
    pad = batch_size - real  # the last batch is padded, and the padding dropped below
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    x0 = _sharded(input_pipeline.to_model_range(images), mesh)
    y = None if labels is None else _sharded(np.pad(labels, (0, pad)).astype(np.int32), mesh)
    batch_key = jax.random.fold_in(key, start)

    def term(t, k):
      return _gathered(terms_fn(params, x0, y, _sharded(t, mesh), jax.random.fold_in(batch_key, k)))

    decoder = term(np.zeros(batch_size, np.int32), 0)[:real].astype(np.float64)
    kl = np.zeros(real)
    for k, t in enumerate(stratified_timesteps(edges, batch_size, rng)):
      kl += widths[k] * term(t, k + 1)[:real]
    prior = _gathered(prior_fn(x0))[:real].astype(np.float64)
    parts.append(np.stack([decoder, kl, prior]))
    logging.log_every_n_seconds(logging.INFO, "Bits/dim: %d of %d images.", 60, start + real,
                                count)
  decoder, kl, prior = np.concatenate(parts, axis=1)
  per_image = decoder + kl + prior
  return {"bits_per_dim": float(per_image.mean()),
          "bits_per_dim_se": float(per_image.std(ddof=1) / np.sqrt(count)) if count > 1 else 0.0,
          "bpd_decoder": float(decoder.mean()), "bpd_kl_terms": float(kl.mean()),
          "bpd_prior": float(prior.mean()), "bpd_images": int(count),
          "bpd_terms_per_image": int(len(widths))}


def bound_options(config) -> BoundOptions:
  """The bound's p_theta of a run config: its prediction, and its learned variance or the
  fixed one sampling.variance names."""
  learn_sigma = bool(config.model.learn_sigma)
  variance = Variance.LEARNED if learn_sigma else Variance(config.sampling.variance)
  return BoundOptions(prediction=Prediction(config.diffusion.prediction), variance=variance,
                      learn_sigma=learn_sigma)


def evaluate_bits_per_dim(config, eval_graphdef: nnx.GraphDef, params,
                          schedule: DiffusionSchedule, mesh: jax.sharding.Mesh,
                          source: data_sources.ImageSource) -> dict:
  """--mode=eval's likelihood of `source` (eval.bpd_split of config.data, checked by the
  caller): eval.bpd_images images, eval.bpd_timesteps KL terms per image, global batch
  eval.batch_size."""
  ev = config.eval
  conditional = config.model.num_classes is not None
  terms_fn = make_terms_fn(eval_graphdef, schedule, mesh, bound_options(config))
  return bits_per_dim(terms_fn, params, schedule, source, mesh, batch_size=ev.batch_size,
                      num_images=ev.bpd_images, num_terms=ev.bpd_timesteps, seed=config.seed,
                      conditional=conditional)
