"""Forward process, prediction conversions, posterior and loss against closed forms."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm.diffusion import losses as loss_lib
from jax_ddpm.diffusion import process, schedules

SCHEDULE = schedules.get_schedule("linear", 1000)
BETAS = np.linspace(1e-4, 0.02, 1000)  # float64, independent of the float32 table
ABAR = np.cumprod(1 - BETAS)


def test_q_sample_marginal_mean_and_variance():
  n, t_index = 200_000, 300
  x0 = jnp.full((n, 1), 0.7)
  t = jnp.full((n,), t_index)
  eps = jax.random.normal(jax.random.key(0), (n, 1))
  x_t = np.asarray(process.q_sample(SCHEDULE, x0, t, eps), np.float64)
  mean, variance = np.sqrt(ABAR[t_index]) * 0.7, 1 - ABAR[t_index]
  # Tolerances: 5 standard errors of the sample mean and sample variance.
  assert abs(x_t.mean() - mean) < 5 * np.sqrt(variance / n)
  assert abs(x_t.var() - variance) < 5 * variance * np.sqrt(2 / (n - 1))


def test_predictions_convert_exactly_between_eps_x0_and_v():
  key_x, key_e = jax.random.split(jax.random.key(1))
  x0 = jax.random.uniform(key_x, (6, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(key_e, x0.shape)
  t = jnp.array([0, 1, 10, 500, 998, 999])
  x_t = process.q_sample(SCHEDULE, x0, t, eps)
  v = process.get_v(SCHEDULE, x0, t, eps)
  for prediction, output in (("eps", eps), ("x0", x0), ("v", v)):
    x0_hat, eps_hat = process.x0_and_eps_from_output(SCHEDULE, x_t, t, output, prediction)
    # x_0 from eps divides by sqrt(alpha-bar), ~0.006 at t=999: errors grow by 1/0.006.
    np.testing.assert_allclose(x0_hat, x0, atol=3e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=3e-4 if prediction != "x0" else 2e-2)
    np.testing.assert_allclose(loss_lib.training_target(SCHEDULE, x0, t, eps, prediction), output)


def test_posterior_mean_and_variance_match_gaussian_conditioning():
  """q(x_{t-1} | x_t, x_0) from Bayes' rule on the two Gaussians of DDPM eq. (2) and (4)."""
  x0 = jnp.array([[0.3], [-0.8], [0.5]])
  x_t = jnp.array([[1.1], [0.2], [-0.4]])
  t = jnp.array([1, 400, 999])
  mean, variance, log_variance = process.q_posterior_mean_variance(SCHEDULE, x0, x_t, t)
  for row, index in enumerate(np.asarray(t)):
    abar_prev, beta = ABAR[index - 1], BETAS[index]
    # prior x_{t-1} ~ N(sqrt(abar_prev) x0, 1 - abar_prev);
    # likelihood x_t ~ N(sqrt(1-beta) x_{t-1}, beta)
    precision = 1 / (1 - abar_prev) + (1 - beta) / beta
    expected_var = 1 / precision
    expected_mean = expected_var * (
      np.sqrt(abar_prev) * float(x0[row, 0]) / (1 - abar_prev)
      + np.sqrt(1 - beta) * float(x_t[row, 0]) / beta
    )
    np.testing.assert_allclose(float(variance[row, 0]), expected_var, rtol=1e-5)
    np.testing.assert_allclose(float(mean[row, 0]), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(log_variance[row, 0]), np.log(expected_var), rtol=1e-5)


def test_posterior_at_first_step_returns_x0():
  x0, x_t = jnp.array([[0.25]]), jnp.array([[0.9]])
  mean, variance, _ = process.q_posterior_mean_variance(SCHEDULE, x0, x_t, jnp.array([0]))
  np.testing.assert_allclose(mean, x0, rtol=1e-6)
  assert float(variance[0, 0]) == 0.0


def test_p_mean_variance_variance_choices():
  x_t, output, t = jnp.zeros((2, 1)), jnp.zeros((2, 1)), jnp.array([0, 500])
  _, small, _ = process.p_mean_variance(
    SCHEDULE, x_t, t, output, prediction="eps", variance="fixed_small", clip_denoised=False
  )
  _, large, _ = process.p_mean_variance(
    SCHEDULE, x_t, t, output, prediction="eps", variance="fixed_large", clip_denoised=False
  )
  np.testing.assert_allclose(
    small[:, 0], np.asarray(SCHEDULE.posterior_log_variance_clipped)[[0, 500]]
  )
  np.testing.assert_allclose(np.exp(large[1, 0]), BETAS[500], rtol=1e-5)


def test_clip_denoised_bounds_predicted_x0():
  x_t, t = jnp.full((1, 2), 3.0), jnp.array([10])
  _, _, x0 = process.p_mean_variance(
    SCHEDULE,
    x_t,
    t,
    jnp.zeros((1, 2)),
    prediction="eps",
    variance="fixed_small",
    clip_denoised=True,
  )
  np.testing.assert_array_equal(x0, 1.0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_is_zero_for_the_exact_target_and_mse_otherwise(prediction):
  key_x, key_e = jax.random.split(jax.random.key(2))
  x0 = jax.random.uniform(key_x, (4, 8, 8, 1), minval=-1, maxval=1)
  eps = jax.random.normal(key_e, x0.shape)
  t = jnp.array([3, 30, 300, 900])
  target = loss_lib.training_target(SCHEDULE, x0, t, eps, prediction)
  exact = loss_lib.training_losses(SCHEDULE, lambda x_t, t: target, x0, t, eps, prediction)
  np.testing.assert_allclose(exact, 0.0, atol=1e-12)
  zero = loss_lib.training_losses(
    SCHEDULE, lambda x_t, t: jnp.zeros_like(x_t), x0, t, eps, prediction
  )
  np.testing.assert_allclose(zero, np.mean(np.square(target), axis=(1, 2, 3)), rtol=1e-6)


def test_unknown_prediction_names_the_allowed_values():
  with pytest.raises(ValueError, match=r"Unknown prediction 'noise'.*'eps', 'x0', 'v'"):
    process.parse_enum(process.Prediction, "noise", "prediction")


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_loss_weights_follow_their_papers_formulas(schedule_name):
  betas = schedules.BETA_SCHEDULES[schedule_name](1000, 1e-4, 0.02)
  alpha_bar = np.cumprod(1.0 - np.asarray(betas, np.float64))
  snr = alpha_bar / (1.0 - alpha_bar)
  weights = lambda w, p: loss_lib.loss_weights(alpha_bar, w, p)
  np.testing.assert_array_equal(weights("uniform", "v"), np.ones(1000))
  # Min-SNR-5 on each target (Hang et al. 2023): min(SNR, 5) on x_0, divided by SNR for eps and
  # by SNR + 1 for v.
  np.testing.assert_allclose(weights("min_snr", "x0"), np.minimum(snr, 5), rtol=1e-12)
  np.testing.assert_allclose(weights("min_snr", "eps"), np.minimum(1, 5 / snr), rtol=1e-12)
  np.testing.assert_allclose(weights("min_snr", "v"), np.minimum(snr, 5) / (snr + 1), rtol=1e-12)
  # P2 with k = 1, gamma = 1 (Choi et al. 2022, eq. 8): 1 / (1 + SNR) on the eps error.
  np.testing.assert_allclose(weights("p2", "eps"), 1 / (1 + snr), rtol=1e-12)
  p2_half = loss_lib.loss_weights(alpha_bar, "p2", "eps", p2_gamma=0.5, p2_k=2.0)
  np.testing.assert_allclose(p2_half, (2 + snr) ** -0.5, rtol=1e-12)


@pytest.mark.parametrize("weighting", ["min_snr", "p2"])
def test_a_weighting_asks_the_same_of_every_prediction_target(weighting):
  """One denoiser's weighted loss is the same whether it speaks eps, x_0 or v."""
  schedule = schedules.get_schedule("cosine", 1000)
  keys = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(keys[0], (6, 4, 4, 1))
  eps = jax.random.normal(keys[1], x0.shape)
  t = jnp.array([0, 10, 200, 500, 900, 999])
  eps_hat = eps + 0.1 * jax.random.normal(keys[2], x0.shape)  # an imperfect denoiser
  alpha_bar = np.cumprod(1.0 - np.asarray(schedules.cosine_betas(1000), np.float64))
  outputs = {
    "eps": lambda x_t, t: eps_hat,
    "x0": lambda x_t, t: process.predict_x0_from_eps(schedule, x_t, t, eps_hat),
    "v": lambda x_t, t: process.get_v(
      schedule, process.predict_x0_from_eps(schedule, x_t, t, eps_hat), t, eps_hat
    ),
  }
  losses = {
    p: loss_lib.training_losses(
      schedule, net, x0, t, eps, p, loss_lib.loss_weights(alpha_bar, weighting, p)
    )
    for p, net in outputs.items()
  }
  np.testing.assert_allclose(losses["x0"], losses["eps"], rtol=2e-3)
  np.testing.assert_allclose(losses["v"], losses["eps"], rtol=2e-3)


def test_unknown_loss_weighting_is_refused_before_training(tmp_path):
  import runs

  from configs import tiny

  config = tiny.get_config()
  config.training.loss_weighting = "snr"
  with pytest.raises(ValueError, match=r"Unknown training.loss_weighting 'snr'.*min_snr"):
    runs.train(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_the_train_step_options_carry_the_configs_weights():
  import runs

  from configs import tiny

  config = tiny.get_config()
  assert runs.build(config).step_options.loss_weights is None  # uniform: the loss is unchanged
  config.training.loss_weighting = "min_snr"
  config.diffusion.prediction = "v"
  betas = schedules.linear_betas(config.diffusion.num_timesteps, 1e-4, 0.02)
  expected = loss_lib.loss_weights(np.cumprod(1 - betas), "min_snr", "v")
  np.testing.assert_array_equal(runs.build(config).step_options.loss_weights, expected)
