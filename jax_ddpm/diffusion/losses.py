"""The training losses: each network's target, the per-timestep weights, L_simple, L_hybrid, L_vlb.

L_simple is DDPM eq. (14) for an eps network and the same squared error against x_0 or v for
the others; `loss_weights` weights each timestep's error (Min-SNR-gamma, Hang et al. 2023; P2,
Choi et al. 2022, eq. 8); a learned-variance network adds lambda L_vlb (Improved DDPM eq. 16), or
trains on L_vlb alone (their Sec. 3.3), from the bound's terms in likelihood.py.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jax_ddpm.diffusion.likelihood import vlb_terms
from jax_ddpm.diffusion.process import (
  Prediction,
  Variance,
  get_v,
  mean_flat,
  parse_enum,
  q_sample,
  split_output,
)

if TYPE_CHECKING:
  from jax_ddpm.diffusion.schedules import DiffusionSchedule


class LossWeighting(str, enum.Enum):
  """How the squared error of each timestep is weighted (`loss_weights`)."""

  UNIFORM = "uniform"  # every t alike on the network's own target: DDPM eq. (14) for eps
  MIN_SNR = "min_snr"  # Min-SNR-gamma (Hang et al. 2023)
  P2 = "p2"  # perception-prioritised weighting (Choi et al. 2022, eq. 8)


class Objective(str, enum.Enum):
  """What the train step minimises (`training_losses`)."""

  SIMPLE = "simple"  # L_simple (DDPM eq. 14), plus lambda L_vlb for learned variances (L_hybrid)
  VLB = "vlb"  # L_vlb alone (Improved DDPM Sec. 3.3)


def training_target(schedule: DiffusionSchedule, x0, t, eps, prediction: Prediction):
  """What the network is regressed onto for the given prediction type."""
  prediction = Prediction(prediction)
  if prediction == Prediction.EPS:
    return eps
  if prediction == Prediction.X0:
    return x0
  return get_v(schedule, x0, t, eps)


def loss_weights(
  alphas_cumprod: np.ndarray,
  weighting: LossWeighting,
  prediction: Prediction,
  *,
  min_snr_gamma: float = 5.0,
  p2_gamma: float = 1.0,
  p2_k: float = 1.0,
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


def training_losses(
  schedule: DiffusionSchedule,
  denoise_fn: Callable,
  x0,
  t,
  eps,
  prediction: Prediction = Prediction.EPS,
  weights=None,
  *,
  learn_sigma: bool = False,
  vlb_weight: float = 0.0,
  objective: Objective = Objective.SIMPLE,
):
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
      schedule,
      x0,
      x_t,
      t,
      output.astype(jnp.float32),
      prediction=prediction,
      variance=Variance.LEARNED,
      variance_output=variance_output,
    )
  target = training_target(schedule, x0, t, eps, prediction)
  if output.shape != target.shape:
    raise ValueError(f"Network output shape {output.shape} != target shape {target.shape}.")
  losses = mean_flat(jnp.square(target.astype(jnp.float32) - output.astype(jnp.float32)))
  if weights is not None:
    losses = losses * jnp.asarray(weights, jnp.float32)[t]
  if not learn_sigma:
    return losses
  vlb = vlb_terms(
    schedule,
    x0,
    x_t,
    t,
    jax.lax.stop_gradient(output.astype(jnp.float32)),
    prediction=prediction,
    variance=Variance.LEARNED,
    variance_output=variance_output,
  )
  return losses + vlb_weight * schedule.num_timesteps * vlb
