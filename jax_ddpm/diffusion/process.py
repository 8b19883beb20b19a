"""The diffusion process as pure functions: the forward process q, its posterior, the reverse p.

Every function takes a `DiffusionSchedule` and integer timestep indices t of shape [batch]
(index i is the paper's t = i + 1; see schedules.py). Images are NHWC. Symbols: x_0 data, x_t
the noised sample (DDPM eq. 4), eps the Gaussian noise, v = sqrt(alpha-bar) eps -
sqrt(1 - alpha-bar) x_0 (Salimans & Ho 2022, Sec. 4), which a network may predict instead of eps
or x_0. The posterior q(x_{t-1} | x_t, x_0) is DDPM eq. (6)-(7) and the reverse
p_theta(x_{t-1} | x_t) eq. (1) and (11), its variance fixed (Sec. 3.2) or learned (Nichol &
Dhariwal 2021, "Improved DDPM", eq. 15: the network then outputs 2C channels).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import jax.numpy as jnp

if TYPE_CHECKING:
  from jax_ddpm.diffusion.schedules import DiffusionSchedule


class Prediction(str, enum.Enum):
  """What the network outputs."""

  EPS = "eps"
  X0 = "x0"
  V = "v"


class Variance(str, enum.Enum):
  """The reverse-process variance sigma_t^2 (DDPM Sec. 3.2)."""

  FIXED_SMALL = "fixed_small"  # sigma_t^2 = beta~_t, the posterior variance (eq. 7)
  FIXED_LARGE = "fixed_large"  # sigma_t^2 = beta_t; the original CIFAR-10 run used it
  LEARNED = "learned"  # the network's interpolation of the two, Improved DDPM eq. (15)


def parse_enum(enum_type: type[enum.Enum], value, argument: str):
  """`enum_type(value)`, or a ValueError naming the argument and the allowed values."""
  try:
    return enum_type(value)
  except ValueError:
    allowed = [member.value for member in enum_type]
    raise ValueError(f"Unknown {argument} {value!r}; allowed values: {allowed}.") from None


def extract(table: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """table[t] shaped [batch, 1, ..., 1] to broadcast against a rank-`ndim` batch."""
  values = jnp.take(table, t, axis=0)
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def q_sample(schedule: DiffusionSchedule, x0, t, eps):
  """Sample of q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I), DDPM eq. (4)."""
  return (
    extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
    + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * eps
  )


def predict_x0_from_eps(schedule: DiffusionSchedule, x_t, t, eps):
  """x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t), DDPM eq. (4) solved for x_0."""
  return (
    extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
    - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
  )


def predict_eps_from_x0(schedule: DiffusionSchedule, x_t, t, x0):
  """eps = (x_t - sqrt(alpha-bar_t) x_0) / sqrt(1 - alpha-bar_t), DDPM eq. (4) solved for eps."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / extract(
    schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim
  )


def get_v(schedule: DiffusionSchedule, x0, t, eps):
  """v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
  return (
    extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps
    - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
  )


def predict_x0_from_v(schedule: DiffusionSchedule, x_t, t, v):
  """x_0 = sqrt(alpha-bar_t) x_t - sqrt(1 - alpha-bar_t) v (Salimans & Ho 2022, Appendix D)."""
  return (
    extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
    - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
  )


def predict_eps_from_v(schedule: DiffusionSchedule, x_t, t, v):
  """eps = sqrt(1 - alpha-bar_t) x_t + sqrt(alpha-bar_t) v (Salimans & Ho 2022, Appendix D)."""
  return (
    extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
    + extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v
  )


def x0_and_eps_from_output(schedule: DiffusionSchedule, x_t, t, output, prediction: Prediction):
  """The network output, whatever it predicts, as the pair (x_0, eps)."""
  prediction = Prediction(prediction)
  if prediction == Prediction.EPS:
    return predict_x0_from_eps(schedule, x_t, t, output), output
  if prediction == Prediction.X0:
    return output, predict_eps_from_x0(schedule, x_t, t, output)
  return predict_x0_from_v(schedule, x_t, t, output), predict_eps_from_v(schedule, x_t, t, output)


def q_posterior_mean_variance(schedule: DiffusionSchedule, x0, x_t, t):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), DDPM eq. (6)-(7)."""
  mean = (
    extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
    + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t
  )
  variance = extract(schedule.posterior_variance, t, x_t.ndim)
  log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
  return mean, variance, log_variance


def split_output(output, learn_sigma: bool):
  """(prediction, raw variance output or None): a learned-variance network's 2C channels are
  the prediction followed by v (Improved DDPM Sec. 3.1); any other network's are all prediction."""
  if not learn_sigma:
    return output, None
  if output.shape[-1] % 2:
    raise ValueError(f"A learned-variance network outputs 2C channels, got {output.shape}.")
  return jnp.split(output, 2, axis=-1)


def interpolated_log_variance(log_beta_tilde, log_beta, variance_output):
  """log Sigma_theta = v log beta_t + (1 - v) log beta~_t, Improved DDPM eq. (15), with the
  network's raw output mapped to v = (output + 1) / 2 as in their code (not clipped: v may
  leave [0, 1]). Either log may be a respaced step's (samplers/ddim.py)."""
  v = (variance_output.astype(jnp.float32) + 1.0) / 2.0
  return v * log_beta + (1.0 - v) * log_beta_tilde


def p_log_variance(
  schedule: DiffusionSchedule, t, variance: Variance, ndim: int, variance_output=None
):
  """log sigma_t^2 of p_theta(x_{t-1} | x_t) for each choice of `Variance`, DDPM Sec. 3.2.

  At index 0 (where beta~ = 0) fixed_small and the learned range use beta~ of index 1, as the
  original code does; sampling adds no noise there.
  """
  variance = Variance(variance)
  if variance == Variance.FIXED_LARGE:
    return extract(schedule.fixed_large_log_variance, t, ndim)
  log_beta_tilde = extract(schedule.posterior_log_variance_clipped, t, ndim)
  if variance == Variance.FIXED_SMALL:
    return log_beta_tilde
  if variance_output is None:
    raise ValueError("Variance 'learned' needs a network that outputs it (model.learn_sigma).")
  return interpolated_log_variance(
    log_beta_tilde, extract(schedule.log_betas, t, ndim), variance_output
  )


def p_mean_variance(
  schedule: DiffusionSchedule,
  x_t,
  t,
  output,
  *,
  prediction: Prediction,
  variance: Variance,
  clip_denoised: bool,
  variance_output=None,
):
  """Mean, log-variance and predicted x_0 of p_theta(x_{t-1} | x_t), DDPM eq. (1), (11).

  The mean is the posterior mean (eq. 7) at the predicted x_0, which for an eps prediction is
  exactly eq. (11). With `clip_denoised` the predicted x_0 is clipped to [-1, 1] first, as the
  original sampler did. `variance_output`: a learned-variance network's raw v (`split_output`).
  """
  x0, _ = x0_and_eps_from_output(schedule, x_t, t, output, prediction)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(schedule, x0, x_t, t)
  log_variance = p_log_variance(schedule, t, variance, x_t.ndim, variance_output)
  return mean, log_variance, x0


def mean_flat(x):
  """Mean over every axis but the batch axis."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def alpha_bar_pair(schedule: DiffusionSchedule, t, t_next, ndim: int):
  """log alpha-bar at t and at t_next, broadcast to rank ndim; t_next = -1 is the data (log 1)."""
  log_with_data = jnp.append(schedule.log_alphas_cumprod, 0.0)
  t_next = jnp.where(t_next < 0, schedule.num_timesteps, t_next)
  return (extract(schedule.log_alphas_cumprod, t, ndim), extract(log_with_data, t_next, ndim))
