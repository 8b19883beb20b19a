"""DDIM sampling in S steps, Song et al. 2021, eq. (12) with sigma from eq. (16)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jax_ddpm.diffusion import process as diffusion
from jax_ddpm.diffusion.process import Variance, parse_enum
from jax_ddpm.diffusion.schedules import DiffusionSchedule
from jax_ddpm.samplers import base


def ddim_update(
  schedule: DiffusionSchedule, x_t, x0, eps, t, t_prev, noise, eta: float, variance_output=None
):
  """x_t -> x_{t_prev} by DDIM eq. (12); t_prev = -1 is the data (alpha-bar = 1).

  With a learned-variance network's `variance_output`, the noise's standard deviation is
  eta times the network's sigma for this step: its interpolation between the step's beta and
  beta~ (Improved DDPM eq. 15, with the respaced betas of their Sec. 4), while the mean stays
  eq. (12)'s. At eta = 1 that is Improved DDPM's strided ancestral sampling; with the
  interpolation at beta~ it is DDIM's eq. (16) exactly.
  """
  log_alpha_bar, log_alpha_bar_prev = diffusion.alpha_bar_pair(schedule, t, t_prev, x_t.ndim)
  # The differences 1 - alpha-bar are ~1e-4 near the data; expm1 keeps them exact in float32.
  one_minus_alpha_bar = -jnp.expm1(log_alpha_bar)
  one_minus_alpha_bar_prev = -jnp.expm1(log_alpha_bar_prev)
  one_minus_ratio = -jnp.expm1(log_alpha_bar - log_alpha_bar_prev)  # 1 - alpha-bar_t/alpha-bar_prev
  # DDIM eq. (16): sigma_t(eta)^2; eta = 1 gives the DDPM posterior variance of eq. (7).
  sigma_squared = eta**2 * one_minus_alpha_bar_prev / one_minus_alpha_bar * one_minus_ratio
  # DDIM eq. (12): predicted x_0, direction pointing to x_t, random noise. The direction's
  # coefficient sqrt(1 - alpha-bar_prev - sigma^2) is factored to avoid cancellation.
  direction_coef_squared = one_minus_alpha_bar_prev * (
    1.0 - eta**2 * one_minus_ratio / one_minus_alpha_bar
  )
  x_prev = (
    jnp.exp(0.5 * log_alpha_bar_prev) * x0
    + jnp.sqrt(jnp.maximum(direction_coef_squared, 0.0)) * eps
  )
  if noise is not None and variance_output is not None:
    sigma_squared = eta**2 * learned_variance(
      one_minus_ratio, one_minus_alpha_bar_prev, one_minus_alpha_bar, t_prev, variance_output
    )
  if noise is not None:
    x_prev = x_prev + jnp.sqrt(sigma_squared) * noise
  return x_prev


def learned_variance(beta, one_minus_alpha_bar_prev, one_minus_alpha_bar, t_prev, variance_output):
  """The network's sigma^2 for a step whose beta is 1 - alpha-bar_t / alpha-bar_prev: eq. (15)
  of Improved DDPM between that beta and beta~ = (1 - alpha-bar_prev) / (1 - alpha-bar_t) beta
  (their respacing, Sec. 4). 0 for the step to the data, where beta~ = 0, and for a repeated
  timestep (quadratic spacing's first indices, t_prev = t), where beta = 0 and x_t stays."""
  beta_tilde = one_minus_alpha_bar_prev / one_minus_alpha_bar * beta
  log_variance = diffusion.interpolated_log_variance(
    jnp.log(jnp.maximum(beta_tilde, 1e-20)), jnp.log(jnp.maximum(beta, 1e-20)), variance_output
  )
  moves = (t_prev >= 0).reshape(beta.shape[:1] + (1,) * (beta.ndim - 1)) & (beta > 0)
  return jnp.where(moves, jnp.exp(log_variance), 0.0)


@dataclasses.dataclass(frozen=True)
class DDIM(base.Sampler):
  """DDIM in num_steps = S steps; eta = 0 is deterministic, eta = 1 with S = T is DDPM with
  "fixed_small". spacing: see `base.Spacing`. learned_variance: scale the noise (eta > 0) by
  the network's learned sigma (`ddim_update`; sampling.variance = "learned").
  """

  name = "ddim"
  num_steps: int = 50
  eta: float = 0.0
  spacing: base.Spacing = base.Spacing.UNIFORM
  learned_variance: bool = False

  def __post_init__(self):
    object.__setattr__(self, "spacing", parse_enum(base.Spacing, self.spacing, "spacing"))
    base.check_eta(self.eta)
    object.__setattr__(self, "eta", float(self.eta))

  @classmethod
  def from_config(cls, sampling) -> DDIM:
    return cls(
      num_steps=sampling.num_steps,
      eta=sampling.eta,
      spacing=sampling.spacing,
      learned_variance=sampling.variance == Variance.LEARNED,
    )

  @property
  def uses_noise(self) -> bool:
    return self.eta > 0

  @property
  def uses_learned_variance(self) -> bool:
    return self.learned_variance and self.eta > 0

  @property
  def tags(self) -> tuple[str, ...]:
    return (
      (f"eta{self.eta:g}",) * (self.eta > 0)
      + (self.spacing.value,) * (self.spacing != base.Spacing.UNIFORM)
      + ("learned",) * self.uses_learned_variance
    )

  def timesteps(self, schedule: DiffusionSchedule) -> np.ndarray:
    return base.timestep_indices(schedule, self.num_steps, self.spacing)[::-1].copy()

  def step(self, schedule, x_t, denoised, step, noise, state):
    variance_output = denoised.variance_output if self.uses_learned_variance else None
    return ddim_update(
      schedule,
      x_t,
      denoised.x0,
      denoised.eps,
      step.t,
      step.t_next,
      noise,
      self.eta,
      variance_output,
    ), state
