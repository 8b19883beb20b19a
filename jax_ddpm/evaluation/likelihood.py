"""The likelihood bound of real images in bits per dimension, over a data split (--mode=eval).

The bound's terms and their stratified estimate are diffusion/likelihood.py's (DDPM eq. 5; the
bits/dim of DDPM Table 2 and Improved DDPM Table 1); this module runs them over images: one
compiled program of the network's terms, the batch sharded over the mesh, the decoder term and
the prior exact, K stratified KL terms per image (eval.bpd_timesteps; 0: all T - 1), and the
standard error over images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from jax_ddpm.diffusion import likelihood, process
from jax_ddpm.diffusion.likelihood import BoundOptions
from jax_ddpm.diffusion.schedules import DiffusionSchedule
from jax_ddpm.io.images import to_model_range
from jax_ddpm.runtime import mesh as mesh_lib

if TYPE_CHECKING:
  from jax_ddpm.data.sources import ImageSource


def make_terms_fn(
  eval_graphdef: nnx.GraphDef,
  schedule: DiffusionSchedule,
  mesh: jax.sharding.Mesh,
  options: BoundOptions,
) -> Callable:
  """A jitted fn(params, x0, labels, t, key) -> [B] bits/dim of the bound's term at index t of
  each image (`likelihood.vlb_terms`), x_t drawn from q(x_t | x_0) with noise from key."""

  def terms(params, x0, labels, t, key):
    model = nnx.merge(eval_graphdef, params)
    eps = jax.random.normal(key, x0.shape, jnp.float32)
    eps = jax.lax.with_sharding_constraint(eps, mesh_lib.batch_sharding(mesh))
    x_t = process.q_sample(schedule, x0, t, eps)
    output, variance_output = process.split_output(model(x_t, t, labels), options.learn_sigma)
    return likelihood.vlb_terms(
      schedule,
      x0,
      x_t,
      t,
      output.astype(jnp.float32),
      prediction=options.prediction,
      variance=options.variance,
      variance_output=variance_output,
      clip_denoised=options.clip_denoised,
    )

  return jax.jit(terms, out_shardings=mesh_lib.batch_sharding(mesh))


def bits_per_dim(
  terms_fn: Callable,
  params,
  schedule: DiffusionSchedule,
  source: ImageSource,
  mesh: jax.sharding.Mesh,
  *,
  batch_size: int,
  num_images: int,
  num_terms: int,
  seed: int,
  conditional: bool,
) -> dict:
  """The bound in bits/dim of the first num_images images of `source` (0: all), its standard
  error over images, and its parts (decoder, KL sum, prior), averaged."""
  count = len(source) if num_images == 0 else min(num_images, len(source))
  edges = likelihood.strata(schedule.num_timesteps, num_terms)
  widths = np.diff(edges).astype(np.float64)
  rng, key = np.random.default_rng(seed), jax.random.key(seed)
  parts = []  # per batch: [3, images] of decoder, KL sum, prior
  prior_fn = jax.jit(lambda x0: likelihood.prior_bpd(schedule, x0))
  for start in range(0, count, batch_size):
    indices = np.arange(start, min(start + batch_size, count))
    if conditional:
      images, labels = source.read_labelled(indices)
    else:
      images, labels = source.read(indices), None
    real = len(images)
    pad = batch_size - real  # the last batch is padded, and the padding dropped below
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    x0 = mesh_lib.shard_batch(to_model_range(images), mesh)
    y = (
      None
      if labels is None
      else mesh_lib.shard_batch(np.pad(labels, (0, pad)).astype(np.int32), mesh)
    )
    batch_key = jax.random.fold_in(key, start)

    def term(t, k, x0=x0, y=y, batch_key=batch_key):
      return mesh_lib.gather(
        terms_fn(params, x0, y, mesh_lib.shard_batch(t, mesh), jax.random.fold_in(batch_key, k))
      )

    decoder = term(np.zeros(batch_size, np.int32), 0)[:real].astype(np.float64)
    kl = np.zeros(real)
    for k, t in enumerate(likelihood.stratified_timesteps(edges, batch_size, rng)):
      kl += widths[k] * term(t, k + 1)[:real]
    prior = mesh_lib.gather(prior_fn(x0))[:real].astype(np.float64)
    parts.append(np.stack([decoder, kl, prior]))
    logging.log_every_n_seconds(logging.INFO, "Bits/dim: %d of %d images.", 60, start + real, count)
  decoder, kl, prior = np.concatenate(parts, axis=1)
  per_image = decoder + kl + prior
  return {
    "bits_per_dim": float(per_image.mean()),
    "bits_per_dim_se": float(per_image.std(ddof=1) / np.sqrt(count)) if count > 1 else 0.0,
    "bpd_decoder": float(decoder.mean()),
    "bpd_kl_terms": float(kl.mean()),
    "bpd_prior": float(prior.mean()),
    "bpd_images": int(count),
    "bpd_terms_per_image": int(len(widths)),
  }
