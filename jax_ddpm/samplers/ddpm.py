"""DDPM ancestral sampling through all T steps, Ho et al. 2020, Algorithm 2."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jax_ddpm.diffusion import process as diffusion
from jax_ddpm.diffusion.process import Prediction, Variance, parse_enum
from jax_ddpm.diffusion.schedules import DiffusionSchedule
from jax_ddpm.samplers import base


def ddpm_update(
  schedule: DiffusionSchedule, x_t, x0, t, noise, variance: Variance, variance_output=None
):
  """x_{t-1} = posterior mean at the predicted x_0 (eq. 7) + sigma_t z, Algorithm 2 line 4.

  sigma_t^2 is beta~_t ("fixed_small") or beta_t ("fixed_large"), DDPM Sec. 3.2, or the
  network's interpolation of the two ("learned", Improved DDPM eq. 15, from variance_output);
  no noise is added at t = 0.
  """
  mean, log_variance, _ = diffusion.p_mean_variance(
    schedule,
    x_t,
    t,
    x0,
    prediction=Prediction.X0,
    variance=variance,
    clip_denoised=False,
    variance_output=variance_output,
  )
  nonzero = (t > 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return mean + nonzero * jnp.exp(0.5 * log_variance) * noise


@dataclasses.dataclass(frozen=True)
class DDPM(base.Sampler):
  """Ancestral sampling, Algorithm 2, visiting every t from T - 1 down to 0.

  variance: "fixed_large" (beta_t, the original CIFAR-10 choice and sampling.variance's
    default), "fixed_small" (beta~_t, which DDIM with eta = 1 and S = T reproduces) or
    "learned" (the network's, Improved DDPM eq. 15).
  """

  name = "ddpm"
  variance: Variance = Variance.FIXED_LARGE

  def __post_init__(self):
    object.__setattr__(self, "variance", parse_enum(Variance, self.variance, "variance"))

  @classmethod
  def from_config(cls, sampling) -> DDPM:
    return cls(variance=sampling.variance)

  @property
  def uses_noise(self) -> bool:
    return True

  @property
  def uses_learned_variance(self) -> bool:
    return self.variance == Variance.LEARNED

  @property
  def tags(self) -> tuple[str, ...]:
    return () if self.variance == Variance.FIXED_LARGE else (self.variance.value,)

  def timesteps(self, schedule: DiffusionSchedule) -> np.ndarray:
    return np.arange(schedule.num_timesteps - 1, -1, -1, dtype=np.int32)

  def step(self, schedule, x_t, denoised, step, noise, state):
    return ddpm_update(
      schedule, x_t, denoised.x0, step.t, noise, self.variance, denoised.variance_output
    ), state
