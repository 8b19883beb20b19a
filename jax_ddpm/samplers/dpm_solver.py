"""DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"), Algorithm 2: the probability-flow ODE in its data-prediction form,
solved by a multistep second-order method.

Notation: alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t), lambda_t =
log(alpha_t / sigma_t) (half the log-SNR), h_i = lambda_{t_i} - lambda_{t_{i-1}} > 0 for the
step from t_{i-1} to t_i (towards the data). With D_i an estimate of x_0 on the step,

  x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,

where the first-order D_i = x0_{i-1} is DDIM (eta = 0) exactly, and the second-order
D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2} with r_i = h_{i-1} / h_i reuses the previous
step's prediction, so each step still costs one network call. The first step has no previous
prediction and the last step (to the data, sigma = 0, h = infinity) is first order, as the
paper's "lower order final" does for few steps.

SDE-DPM-Solver++(2M) (the name diffusers' "sde-dpmsolver++" and k-diffusion's "DPM++ 2M SDE"
go by) solves the reverse SDE in the same variables instead:

  x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) e^{-h_i} x_{t_{i-1}} + alpha_{t_i} (1 - e^{-2 h_i}) D_i
            + sigma_{t_i} sqrt(1 - e^{-2 h_i}) z,   z ~ N(0, I).

With D_i = x0_{i-1} this is the DDPM posterior q(x_{t_i} | x_{t_{i-1}}, x_0) (Ho et al. 2020,
eq. 6-7, between any two timesteps) written in lambda, that is DDIM with eta = 1 (DDIM eq. 12 and
16); the second-order D_i is the one above, so the correction costs no network call.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jax_ddpm.diffusion.process import alpha_bar_pair, parse_enum
from jax_ddpm.diffusion.schedules import DiffusionSchedule
from jax_ddpm.samplers import base


def step_coefficients(schedule: DiffusionSchedule, t, t_next, ndim: int):
  """(sigma_next / sigma_t, alpha_next, e^{-h}, h) for a step t -> t_next; t_next = -1 is the
  data, where sigma_next = 0, e^{-h} = 0 and h = +inf."""
  log_alpha_bar, log_alpha_bar_next = alpha_bar_pair(schedule, t, t_next, ndim)
  log_one_minus = jnp.log(-jnp.expm1(log_alpha_bar))
  log_one_minus_next = jnp.log(-jnp.expm1(log_alpha_bar_next))  # -inf at the data
  log_sigma_ratio = 0.5 * (log_one_minus_next - log_one_minus)
  h = 0.5 * (log_alpha_bar_next - log_alpha_bar) - log_sigma_ratio  # lambda_next - lambda_t
  return jnp.exp(log_sigma_ratio), jnp.exp(0.5 * log_alpha_bar_next), jnp.exp(-h), h


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2M(base.Sampler):
  """DPM-Solver++(2M) in num_steps = S network calls (order = 1: its first-order form, DDIM).

  spacing: "logsnr" (uniform in lambda, the paper's default for pixel-space models),
  "uniform" or "quadratic" in t (see `base.Spacing`).
  """

  name = "dpmpp_2m"
  num_steps: int = 20
  spacing: base.Spacing = base.Spacing.LOGSNR
  order: int = 2

  def __post_init__(self):
    object.__setattr__(self, "spacing", parse_enum(base.Spacing, self.spacing, "spacing"))
    if self.order not in (1, 2):
      raise ValueError(f"order must be 1 or 2, got {self.order!r}.")

  @property
  def tags(self) -> tuple[str, ...]:
    return (self.spacing.value,) * (self.spacing != base.Spacing.UNIFORM) + (
      f"order{self.order}",
    ) * (self.order != 2)

  @classmethod
  def from_config(cls, sampling) -> DPMSolverPP2M:
    return cls(num_steps=sampling.num_steps, spacing=sampling.spacing)

  def timesteps(self, schedule: DiffusionSchedule) -> np.ndarray:
    return base.timestep_indices(schedule, self.num_steps, self.spacing)[::-1].copy()

  def init_state(self, x_T):
    """(the previous step's x_0 prediction, the previous step's h)."""
    return jnp.zeros_like(x_T), jnp.zeros((), jnp.float32)

  def step(self, schedule, x_t, denoised, step, noise, state):
    sigma_ratio, alpha_next, exp_neg_h, h = step_coefficients(
      schedule, step.t, step.t_next, x_t.ndim
    )
    h = h.reshape(-1)[0]  # every sample of the batch is at the same t
    estimate = self.estimate(denoised.x0, h, step, state)
    x_next = sigma_ratio * x_t + alpha_next * (1.0 - exp_neg_h) * estimate
    return x_next, (denoised.x0, h)

  def estimate(self, x0, h, step, state):
    """D_i: first order on the first step, the step to the data, after a step that did not move
    (h_{i-1} = 0: quadratic spacing repeats t = 0 for large S), and for order 1."""
    x0_previous, h_previous = state
    first_order = (step.index == 0) | (step.t_next[0] < 0) | (self.order == 1) | (h_previous <= 0)
    # 1 / (2 r) = h / (2 h_previous); the guard keeps the unused branch finite.
    half_over_r = 0.5 * jnp.where(first_order, 0.0, h / jnp.where(first_order, 1.0, h_previous))
    return (1.0 + half_over_r) * x0 - half_over_r * x0_previous


@dataclasses.dataclass(frozen=True)
class SDEDPMSolverPP2M(DPMSolverPP2M):
  """SDE-DPM-Solver++(2M) in num_steps = S network calls (order = 1: DDIM with eta = 1).

  Adds the posterior's noise at every step like DDPM, which corrects what a few deterministic
  steps leave behind; spacing as DPMSolverPP2M.
  """

  name = "sde_dpmpp_2m"

  @property
  def uses_noise(self) -> bool:
    return True

  def step(self, schedule, x_t, denoised, step, noise, state):
    sigma_ratio, alpha_next, exp_neg_h, h = step_coefficients(
      schedule, step.t, step.t_next, x_t.ndim
    )
    h = h.reshape(-1)[0]
    estimate = self.estimate(denoised.x0, h, step, state)
    one_minus_exp = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}: 1 at the data (h = inf), 0 for h = 0
    log_alpha_bar_next = alpha_bar_pair(schedule, step.t, step.t_next, x_t.ndim)[1]
    sigma_next = jnp.sqrt(-jnp.expm1(log_alpha_bar_next))
    x_next = (
      sigma_ratio * exp_neg_h * x_t
      + alpha_next * one_minus_exp * estimate
      + sigma_next * jnp.sqrt(one_minus_exp) * noise
    )
    return x_next, (denoised.x0, h)
