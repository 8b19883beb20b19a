"""The diffusion math as pure functions: forward process, prediction conversions, posterior, loss.

Every function takes a `DiffusionSchedule` and integer timestep indices t of shape [batch]
(index i is the paper's t = i + 1; see schedules.py). Images are NHWC. Symbols:
x_0 data, x_t the noised sample, eps the Gaussian noise, v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0
(Salimans & Ho 2022, Sec. 4), which networks may predict instead of eps or x_0.

A network may also learn the reverse variance (Nichol & Dhariwal 2021, "Improved DDPM"): it then
outputs 2C channels, the prediction and a raw v whose (v + 1) / 2 interpolates log beta_t and
log beta~_t (their eq. 15). The variational bound's terms (DDPM eq. 5: L_T, L_{t-1}, L_0) are here
in bits per dimension, for the hybrid loss (Improved DDPM eq. 16) and for likelihood evaluation.
"""

from __future__ import annotations

import enum
from typing import Callable

import jax
import jax.numpy as jnp
import jax.scipy.special as special
import numpy as np

from jax_ddpm.diffusion.schedules import DiffusionSchedule


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


class Objective(str, enum.Enum):
  """What the train step minimises (`training_losses`)."""
  SIMPLE = "simple"  # L_simple (DDPM eq. 14), plus lambda L_vlb for learned variances (L_hybrid)
  VLB = "vlb"  # L_vlb alone (Improved DDPM Sec. 3.3)


class TimestepSampling(str, enum.Enum):
  """How the train step draws t (timestep_sampling.py)."""
  UNIFORM = "uniform"  # DDPM Algorithm 1
  IMPORTANCE = "importance"  # Improved DDPM Sec. 3.3, eq. 18


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


def p_log_variance(schedule: DiffusionSchedule, t, variance: Variance, ndim: int,
                   variance_output=None):
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
  return interpolated_log_variance(log_beta_tilde, extract(schedule.log_betas, t, ndim),
                                   variance_output)


def p_mean_variance(schedule: DiffusionSchedule, x_t, t, output, *, prediction: Prediction,
                    variance: Variance, clip_denoised: bool, variance_output=None):
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


def normal_kl(mean1, log_variance1, mean2, log_variance2):
  """KL(N(mean1, e^log_variance1) || N(mean2, e^log_variance2)) per element, in nats."""
  return 0.5 * (-1.0 + log_variance2 - log_variance1 + jnp.exp(log_variance1 - log_variance2)
                + jnp.square(mean1 - mean2) * jnp.exp(-log_variance2))


def discretized_gaussian_log_likelihood(x0, mean, log_variance):
  """log p(x_0) per element under DDPM eq. (13)'s decoder: N(mean, e^log_variance) integrated
  over the bin [x - 1/255, x + 1/255] of each of the 256 levels of [-1, 1], the two end bins
  reaching to -inf and +inf. x0 must lie on that grid (uint8 data scaled to [-1, 1])."""
  inv_std = jnp.exp(-0.5 * log_variance)
  upper = (x0 - mean + 1.0 / 255.0) * inv_std
  lower = (x0 - mean - 1.0 / 255.0) * inv_std
  # Phi(upper) - Phi(lower), taken in the tail where both lie so float32 does not cancel.
  mass = jnp.where(lower > 0, special.ndtr(-lower) - special.ndtr(-upper),
                   special.ndtr(upper) - special.ndtr(lower))
  log_mass = jnp.log(jnp.maximum(mass, 1e-12))
  return jnp.where(x0 < -0.999, special.log_ndtr(upper),
                   jnp.where(x0 > 0.999, special.log_ndtr(-lower), log_mass))


def vlb_terms(schedule: DiffusionSchedule, x0, x_t, t, output, *, prediction: Prediction,
              variance: Variance, variance_output=None, clip_denoised: bool = False):
  """Per-example L_{t-1} of DDPM eq. (5) in bits per dimension, for timestep indices t.

  t > 0: KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) between two Gaussians (eq. 6-7);
  t = 0: the decoder's -log p_theta(x_0 | x_1) (eq. 13). Each is the mean over dimensions
  divided by log 2, so the bound in bits/dim is the sum over t of these plus `prior_bpd`.
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, x_t, t)
  mean, log_variance, _ = p_mean_variance(
      schedule, x_t, t, output, prediction=prediction, variance=variance,
      clip_denoised=clip_denoised, variance_output=variance_output)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / np.log(2.0)
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, log_variance)
                           ) / np.log(2.0)
  return jnp.where(t == 0, decoder_nll, kl)


def prior_bpd(schedule: DiffusionSchedule, x0):
  """L_T = KL(q(x_T | x_0) || N(0, I)) per example in bits/dim (DDPM eq. 5); no parameters."""
  t_last = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
  mean = extract(schedule.sqrt_alphas_cumprod, t_last, x0.ndim) * x0
  log_variance = jnp.log(extract(schedule.sqrt_one_minus_alphas_cumprod, t_last, x0.ndim)) * 2.0
  return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / np.log(2.0)


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
                    prediction: Prediction = Prediction.EPS, weights=None, *,
                    learn_sigma: bool = False, vlb_weight: float = 0.0,
                    objective: Objective = Objective.SIMPLE):
  """Per-example training loss: L_simple, L_hybrid for a learned-variance network, or L_vlb.

  L_simple (DDPM eq. 14): mean over pixels of |target - net(x_t, t)|^2; for an eps network
  exactly eq. (14), for x_0 and v networks the same squared error against that target.
  `weights` [T] (`loss_weights`), if given, scales each example's error by its timestep's weight.
  With `learn_sigma`, L_hybrid = L_simple + lambda L_vlb (Improved DDPM eq. 16; lambda =
  `vlb_weight`, 0.001 in the paper), where L_vlb = T L_{t-1} estimates the bound's sum over t
  from this example's t, in bits/dim, and sees the predicted mean through a stop-gradient so
  that it trains only the variance (their Sec. 3.1); images must be on the 8-bit grid.
  objective = vlb (learn_sigma required): L_vlb = T L_{t-1} alone, through mean and variance
  (their Sec. 3.3); `weights` must then be None (weighting the terms changes the bound).
  """
  x_t = q_sample(schedule, x0, t, eps)
  output, variance_output = split_output(denoise_fn(x_t, t), learn_sigma)
  if parse_enum(Objective, objective, "objective") == Objective.VLB:
    if not learn_sigma or weights is not None:
      raise ValueError("objective=vlb needs learn_sigma and no timestep weights.")
    return schedule.num_timesteps * vlb_terms(
        schedule, x0, x_t, t, output.astype(jnp.float32), prediction=prediction,
        variance=Variance.LEARNED, variance_output=variance_output)
  target = training_target(schedule, x0, t, eps, prediction)
  if output.shape != target.shape:
    raise ValueError(f"Network output shape {output.shape} != target shape {target.shape}.")
  losses = mean_flat(jnp.square(target.astype(jnp.float32) - output.astype(jnp.float32)))
  if weights is not None:
    losses = losses * jnp.asarray(weights, jnp.float32)[t]
  if not learn_sigma:
    return losses
  vlb = vlb_terms(schedule, x0, x_t, t, jax.lax.stop_gradient(output.astype(jnp.float32)),
                  prediction=prediction, variance=Variance.LEARNED,
                  variance_output=variance_output)
  return losses + vlb_weight * schedule.num_timesteps * vlb


def sample_timesteps(rng: jax.Array, batch_size: int, num_timesteps: int) -> jnp.ndarray:
  """t ~ Uniform({0, ..., T-1}) for each example (DDPM Algorithm 1, line 3)."""
  return jax.random.randint(rng, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
