"""The sampler family: DPM-Solver++(2M) and its SDE form against exact solutions, thresholding,
the registry."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runs
from samplers_test import GAUSSIAN, SCHEDULE, assert_moments, gaussian_mixture_eps, nonlinear_eps

from jax_ddpm.config.sections import SamplingConfig
from jax_ddpm.samplers import base, registry
from jax_ddpm.samplers.ddim import DDIM
from jax_ddpm.samplers.ddpm import DDPM
from jax_ddpm.samplers.dpm_solver import DPMSolverPP2M, SDEDPMSolverPP2M
from jax_ddpm.samplers.karras import Euler, EulerAncestral, Heun
from jax_ddpm.samplers.unipc import UniPC

MU, S = np.array(GAUSSIAN["means"][0]), GAUSSIAN["stds"][0]


def exact_flow_then_denoise(x_T, first):
  """For data N(mu, s^2 I): E[x_0 | x(t=0)], where x(0) is the exact probability-flow ODE
  solution from x_T at index `first` (float64).

  The ODE keeps z = (x_t - a_t mu) / sqrt(c_t) fixed (a_t^2 = alpha-bar_t, c_t = a_t^2 s^2 +
  1 - a_t^2: every marginal is N(a_t mu, c_t I) and the flow is the affine map between them).
  The solvers' last step (to the data) returns the denoiser's x_0 at t = 0, hence the
  posterior mean on top.
  """
  alpha_bar = np.exp(np.asarray(SCHEDULE.log_alphas_cumprod, np.float64))
  a_T, a_0 = np.sqrt(alpha_bar[first]), np.sqrt(alpha_bar[0])
  c_T, c_0 = (a**2 * S**2 + 1 - a**2 for a in (a_T, a_0))
  z = (np.asarray(x_T, np.float64) - a_T * MU) / np.sqrt(c_T)
  x_0 = a_0 * MU + np.sqrt(c_0) * z
  return MU + a_0 * S**2 / c_0 * (x_0 - a_0 * MU)


def solver_errors(order, step_counts):
  x_T = jax.random.normal(jax.random.key(0), (512, 2))
  errors = []
  for steps in step_counts:
    out = base.run(
      DPMSolverPP2M(num_steps=steps, order=order),
      gaussian_mixture_eps(**GAUSSIAN),
      SCHEDULE,
      x_T.shape,
      jax.random.key(1),
      initial_noise=x_T,
      thresholding="none",
    )
    exact = exact_flow_then_denoise(x_T, base.timestep_indices(SCHEDULE, steps, "logsnr")[-1])
    errors.append(float(np.abs(np.asarray(out, np.float64) - exact).max()))
  return errors


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("thresholding", ["none", "static"])
def test_first_order_dpm_solver_is_ddim_with_eta_zero(prediction, thresholding):
  """Same timesteps, any prediction: equal up to float32 round-off (relative 1e-6; without
  thresholding this toy denoiser drives samples to ~100)."""
  shape, rng = (4, 3, 3, 2), jax.random.key(3)
  steps = dict(num_steps=20, spacing="uniform")
  options = dict(prediction=prediction, thresholding=thresholding, num_frames=20)
  dpm, dpm_path = base.run(
    DPMSolverPP2M(order=1, **steps), nonlinear_eps, SCHEDULE, shape, rng, **options
  )
  ddim, ddim_path = base.run(DDIM(eta=0.0, **steps), nonlinear_eps, SCHEDULE, shape, rng, **options)
  np.testing.assert_allclose(dpm, ddim, atol=2e-6, rtol=2e-6)
  np.testing.assert_allclose(dpm_path.x_t, ddim_path.x_t, atol=2e-6, rtol=2e-6)


def test_dpm_solver_error_falls_at_second_order_and_its_first_order_form_at_first():
  counts = (20, 40, 80)
  slopes = {}
  for order in (1, 2):
    errors = solver_errors(order, counts)
    slopes[order] = [np.log2(a / b) for a, b in zip(errors, errors[1:])]
  message = f"error slopes per doubling of {counts}: {slopes}"
  assert all(1.8 < slope < 2.3 for slope in slopes[2]), message
  assert all(0.9 < slope < 1.15 for slope in slopes[1]), message
  print(message)


def test_dpm_solver_at_20_steps_beats_ddim_at_50_on_the_exact_flow():
  x_T = jax.random.normal(jax.random.key(0), (512, 2))
  ddim = base.run(
    DDIM(num_steps=50, spacing="uniform"),
    gaussian_mixture_eps(**GAUSSIAN),
    SCHEDULE,
    x_T.shape,
    jax.random.key(1),
    initial_noise=x_T,
    thresholding="none",
  )
  ddim_error = np.abs(np.asarray(ddim, np.float64) - exact_flow_then_denoise(x_T, 980)).max()
  (dpm_error,) = solver_errors(2, (20,))
  assert dpm_error < ddim_error, (dpm_error, ddim_error)


@pytest.mark.parametrize("spacing", ["quadratic", "logsnr"])
def test_first_order_sde_dpm_solver_is_ddim_with_eta_one(spacing):
  """Same timesteps and noise: the SDE solver's first order is the DDPM posterior step."""
  shape, rng = (4, 3, 3, 2), jax.random.key(3)
  sde = base.run(
    SDEDPMSolverPP2M(num_steps=20, spacing=spacing, order=1), nonlinear_eps, SCHEDULE, shape, rng
  )
  ddim = base.run(DDIM(num_steps=20, eta=1.0, spacing=spacing), nonlinear_eps, SCHEDULE, shape, rng)
  np.testing.assert_allclose(sde, ddim, atol=2e-6, rtol=0)


def sde_solver_law(num_steps, spacing, order, mu, s):
  """Mean and variance of SDE-DPM-Solver++ output for 1-D data N(mu, s^2), float64.

  With the exact denoiser x_0-prediction = A x + B (A = a s^2 / c, B = (1 - a^2) mu / c), so
  the pair (x, previous x_0-prediction) evolves by an affine map plus Gaussian noise and stays
  jointly Gaussian: its mean and 2 x 2 covariance propagate exactly. Written from the update
  x' = (sigma' / sigma) e^{-h} x + alpha' (1 - e^{-2h}) D + sigma' sqrt(1 - e^{-2h}) z.
  """
  alpha_bar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  half_log_snr = lambda a2: 0.5 * np.log(a2 / (1 - a2)) if a2 < 1 else np.inf
  visited = base.timestep_indices(SCHEDULE, num_steps, spacing)[::-1]
  mean, cov, h_previous = np.zeros(2), np.diag([1.0, 0.0]), 0.0
  for i, (t, t_next) in enumerate(zip(visited, np.append(visited[1:], -1))):
    a2, a2_next = alpha_bar[t], 1.0 if t_next < 0 else alpha_bar[t_next]
    c = a2 * s**2 + 1 - a2
    A, B = np.sqrt(a2) * s**2 / c, (1 - a2) * mu / c
    h = half_log_snr(a2_next) - half_log_snr(a2)
    p = np.sqrt((1 - a2_next) / (1 - a2)) * np.exp(-h)
    q = np.sqrt(a2_next) * (1 - np.exp(-2 * h))
    k = 0.0 if order == 1 or i == 0 or t_next < 0 or h_previous == 0 else 0.5 * h / h_previous
    M = np.array([[p + q * (1 + k) * A, -q * k], [A, 0.0]])
    mean = M @ mean + np.array([q * (1 + k) * B, B])
    cov = M @ cov @ M.T + np.diag([(1 - a2_next) * (1 - np.exp(-2 * h)), 0.0])
    h_previous = h
  return mean[0], cov[0, 0]


def test_sde_dpm_solver_output_follows_its_exact_law_on_gaussian_data():
  samples = np.asarray(
    base.run(
      SDEDPMSolverPP2M(num_steps=20, spacing="logsnr"),
      gaussian_mixture_eps(**GAUSSIAN),
      SCHEDULE,
      (4000, 2),
      jax.random.key(0),
      thresholding="none",
    ),
    np.float64,
  )
  laws = [sde_solver_law(20, "logsnr", 2, MU[d], S) for d in range(2)]
  assert_moments(samples, np.array([m for m, _ in laws]), np.array([v for _, v in laws]))


def test_second_order_sde_solver_keeps_the_data_variance_that_ddim_eta_one_shrinks():
  """At the default's 50 quadratic steps the first order (DDIM eta = 1) draws Gaussian data
  with 0.87 of its variance, the second order with 1.02 of it."""
  first = sde_solver_law(50, "quadratic", 1, MU[0], S)[1] / S**2
  second = sde_solver_law(50, "quadratic", 2, MU[0], S)[1] / S**2
  assert abs(first - 0.873) < 1e-3 and abs(second - 1.020) < 1e-3, (first, second)


@pytest.mark.parametrize("name", ["dpmpp_2m", "sde_dpmpp_2m"])
def test_dpm_solvers_step_over_the_repeated_timesteps_of_quadratic_spacing(name):
  """At S = 100 quadratic spacing visits t = 0 four times; a step after one that did not move
  (h = 0) is first order instead of dividing by that h."""
  assert np.sum(base.timestep_indices(SCHEDULE, 100, "quadratic") == 0) == 4
  sampler = registry.REGISTRY[name](num_steps=100, spacing="quadratic")
  out = base.run(sampler, nonlinear_eps, SCHEDULE, (4, 3, 3, 2), jax.random.key(3))
  assert np.all(np.isfinite(out))


def reference_dynamic_threshold(x0, percentile):
  flat = np.abs(x0.reshape(len(x0), -1)).astype(np.float64)
  s = np.maximum(np.quantile(flat, percentile, axis=1), 1.0).reshape(-1, 1, 1, 1)
  return np.clip(x0, -s, s) / s


@pytest.mark.parametrize("percentile", [0.9, 0.995, 1.0])
def test_dynamic_thresholding_matches_a_numpy_reference(percentile):
  scales = np.array([0.2, 1.0, 3.0], np.float32).reshape(-1, 1, 1, 1)  # below, at, above 1
  x0 = np.asarray(jax.random.normal(jax.random.key(4), (3, 8, 8, 2))) * scales
  ours = np.asarray(base.threshold_x0(jnp.asarray(x0), "dynamic", percentile))
  np.testing.assert_allclose(ours, reference_dynamic_threshold(x0, percentile), atol=1e-6)
  np.testing.assert_array_equal(ours[0], x0[0])  # |x0| < 1: left alone
  np.testing.assert_array_equal(base.threshold_x0(jnp.asarray(x0), "static"), np.clip(x0, -1, 1))


def overshooting_x0(x_t, t):
  """An x_0-predicting denoiser whose predictions leave [-1, 1]."""
  return 2.5 * jnp.tanh(x_t)


@pytest.mark.parametrize("name", sorted(registry.REGISTRY))
def test_every_sampler_thresholds_its_x0_predictions(name):
  sampler = registry.REGISTRY[name]()
  schedule = SCHEDULE
  shape, rng = (4, 4, 4, 1), jax.random.key(5)
  finals = {}
  for thresholding in ("none", "static", "dynamic"):
    finals[thresholding], path = base.run(
      sampler,
      overshooting_x0,
      schedule,
      shape,
      rng,
      prediction="x0",
      thresholding=thresholding,
      threshold_percentile=0.9,
      num_frames=3,
    )
    if thresholding != "none":
      assert np.abs(np.asarray(path.x0)).max() <= 1.0 + 1e-6, thresholding
  assert np.abs(finals["none"]).max() > 1.0
  assert np.abs(finals["static"]).max() <= 1.0 + 1e-6
  assert np.abs(finals["dynamic"]).max() <= 1.0 + 1e-6
  assert not np.allclose(finals["static"], finals["dynamic"])


def test_the_registry_builds_each_sampler_from_its_config_keys():
  sampling = SamplingConfig(
    sampler="dpmpp_2m", num_steps=12, eta=0.5, spacing="logsnr", variance="fixed_small"
  )
  from_config = lambda s: registry.sampler_class(s.sampler, "sampling.sampler").from_config(s)
  assert from_config(sampling) == DPMSolverPP2M(num_steps=12, spacing="logsnr")
  sampling = dataclasses.replace(sampling, sampler="ddim")
  assert from_config(sampling) == DDIM(num_steps=12, eta=0.5, spacing="logsnr")
  sampling = dataclasses.replace(sampling, sampler="ddpm")
  assert from_config(sampling) == DDPM(variance="fixed_small")
  sampling = dataclasses.replace(sampling, sampler="unipc")
  assert from_config(sampling) == UniPC(num_steps=12, spacing="logsnr")
  churn = dict(rho=5.0, sigma_to_t="nearest", s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  sampling = dataclasses.replace(sampling, sampler="heun", **churn)
  assert from_config(sampling) == Heun(num_steps=12, **churn)
  sampling = dataclasses.replace(sampling, sampler="euler")
  assert from_config(sampling) == Euler(num_steps=12, **churn)
  sampling = dataclasses.replace(sampling, sampler="euler_ancestral")
  assert from_config(sampling) == EulerAncestral(num_steps=12, rho=5.0, sigma_to_t="nearest")
  sampling = dataclasses.replace(sampling, sampler="lms")
  with pytest.raises(
    ValueError,
    match=r"Unknown sampling.sampler 'lms'; allowed values: "
    r"\['ddpm', 'ddim', 'dpmpp_2m', 'sde_dpmpp_2m', 'unipc', 'euler', 'heun', "
    r"'euler_ancestral'\]",
  ):
    from_config(sampling)
  with pytest.raises(ValueError, match=r"order must be 1 or 2"):
    DPMSolverPP2M(order=3)


def test_every_option_that_changes_the_images_shows_in_the_samplers_tags():
  """Sample directories and eval results are named by these: two settings must not collide."""
  assert DDIM().tags == () and DDPM().tags == ()
  assert DDIM(eta=1.0).tags == ("eta1",)
  assert DDIM(eta=0.5, spacing="quadratic", learned_variance=True).tags == (
    "eta0.5",
    "quadratic",
    "learned",
  )
  assert DDIM(learned_variance=True).tags == ()  # eta 0 draws no noise to scale
  assert DDPM(variance="fixed_small").tags == ("fixed_small",)
  assert DPMSolverPP2M(spacing="logsnr", order=1).tags == ("logsnr", "order1")
  assert UniPC().tags == ("logsnr",) and Heun().tags == () and EulerAncestral().tags == ()
  assert UniPC(order=3, corrector=False, variant="bh1", spacing="uniform").tags == (
    "order3",
    "nocorrector",
    "bh1",
  )
  assert Heun(rho=5, sigma_to_t="nearest").tags == ("rho5", "nearest")
  assert Euler(s_churn=40, s_tmax=50).tags == ("churn40", "tmax50")
  assert Euler(s_tmax=50).tags == ()  # S_tmax bounds a churn of 0: no noise, no change
  assert EulerAncestral(eta=0.5).tags == ("eta0.5",)


def test_a_spacing_that_starts_short_of_the_schedules_noise_is_refused_before_sampling():
  """Every sampler starts from x_T ~ N(0, I); quadratic spacing stops at t = 0.8 T, where the
  cosine schedule still keeps 0.31 of the data (the README's cosine row drew 199.5 there)."""
  from configs import mnist
  from jax_ddpm.diffusion import schedules
  from jax_ddpm.io import errors

  cosine = schedules.get_schedule("cosine", 1000)
  quadratic = DDIM(num_steps=50, eta=1.0, spacing="quadratic")
  with pytest.raises(ValueError, match=r"first timestep t = 800 keeps sqrt\(alpha-bar_t\) = 0\.3"):
    base.run(quadratic, lambda x, t: x, cosine, (2, 4, 4, 1), jax.random.key(0))
  base.check_start(SCHEDULE, quadratic.timesteps(SCHEDULE))  # linear: 0.039 at t = 800
  base.check_start(cosine, DDIM(spacing="uniform").timesteps(cosine))  # t = 980
  # A schedule that never reaches noise is its own choice (the tests' tiny config: T = 100).
  base.check_start(
    schedules.get_schedule("linear", 100),
    quadratic.timesteps(schedules.get_schedule("linear", 100)),
  )
  config = mnist.get_config()
  config.training.max_timestep = None  # uniform spacing starts at t = 980
  config.diffusion.schedule = "cosine"
  with pytest.raises(
    errors.ConfigError,
    match="sampling.spacing='quadratic' under "
    "diffusion.schedule='cosine': the sampler's first timestep t = 800",
  ):
    runs.build(config)
  config.sampling.spacing = "uniform"
  runs.build(config)


def test_a_learned_variance_is_refused_for_a_sampler_that_adds_noise_without_it():
  from configs import mnist
  from jax_ddpm.io import errors

  config = mnist.get_config()
  config.training.max_timestep = None  # ddpm visits every t
  config.model.learn_sigma = True
  config.sampling.variance = "learned"
  with pytest.raises(
    errors.ConfigError,
    match="sampling.variance='learned': sampling.sampler="
    "'sde_dpmpp_2m' adds its own noise and does not read the network's variance",
  ):
    runs.build(config)
  for sampler, eta in (("ddim", 1.0), ("ddim", 0.0), ("ddpm", 0.0), ("dpmpp_2m", 0.0)):
    config.sampling.sampler, config.sampling.eta = sampler, eta
    runs.build(config)
