"""The variational bound in bits per dimension: its terms, and the estimate of their sum.

DDPM eq. (5) bounds -log p_theta(x_0) by L_T + sum_{t>1} L_{t-1} + L_0; in code indices (i = t - 1)
that is `prior_bpd` + the KL terms of indices 1..T-1 + the decoder's NLL at index 0 (eq. 13),
all in `vlb_terms`, each per dimension and in bits, so their sum is the bits/dim of DDPM Table 2
and Improved DDPM Table 1. Data must be 8-bit images (the decoder is discretised). The hybrid
loss (Improved DDPM eq. 16) and L_vlb as an objective train on the same terms (losses.py).

All T terms cost T network calls per image. With K > 0 each image instead gets K of the T - 1 KL
terms, one drawn uniformly from each of K contiguous strata of indices (`strata`), each weighted
by its stratum's size: an unbiased estimate of the sum.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax.numpy as jnp
import jax.scipy.special as special
import numpy as np

from jax_ddpm.diffusion.process import (
  Prediction,
  Variance,
  extract,
  mean_flat,
  p_mean_variance,
  q_posterior_mean_variance,
)
from jax_ddpm.io.errors import ConfigError

if TYPE_CHECKING:
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


def normal_kl(mean1, log_variance1, mean2, log_variance2):
  """KL(N(mean1, e^log_variance1) || N(mean2, e^log_variance2)) per element, in nats."""
  return 0.5 * (
    -1.0
    + log_variance2
    - log_variance1
    + jnp.exp(log_variance1 - log_variance2)
    + jnp.square(mean1 - mean2) * jnp.exp(-log_variance2)
  )


def discretized_gaussian_log_likelihood(x0, mean, log_variance):
  """log p(x_0) per element under DDPM eq. (13)'s decoder: N(mean, e^log_variance) integrated
  over the bin [x - 1/255, x + 1/255] of each of the 256 levels of [-1, 1], the two end bins
  reaching to -inf and +inf. x0 must lie on that grid (uint8 data scaled to [-1, 1])."""
  inv_std = jnp.exp(-0.5 * log_variance)
  upper = (x0 - mean + 1.0 / 255.0) * inv_std
  lower = (x0 - mean - 1.0 / 255.0) * inv_std
  # Phi(upper) - Phi(lower), taken in the tail where both lie so float32 does not cancel.
  mass = jnp.where(
    lower > 0,
    special.ndtr(-lower) - special.ndtr(-upper),
    special.ndtr(upper) - special.ndtr(lower),
  )
  log_mass = jnp.log(jnp.maximum(mass, 1e-12))
  return jnp.where(
    x0 < -0.999, special.log_ndtr(upper), jnp.where(x0 > 0.999, special.log_ndtr(-lower), log_mass)
  )


def vlb_terms(
  schedule: DiffusionSchedule,
  x0,
  x_t,
  t,
  output,
  *,
  prediction: Prediction,
  variance: Variance,
  variance_output=None,
  clip_denoised: bool = False,
):
  """Per-example L_{t-1} of DDPM eq. (5) in bits per dimension, for timestep indices t.

  t > 0: KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) between two Gaussians (eq. 6-7);
  t = 0: the decoder's -log p_theta(x_0 | x_1) (eq. 13). Each is the mean over dimensions
  divided by log 2, so the bound in bits/dim is the sum over t of these plus `prior_bpd`.
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, x_t, t)
  mean, log_variance, _ = p_mean_variance(
    schedule,
    x_t,
    t,
    output,
    prediction=prediction,
    variance=variance,
    clip_denoised=clip_denoised,
    variance_output=variance_output,
  )
  kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / np.log(2.0)
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, log_variance)) / np.log(
    2.0
  )
  return jnp.where(t == 0, decoder_nll, kl)


def prior_bpd(schedule: DiffusionSchedule, x0):
  """L_T = KL(q(x_T | x_0) || N(0, I)) per example in bits/dim (DDPM eq. 5); no parameters."""
  t_last = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
  mean = extract(schedule.sqrt_alphas_cumprod, t_last, x0.ndim) * x0
  log_variance = jnp.log(extract(schedule.sqrt_one_minus_alphas_cumprod, t_last, x0.ndim)) * 2.0
  return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / np.log(2.0)


def check_strata(num_timesteps: int, num_terms, key: str = "num_terms") -> None:
  """ConfigError unless `num_terms` (`key`) is 0 (all T - 1 KL terms) or in 1..T-1."""
  count = num_timesteps - 1
  if not isinstance(num_terms, (int, np.integer)) or not 0 <= num_terms <= count:
    raise ConfigError(f"{key} must be in 0..{count} (T - 1), got {num_terms}.")


def strata(num_timesteps: int, num_terms: int) -> np.ndarray:
  """Edges [K + 1] of K contiguous strata covering the KL indices 1..T-1 (K = 0: all T - 1)."""
  check_strata(num_timesteps, num_terms)
  num_terms = num_timesteps - 1 if num_terms == 0 else num_terms
  return np.round(np.linspace(1, num_timesteps, num_terms + 1)).astype(np.int64)


def stratified_timesteps(
  edges: np.ndarray, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
  """[K, B] indices: row k uniform in [edges[k], edges[k+1]) for each image."""
  low, high = edges[:-1, None], edges[1:, None]
  return (low + np.floor(rng.random((len(low), batch_size)) * (high - low))).astype(np.int32)
