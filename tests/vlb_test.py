"""The variational bound's terms, the hybrid loss and the bits/dim estimate against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runs
from scipy import stats

from configs import tiny
from jax_ddpm.config import run_config
from jax_ddpm.data import sources as data_sources
from jax_ddpm.diffusion import likelihood, process, schedules
from jax_ddpm.diffusion.losses import training_losses
from jax_ddpm.diffusion.process import Prediction, Variance
from jax_ddpm.evaluation import likelihood as evaluation_likelihood
from jax_ddpm.io import images as image_io
from jax_ddpm.runtime import mesh as parallel

SCHEDULE = schedules.get_schedule("linear", 1000)
BETAS = np.linspace(1e-4, 0.02, 1000)  # float64, independent of the float32 table
ABAR = np.cumprod(1 - BETAS)
ABAR_PREV = np.append(1.0, ABAR[:-1])
BETA_TILDE = BETAS * (1 - ABAR_PREV) / (1 - ABAR)


def test_gaussian_kl_matches_the_closed_form_in_float64():
  rng = np.random.default_rng(0)
  m1, m2 = rng.normal(size=(2, 1000))
  lv1, lv2 = rng.uniform(-9, 1, size=(2, 1000))
  s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
  expected = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
  actual = np.asarray(
    likelihood.normal_kl(*(jnp.asarray(v, jnp.float32) for v in (m1, lv1, m2, lv2)))
  )
  np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=1e-5)


def decoder_log_likelihood_reference(x, mean, std):
  """float64: log of the N(mean, std^2) mass of x's bin of width 2/255, end bins unbounded."""
  upper = np.where(x > 0.999, np.inf, x + 1 / 255)
  lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
  with np.errstate(divide="ignore"):  # a mass of 0 in float64 is -inf; such pixels are skipped
    return np.log(stats.norm.cdf(upper, mean, std) - stats.norm.cdf(lower, mean, std))


def test_decoder_likelihood_integrates_the_gaussian_over_each_pixels_bin():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, size=4000) / 127.5 - 1.0
  x[:10], x[10:20] = -1.0, 1.0  # both unbounded end bins
  mean = np.clip(x + rng.normal(scale=0.02, size=x.shape), -1.2, 1.2)
  log_variance = rng.uniform(np.log(1e-5), np.log(1e-2), size=x.shape)
  expected = decoder_log_likelihood_reference(x, mean, np.exp(0.5 * log_variance))
  actual = np.asarray(
    likelihood.discretized_gaussian_log_likelihood(
      *(jnp.asarray(v, jnp.float32) for v in (x, mean, log_variance))
    )
  )
  keep = expected > np.log(1e-8)  # below that the float32 version floors the mass at 1e-12
  assert keep.mean() > 0.9
  np.testing.assert_allclose(actual[keep], expected[keep], rtol=1e-3, atol=2e-4)


def test_decoder_probabilities_of_all_256_levels_sum_to_one():
  levels = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
  for mean, log_variance in [(0.1, -8.0), (-0.97, -6.0), (0.5, -2.0)]:
    log_p = likelihood.discretized_gaussian_log_likelihood(
      levels, jnp.full_like(levels, mean), jnp.full_like(levels, log_variance)
    )
    assert abs(float(jnp.sum(jnp.exp(log_p))) - 1.0) < 1e-4


@pytest.mark.parametrize("t_index", [1, 30, 300, 999])
def test_vlb_of_the_exact_denoiser_on_gaussian_data_is_its_closed_form(t_index):
  """x_0 ~ N(0, I): then E[eps | x_t] = sqrt(1 - alpha-bar_t) x_t, Var(x_0 | x_t) = 1 - alpha-bar_t,
  and the exact reverse variance is beta_t (the learned range's upper end, v = 1). The KL term's
  expectation is 0.5 (log(beta/beta~) - 1 + beta~/beta + coef1^2 (1 - alpha-bar) / beta)."""
  n, dim = 20000, 4
  keys = jax.random.split(jax.random.key(t_index), 2)
  x0 = jax.random.normal(keys[0], (n, dim))
  eps = jax.random.normal(keys[1], (n, dim))
  t = jnp.full((n,), t_index)
  x_t = process.q_sample(SCHEDULE, x0, t, eps)
  exact_eps = SCHEDULE.sqrt_one_minus_alphas_cumprod[t][:, None] * x_t
  terms = np.asarray(
    likelihood.vlb_terms(
      SCHEDULE,
      x0,
      x_t,
      t,
      exact_eps,
      prediction=Prediction.EPS,
      variance=Variance.LEARNED,
      variance_output=jnp.ones_like(x_t),
    ),
    np.float64,
  )
  beta, beta_tilde = BETAS[t_index], BETA_TILDE[t_index]
  coef1 = beta * np.sqrt(ABAR_PREV[t_index]) / (1 - ABAR[t_index])
  expected = (
    0.5
    * (np.log(beta / beta_tilde) - 1 + beta_tilde / beta + coef1**2 * (1 - ABAR[t_index]) / beta)
    / np.log(2)
  )
  standard_error = terms.std() / np.sqrt(n)
  assert abs(terms.mean() - expected) < 5 * standard_error + 1e-4 * expected, (
    terms.mean(),
    expected,
    standard_error,
  )


def test_prior_term_is_the_kl_of_q_x_T_to_the_standard_normal():
  x0 = jnp.asarray([[0.5, -1.0, 1.0, 0.0]], jnp.float32)
  a, variance = np.sqrt(ABAR[-1]), 1 - ABAR[-1]
  expected = np.mean(0.5 * (variance + (a * np.asarray(x0[0])) ** 2 - 1 - np.log(variance)))
  np.testing.assert_allclose(
    float(likelihood.prior_bpd(SCHEDULE, x0)[0]), expected / np.log(2), rtol=1e-3
  )


def test_learned_variance_interpolates_between_beta_tilde_and_beta():
  t = jnp.asarray([1, 500, 999])
  log_variance = lambda v: np.asarray(
    process.p_log_variance(SCHEDULE, t, Variance.LEARNED, 2, jnp.full((3, 1), v, jnp.float32))
  )[:, 0]
  np.testing.assert_allclose(np.exp(log_variance(-1.0)), BETA_TILDE[[1, 500, 999]], rtol=1e-5)
  np.testing.assert_allclose(np.exp(log_variance(1.0)), BETAS[[1, 500, 999]], rtol=1e-5)
  middle = 0.5 * (np.log(BETAS[[1, 500, 999]]) + np.log(BETA_TILDE[[1, 500, 999]]))
  np.testing.assert_allclose(log_variance(0.0), middle, rtol=1e-5)


def test_hybrid_loss_adds_lambda_T_vlb_and_trains_only_the_variance_through_it():
  """Improved DDPM eq. (16): the L_vlb part's gradient reaches the variance channels only."""
  keys = jax.random.split(jax.random.key(3), 3)
  x0 = jnp.round(jax.random.uniform(keys[0], (8, 4, 4, 1)) * 255) / 127.5 - 1
  eps = jax.random.normal(keys[1], x0.shape)
  t = jnp.asarray([0, 1, 2, 10, 100, 400, 700, 999])
  output = 0.3 * jax.random.normal(keys[2], x0.shape[:-1] + (2,))

  def losses(output, learn_sigma, vlb_weight=0.001):
    return training_losses(
      SCHEDULE, lambda x_t, t: output, x0, t, eps, learn_sigma=learn_sigma, vlb_weight=vlb_weight
    )

  simple = training_losses(SCHEDULE, lambda x_t, t: output[..., :1], x0, t, eps)
  x_t = process.q_sample(SCHEDULE, x0, t, eps)
  vlb = likelihood.vlb_terms(
    SCHEDULE,
    x0,
    x_t,
    t,
    output[..., :1],
    prediction=Prediction.EPS,
    variance=Variance.LEARNED,
    variance_output=output[..., 1:],
  )
  np.testing.assert_allclose(losses(output, True), simple + 0.001 * 1000 * vlb, rtol=1e-5)
  grad = jax.grad(lambda o: jnp.sum(losses(o, True)))(output)
  grad_simple = jax.grad(
    lambda o: jnp.sum(training_losses(SCHEDULE, lambda x_t, t: o, x0, t, eps))
  )(output[..., :1])
  np.testing.assert_allclose(grad[..., :1], grad_simple, rtol=1e-6)
  assert float(jnp.abs(grad[..., 1:]).min()) > 0  # every variance channel learns


def test_strata_cover_every_kl_term_once():
  edges = likelihood.strata(1000, 7)
  assert edges[0] == 1 and edges[-1] == 1000 and np.all(np.diff(edges) > 0)
  np.testing.assert_array_equal(likelihood.strata(1000, 0), np.arange(1, 1001))
  draws = likelihood.stratified_timesteps(edges, 500, np.random.default_rng(0))
  assert np.all((draws >= edges[:-1, None]) & (draws < edges[1:, None]))
  with pytest.raises(ValueError, match="num_terms must be in 0..999"):
    likelihood.strata(1000, 1000)
  config = runs.typed(tiny.get_config()).to_dict()
  config["diffusion"]["num_timesteps"], config["eval"]["bits_per_dim"] = 1000, True
  config["eval"]["bpd_timesteps"] = 1000
  with pytest.raises(ValueError, match="eval.bpd_timesteps must be in 0..999"):
    run_config.from_dict(config)


def test_bits_per_dim_sums_every_term_exactly_and_stratified_draws_are_unbiased():
  """With a stand-in `terms_fn` whose term at index t is known, all T terms give the exact
  sum, and K = 4 stratified terms per image give it within the reported standard error."""
  schedule = schedules.get_schedule("linear", 50)
  mesh = parallel.data_mesh()
  term = lambda t: 0.01 + 0.002 * (t % 7) + jnp.where(t == 0, 1.0, 0.0)
  terms_fn = jax.jit(lambda params, x0, y, t, key: term(t).astype(jnp.float32))
  images = np.full((256, 4, 4, 1), 128, np.uint8)
  source = data_sources.ArraySource(images)
  prior = float(likelihood.prior_bpd(schedule, jnp.asarray(image_io.to_model_range(images[:1])))[0])
  exact = 1.01 + float(np.sum(0.01 + 0.002 * (np.arange(1, 50) % 7))) + prior
  run = lambda k, n: evaluation_likelihood.bits_per_dim(
    terms_fn,
    None,
    schedule,
    source,
    mesh,
    batch_size=64,
    num_images=n,
    num_terms=k,
    seed=0,
    conditional=False,
  )
  results = run(0, 64)
  assert abs(results["bits_per_dim"] - exact) < 1e-5 and results["bpd_terms_per_image"] == 49
  estimate = run(4, 0)
  assert estimate["bpd_images"] == 256
  assert abs(estimate["bits_per_dim"] - exact) < 5 * estimate["bits_per_dim_se"]
  assert estimate["bits_per_dim_se"] > 0


def test_a_learned_variance_is_refused_for_a_model_without_one_before_training(tmp_path):
  from jax_ddpm.io import errors

  config = tiny.get_config()
  config.sampling.variance = "learned"
  with pytest.raises(
    errors.ConfigError,
    match="sampling.variance='learned' needs a model that learns it: set model.learn_sigma=True",
  ):
    runs.train(config, str(tmp_path))
  assert not list(tmp_path.iterdir())
  config.model.learn_sigma = True
  assert runs.build(config).unet.out_channels == 2 * config.data.channels
  config.training.vlb_weight = -1.0
  with pytest.raises(errors.ConfigError, match="training.vlb_weight must be >= 0"):
    runs.train(config, str(tmp_path))
