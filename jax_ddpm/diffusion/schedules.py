"""Noise schedules and the coefficient table every diffusion formula reads.

Notation follows Ho et al. 2020 ("DDPM"): beta_t is the variance added at forward step t,
alpha_t = 1 - beta_t, and alpha-bar_t = prod_{s<=t} alpha_s (written `alphas_cumprod`).

Timestep convention: in code a timestep is an integer *index* 0..T-1. Index i is the paper's
t = i + 1, so index 0 is the first noising step and index T-1 produces (almost) pure noise.
`alphas_cumprod_prev[i]` is alpha-bar of the paper's t - 1, which is 1 at index 0.

The table is computed in float64 numpy, as the original DDPM code did, and cast to float32 once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.struct
import jax.numpy as jnp
import numpy as np

# Nichol & Dhariwal 2021, Sec. 3.2: betas of the cosine schedule are clipped so that the
# last steps do not become singular.
COSINE_MAX_BETA = 0.999
COSINE_OFFSET_S = 0.008


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """DDPM Sec. 4: betas increasing linearly from beta_start to beta_end."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def quadratic_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """The original DDPM code's `quad`: sqrt(beta) increases linearly."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def sigmoid_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """Betas following a logistic curve over [-6, 6], scaled to [beta_start, beta_end]."""
  x = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
  return beta_start + (beta_end - beta_start) / (1.0 + np.exp(-x))


def cosine_betas(num_timesteps: int, beta_start: float = 0.0, beta_end: float = 0.0) -> np.ndarray:
  """Nichol & Dhariwal 2021, eq. (17): alpha-bar(t) = f(t)/f(0),
  f(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

  Betas are 1 - alpha-bar(t+1)/alpha-bar(t), clipped at 0.999. beta_start and beta_end are
  unused; they are accepted so that every schedule shares one signature.
  """
  del beta_start, beta_end
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + COSINE_OFFSET_S) / (1.0 + COSINE_OFFSET_S) * math.pi / 2.0) ** 2
  alphas_cumprod = f / f[0]
  betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
  return np.minimum(betas, COSINE_MAX_BETA)


BETA_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
  "linear": linear_betas,
  "quadratic": quadratic_betas,
  "cosine": cosine_betas,
  "sigmoid": sigmoid_betas,
}


@flax.struct.dataclass
class DiffusionSchedule:
  """The float32 coefficient table of one schedule; every array has length T.

  A pytree: pass it to jitted functions as an argument. `num_timesteps` is static.
  """

  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  log_alphas_cumprod: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray
  sqrt_recipm1_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray
  fixed_large_log_variance: jnp.ndarray
  log_betas: jnp.ndarray
  num_timesteps: int = flax.struct.field(pytree_node=False)


def coefficient_table(betas: np.ndarray) -> dict[str, np.ndarray]:
  """All derived coefficients in float64, keyed by `DiffusionSchedule` field name."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
    raise ValueError("betas must be a 1-D array with every entry in (0, 1].")
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  # DDPM eq. (7): variance of q(x_{t-1} | x_t, x_0).
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  # The variance is 0 at index 0; the original code clips its log to the next value.
  posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
  return {
    "betas": betas,
    "alphas": alphas,
    "alphas_cumprod": alphas_cumprod,
    "alphas_cumprod_prev": alphas_cumprod_prev,
    # Lets samplers form 1 - alpha-bar ratios with expm1, without float32 cancellation.
    "log_alphas_cumprod": np.log(alphas_cumprod),
    "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
    "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
    "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
    "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
    "posterior_variance": posterior_variance,
    "posterior_log_variance_clipped": posterior_log_variance_clipped,
    # DDPM eq. (7): mu~_t = coef1 * x_0 + coef2 * x_t.
    "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
    "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    # DDPM Sec. 3.2, sigma_t^2 = beta_t ("fixed large"); the original code takes
    # posterior_variance[1] at index 0 so that the last step adds little noise.
    "fixed_large_log_variance": np.log(np.append(posterior_variance[1], betas[1:])),
    # The upper end of a learned variance's range (Nichol & Dhariwal 2021, eq. 15).
    "log_betas": np.log(betas),
  }


def schedule_from_betas(betas: np.ndarray) -> DiffusionSchedule:
  """Builds the float32 table from float64 betas, computing everything before the cast."""
  table = coefficient_table(betas)
  return DiffusionSchedule(
    num_timesteps=len(table["betas"]),
    **{name: jnp.asarray(value, dtype=jnp.float32) for name, value in table.items()},
  )


def get_schedule(
  name: str, num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02
) -> DiffusionSchedule:
  """The schedule `name` ('linear', 'quadratic', 'cosine', 'sigmoid') with T steps."""
  if name not in BETA_SCHEDULES:
    raise ValueError(f"Unknown beta schedule {name!r}; allowed values: {sorted(BETA_SCHEDULES)}.")
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
    raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}.")
  if name != "cosine" and not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(
      f"Need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}."
    )
  return schedule_from_betas(BETA_SCHEDULES[name](int(num_timesteps), beta_start, beta_end))
