"""The diffusion math as pure functions: forward process, prediction conversions, posterior, loss.

Every function takes a `DiffusionSchedule` and integer timestep indices t of shape [batch]
(index i is the paper's t = i + 1; see schedules.py). Images are NHWC. Symbols:
x_0 data, x_t the noised sample, eps the Gaussian noise, v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0
(Salimans & Ho 2022, Sec. 4), which networks may predict instead of eps or x_0.
"""

from __future__ import annotations

import enum
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_ddpm.schedules import DiffusionSchedule


class Prediction(str, enum.Enum):
  """What the network outputs."""
  EPS = "eps"
  X0 = "x0"
  V = "v"


class LossWeighting(str, enum.Enum):
  """How the squared error of each timestep is weighted (`loss_weights`)."""
  UNIFORM = "uniform"  # every t alike on the network's own target: DDPM eq. (14) for eps
  MIN_SNR = "min_snr"  # Min-SNR-gamma (Hang et al. 2023)
  P2 = "p2"  # perception-prioritised weighting (Choi et al. 2022, eq. 8)


class Variance(str, enum.Enum):
  """The reverse-process variance sigma_t^2 (DDPM Sec. 3.2)."""
  FIXED_SMALL = "fixed_small"  # sigma_t^2 = beta~_t, the posterior variance (eq. 7)
  FIXED_LARGE = "fixed_large"  # sigma_t^2 = beta_t; the original CIFAR-10 run used it


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
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * eps)


def predict_x0_from_eps(schedule: DiffusionSchedule, x_t, t, eps):
  """x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t), DDPM eq. (4) solved for x_0."""
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(schedule: DiffusionSchedule, x_t, t, x0):
  """eps = (x_t - sqrt(alpha-bar_t) x_0) / sqrt(1 - alpha-bar_t), DDPM eq. (4) solved for eps."""
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def get_v(schedule: DiffusionSchedule, x0, t, eps):
  """v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * eps
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0_from_v(schedule: DiffusionSchedule, x_t, t, v):
  """x_0 = sqrt(alpha-bar_t) x_t - sqrt(1 - alpha-bar_t) v (Salimans & Ho 2022, Appendix D)."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def predict_eps_from_v(schedule: DiffusionSchedule, x_t, t, v):
  """eps = sqrt(1 - alpha-bar_t) x_t + sqrt(alpha-bar_t) v (Salimans & Ho 2022, Appendix D)."""
  return (extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
          + extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v)


def x0_and_eps_from_output(schedule: DiffusionSchedule, x_t, t, output,
                           prediction: Prediction):
  """The network output, whatever it predicts, as the pair (x_0, eps)."""
  prediction = Prediction(prediction)
  if prediction == Prediction.EPS:
    return predict_x0_from_eps(schedule, x_t, t, output), output
  if prediction == Prediction.X0:
    return output, predict_eps_from_x0(schedule, x_t, t, output)
  return predict_x0_from_v(schedule, x_t, t, output), predict_eps_from_v(schedule, x_t, t, output)


def training_target(schedule: DiffusionSchedule, x0, t, eps, prediction: Prediction):
  """What the network is regressed onto for the given prediction type."""
  prediction = Prediction(prediction)
  if prediction == Prediction.EPS:
    return eps
  if prediction == Prediction.X0:
    return x0
  return get_v(schedule, x0, t, eps)


def q_posterior_mean_variance(schedule: DiffusionSchedule, x0, x_t, t):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), DDPM eq. (6)-(7)."""
  mean = (extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
  variance = extract(schedule.posterior_variance, t, x_t.ndim)
  log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
  return mean, variance, log_variance


def p_mean_variance(schedule: DiffusionSchedule, x_t, t, output, *, prediction: Prediction,
                    variance: Variance, clip_denoised: bool):
  """Mean, log-variance and predicted x_0 of p_theta(x_{t-1} | x_t), DDPM eq. (1), (11).

  The mean is the posterior mean (eq. 7) at the predicted x_0, which for an eps prediction is
  exactly eq. (11). With `clip_denoised` the predicted x_0 is clipped to [-1, 1] first, as the
  original sampler did.
  """
  x0, _ = x0_and_eps_from_output(schedule, x_t, t, output, prediction)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, _, log_variance = q_posterior_mean_variance(schedule, x0, x_t, t)
  if Variance(variance) == Variance.FIXED_LARGE:
    log_variance = extract(schedule.fixed_large_log_variance, t, x_t.ndim)
  return mean, log_variance, x0


def mean_flat(x):
  """Mean over every axis but the batch axis."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def loss_weights(alphas_cumprod: np.ndarray, weighting: LossWeighting, prediction: Prediction, *,
                 min_snr_gamma: float = 5.0, p2_gamma: float = 1.0, p2_k: float = 1.0
                 ) -> np.ndarray:
  """Float64 [T]: the weight of each timestep's squared error on the network's own target.

  With SNR_t = alpha-bar_t / (1 - alpha-bar_t) (Kingma et al. 2021, eq. 2), the errors of one
  prediction in the three targets are tied: |eps err|^2 = SNR_t |x_0 err|^2 and
  |v err|^2 = (SNR_t + 1) / SNR_t |eps err|^2. A weighting is therefore a weight w_t of the x_0
  error, divided by SNR_t for an eps network and by SNR_t + 1 for a v network:
    min_snr  w_t = min(SNR_t, gamma)                  (Hang et al. 2023, Min-SNR-gamma; gamma 5)
    p2       w_t = SNR_t / (k + SNR_t)^gamma, i.e. 1 / (k + SNR_t)^gamma on the eps error
                                                      (Choi et al. 2022, eq. 8; k = 1, gamma = 1)
  uniform is 1 on the own target at every t (the unweighted mean squared error).
  """
  weighting = parse_enum(LossWeighting, weighting, "loss weighting")
  prediction = parse_enum(Prediction, prediction, "prediction")
  alpha_bar = np.asarray(alphas_cumprod, np.float64)
  snr = alpha_bar / (1.0 - alpha_bar)
  if weighting == LossWeighting.UNIFORM:
    return np.ones_like(snr)
  if weighting == LossWeighting.MIN_SNR:
    w_x0 = np.minimum(snr, min_snr_gamma)
  else:
    w_x0 = snr / (p2_k + snr) ** p2_gamma
  return w_x0 / {Prediction.EPS: snr, Prediction.X0: 1.0, Prediction.V: snr + 1.0}[prediction]


def training_losses(schedule: DiffusionSchedule, denoise_fn: Callable, x0, t, eps,
                    prediction: Prediction = Prediction.EPS, weights=None):
  """Per-example L_simple, DDPM eq. (14): mean over pixels of |target - net(x_t, t)|^2.

  denoise_fn(x_t, t) -> network output. For eps prediction this is eq. (14) exactly; for
  x_0 and v predictions the same squared error is taken against that target. `weights` [T]
  (`loss_weights`), if given, scales each example's error by its timestep's weight.
  """
  x_t = q_sample(schedule, x0, t, eps)
  output = denoise_fn(x_t, t)
  target = training_target(schedule, x0, t, eps, prediction)
  if output.shape != target.shape:
    raise ValueError(f"Network output shape {output.shape} != target shape {target.shape}.")
  losses = mean_flat(jnp.square(target.astype(jnp.float32) - output.astype(jnp.float32)))
  return losses if weights is None else losses * jnp.asarray(weights, jnp.float32)[t]


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int) -> jnp.ndarray:
  """t ~ Uniform({0, ..., T-1}) for each example (DDPM Algorithm 1, line 3)."""
  return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
