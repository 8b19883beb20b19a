"""Karras et al.'s samplers (Euler, Heun, Algorithm 2's churn, Euler ancestral) against Gaussian
data, whose probability-flow ODE and denoiser are known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import runs
from sampler_family_test import MU, S
from samplers_test import SCHEDULE, assert_moments

from jax_ddpm.io.errors import ConfigError
from jax_ddpm.samplers import base, karras
from jax_ddpm.samplers.karras import Euler, EulerAncestral, Heun

SIGMAS = karras.trained_sigmas(SCHEDULE)  # sigma of t = 0..999, 0.01 to 157
LOG_SIGMAS = jnp.asarray(np.log(SIGMAS), jnp.float32)


def gaussian_eps(prediction="eps"):
  """The exact network for data N(MU, S^2 I) at fractional t: sigma(t) linear in log sigma
  between the trained timesteps (the samplers' own rule), a^2 = alpha-bar = 1 / (1 + sigma^2);
  E[eps | x_t] = sqrt(1 - a^2) (x_t - a mu) / c with c = a^2 s^2 + 1 - a^2, or the x_0 or v
  consistent with it."""

  def denoise(x_t, t):
    grid = jnp.arange(LOG_SIGMAS.size, dtype=jnp.float32)
    sigma = jnp.exp(jnp.interp(t.astype(jnp.float32), grid, LOG_SIGMAS))[:, None]
    a = jax.lax.rsqrt(1.0 + sigma**2)
    b = sigma * a  # sqrt(1 - alpha-bar)
    eps = b * (x_t - a * MU) / (a**2 * S**2 + b**2)
    x0 = (x_t - b * eps) / a
    return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction]

  return denoise


def exact_flow_then_denoise(x_T, sigma_top, sigma_bottom):
  """E[x_0 | x(sigma_bottom)] where x(sigma) solves the probability-flow ODE from the VP sample
  x_T at sigma_top (float64): z = (x_t - a mu) / sqrt(c) stays fixed along the flow (every
  marginal is N(a mu, c I)), then the posterior mean, which the last step to sigma = 0 returns."""
  a_top, a_bottom = (1.0 / np.sqrt(1.0 + s**2) for s in (sigma_top, sigma_bottom))
  c_top, c_bottom = (a**2 * S**2 + 1 - a**2 for a in (a_top, a_bottom))
  z = (np.asarray(x_T, np.float64) - a_top * MU) / np.sqrt(c_top)
  x_bottom = a_bottom * MU + np.sqrt(c_bottom) * z
  return MU + a_bottom * S**2 / c_bottom * (x_bottom - a_bottom * MU)


def sample(sampler, x_T, prediction="eps", rng=1):
  return np.asarray(
    base.run(
      sampler,
      gaussian_eps(prediction),
      SCHEDULE,
      x_T.shape,
      jax.random.key(rng),
      initial_noise=x_T,
      thresholding="none",
      prediction=prediction,
    ),
    np.float64,
  )


X_T = jax.random.normal(jax.random.key(0), (512, 2))


def flow_errors(make, counts):
  exact = exact_flow_then_denoise(X_T, SIGMAS[-1], SIGMAS[0])
  errors = [float(np.abs(sample(make(n), X_T) - exact).max()) for n in counts]
  return errors, [float(np.log2(a / b)) for a, b in zip(errors, errors[1:])]


def test_euler_error_falls_at_first_order_and_heun_at_second():
  counts = (10, 20, 40, 80)
  euler, euler_slopes = flow_errors(lambda n: Euler(num_steps=n), counts)
  heun, heun_slopes = flow_errors(lambda n: Heun(num_steps=n), counts)
  message = (
    f"steps {counts}: euler errors {euler} (slopes {euler_slopes}); heun errors {heun} "
    f"(slopes {heun_slopes})"
  )
  print(message)
  assert all(0.85 < slope < 1.15 for slope in euler_slopes), message
  assert all(1.9 < slope < 2.5 for slope in heun_slopes), message
  assert heun[-1] < 0.1 * euler[-1], message


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_an_x0_or_v_network_draws_what_the_eps_network_does(prediction):
  """x_0 and eps are read at each call's own sigma (`base.read_x0_and_eps`) for every
  parameterisation: the same denoiser written three ways gives the same samples."""
  heun = Heun(num_steps=8)
  np.testing.assert_allclose(sample(heun, X_T, prediction), sample(heun, X_T), atol=2e-5)


def test_the_grid_is_eq_5_between_the_trained_sigmas_and_its_timesteps_interpolate_log_sigma():
  grid = karras.karras_grid(0.002, 80.0, 3, 7.0)
  middle = ((80.0 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
  np.testing.assert_allclose(grid, [80.0, middle, 0.002, 0.0], rtol=1e-12)
  np.testing.assert_allclose(karras.karras_grid(1.0, 3.0, 3, 1.0), [3.0, 2.0, 1.0, 0.0])
  # A trained sigma maps to its own timestep; one halfway in log sigma to the middle.
  t, sigma = karras.sigma_to_t(SIGMAS, SIGMAS[[0, 5, 999]], karras.SigmaToT.INTERPOLATE)
  np.testing.assert_allclose(t, [0, 5, 999], atol=1e-9)
  halfway = np.sqrt(SIGMAS[5] * SIGMAS[6])
  assert karras.sigma_to_t(SIGMAS, halfway, karras.SigmaToT.INTERPOLATE)[0] == pytest.approx(5.5)
  t, sigma = karras.sigma_to_t(SIGMAS, np.array([halfway * 1.01]), karras.SigmaToT.NEAREST)
  assert t[0] == 6 and sigma[0] == SIGMAS[6]
  plan = Heun(num_steps=10).plan(SCHEDULE)
  assert plan.sigma[0] == pytest.approx(SIGMAS[-1]) and plan.t[0] == pytest.approx(999)
  assert plan.sigma[-1] == pytest.approx(SIGMAS[0]) and plan.t[-1] == pytest.approx(0, abs=1e-9)
  nearest = Heun(num_steps=10, sigma_to_t="nearest").plan(SCHEDULE)
  assert all(float(t).is_integer() for t in nearest.t)
  assert set(np.round(nearest.sigma, 12)) <= set(np.round(SIGMAS, 12))


def test_heun_calls_the_network_twice_a_step_but_the_last():
  for n in (1, 2, 10):
    plan = Heun(num_steps=n).plan(SCHEDULE)
    assert len(plan.t) == 2 * n - 1
    assert list(plan.t) == sorted(plan.t, reverse=True)
    assert [row[karras.PHASE] for row in plan.aux] == [0] + [1, 0] * (n - 1)
  assert len(Euler(num_steps=10).timesteps(SCHEDULE)) == 10
  assert len(EulerAncestral(num_steps=10).timesteps(SCHEDULE)) == 10


def test_a_run_trained_on_fewer_timesteps_starts_the_grid_at_its_largest():
  from configs import mnist

  config = mnist.get_config()  # trained on t <= 800
  config.sampling.sampler = "heun"
  config.sampling.num_steps = 5
  run = runs.build(config)
  plan = run.sampler.plan(run.schedule)
  assert run.sampler.t_max == 800 and plan.t[0] == pytest.approx(800)
  assert max(plan.sigma) == pytest.approx(karras.trained_sigmas(run.schedule)[800])


def test_bad_karras_options_are_refused_by_name():
  with pytest.raises(ConfigError, match=r"rho must be > 0"):
    Heun(rho=0)
  with pytest.raises(ConfigError, match=r"s_tmin=2 must be <= s_tmax=1"):
    Euler(s_churn=1, s_tmin=2, s_tmax=1)
  with pytest.raises(ConfigError, match=r"sampling.s_churn must be a number >= 0, got -1"):
    karras.check_churn(-1, 0, 1, 1, "sampling.")
  with pytest.raises(ValueError, match=r"Unknown sigma_to_t 'round'"):
    Euler(sigma_to_t="round")
  with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
    EulerAncestral(eta=2.0)


def churned_grid(n, s_churn, s_tmin, s_tmax):
  """EDM Algorithm 2, lines 3-4, written from the paper: gamma_i = min(S_churn / N, sqrt(2) - 1)
  where S_tmin <= sigma_i <= S_tmax, sigma^_i = (1 + gamma_i) sigma_i, here at most sigma_0."""
  grid = karras.karras_grid(SIGMAS[0], SIGMAS[-1], n, 7.0)
  gamma = min(s_churn / n, np.sqrt(2) - 1)
  raised = [min(s * (1 + gamma), grid[0]) if s_tmin <= s <= s_tmax and s > 0 else s for s in grid]
  return grid, np.asarray(raised)


def output_law(kind, n, s_churn=0.0, s_tmin=0.0, s_tmax=np.inf, eta=1.0):
  """Mean and variance of a sampler's output for data N(MU, S^2) (float64 recursion from EDM
  Algorithms 1-2 and the ancestral split): in y = x - mu, with x the VE variable, the exact
  denoiser makes each slope (x - D) / sigma = k y with k = sigma / (s^2 + sigma^2), so each
  step multiplies y by a number and the noise adds variance."""
  grid, raised = churned_grid(n, s_churn, s_tmin, s_tmax)
  k = lambda sigma: sigma / (S**2 + sigma**2)
  mean, var = -MU, np.full_like(MU, 1.0 + raised[0] ** 2)  # x_T ~ N(0, I) at sigma^_0
  for i in range(n):
    hat, following = raised[i], grid[i + 1]
    if kind == "euler_ancestral":
      up = min(following, eta * np.sqrt(following**2 * (hat**2 - following**2) / hat**2))
      down = np.sqrt(following**2 - up**2)
      factor, added = 1 + (down - hat) * k(hat), up**2
    else:
      euler = 1 + (following - hat) * k(hat)
      factor = euler
      if kind == "heun" and following > 0:
        factor = 1 + (following - hat) * (k(hat) + k(following) * euler) / 2
      added = raised[i + 1] ** 2 - following**2
    mean, var = factor * mean, factor**2 * var + added
  return MU + mean, var


STOCHASTIC = {
  "heun_churn": (
    Heun(num_steps=8, s_churn=10.0, s_tmin=0.05, s_tmax=30.0),
    ("heun", 8, 10.0, 0.05, 30.0),
  ),
  "euler_churn": (Euler(num_steps=12, s_churn=20.0), ("euler", 12, 20.0)),
  "euler_ancestral": (EulerAncestral(num_steps=12), ("euler_ancestral", 12)),
  "euler_ancestral_eta_half": (EulerAncestral(num_steps=12, eta=0.5), ("euler_ancestral", 12)),
}


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_a_stochastic_sampler_draws_the_law_of_its_algorithm(name):
  """20000 samples' mean and variance against the float64 recursion of the same steps (the
  step counts are small, so that the law differs from the data's: a wrong noise level or
  slope moves the variance by more than the 5 standard errors allowed)."""
  sampler, law = STOCHASTIC[name]
  kwargs = dict(eta=0.5) if name.endswith("eta_half") else {}
  mean, var = output_law(*law, **kwargs)
  x_T = jax.random.normal(jax.random.key(2), (20000, 2))
  assert_moments(sample(sampler, x_T, rng=3), mean, var)


def test_churn_outside_its_window_and_eta_zero_leave_the_deterministic_samplers():
  out = sample(Euler(num_steps=6), X_T)
  np.testing.assert_array_equal(sample(Euler(num_steps=6, s_churn=5.0, s_tmin=500.0), X_T), out)
  np.testing.assert_allclose(sample(EulerAncestral(num_steps=6, eta=0.0), X_T), out, atol=1e-6)


def test_ancestral_and_churned_laws_converge_at_the_order_of_their_steps():
  """The output variance of the recursion (which the test above ties to the samplers) against
  its 10240-step limit: first order for Euler steps with either noise, second for Heun's with
  churn (printed: the weak order)."""
  cases = (("euler_ancestral", {}, 1.0), ("euler", dict(s_churn=20.0), 1.0))
  for kind, churn, order in (*cases, ("heun", dict(s_churn=20.0), 2.0)):
    limit = output_law(kind, 10240, **churn)[1]
    counts = (80, 160, 320)
    errors = [float(np.abs(output_law(kind, n, **churn)[1] - limit).max()) for n in counts]
    slopes = [float(np.log2(a / b)) for a, b in zip(errors, errors[1:])]
    print(f"{kind} {churn}: variance errors at {counts} steps {errors}, slopes {slopes}")
    assert all(abs(slope - order) < 0.15 for slope in slopes), (kind, errors, slopes)


def test_euler_on_trained_sigmas_is_ddim_on_their_timesteps():
  """DDIM (eta = 0) is Euler's method on the same ODE in x / sqrt(alpha-bar) (Karras et al.
  2022, Sec. 3): x' = x_0 + sigma' (x - x_0) / sigma either way. On the nearest-sigma grid the
  two visit the same timesteps and agree to float32 round-off, whatever the denoiser."""
  import dataclasses

  from samplers_test import nonlinear_eps

  from jax_ddpm.samplers.ddim import DDIM

  euler = Euler(num_steps=12, sigma_to_t="nearest")
  visited = tuple(int(t) for t in euler.timesteps(SCHEDULE))

  @dataclasses.dataclass(frozen=True)
  class Visiting(DDIM):
    visit: tuple = ()

    def timesteps(self, schedule):
      return np.asarray(self.visit, np.int32)

  shape, rng = (4, 3, 3, 2), jax.random.key(3)
  options = dict(thresholding="none")
  ddim = base.run(Visiting(visit=visited), nonlinear_eps, SCHEDULE, shape, rng, **options)
  ours = base.run(euler, nonlinear_eps, SCHEDULE, shape, rng, **options)
  np.testing.assert_allclose(ours, ddim, rtol=2e-5, atol=2e-5)
