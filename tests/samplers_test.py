"""Samplers against distributions whose optimal denoiser is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ddpm.diffusion import schedules
from jax_ddpm.diffusion.process import Prediction
from jax_ddpm.samplers import base
from jax_ddpm.samplers.ddim import DDIM
from jax_ddpm.samplers.ddpm import DDPM
from jax_ddpm.samplers.dpm_solver import DPMSolverPP2M

SCHEDULE = schedules.get_schedule("linear", 1000)
NUM_SAMPLES = 4000
# Every statistical check allows this many standard errors of the estimate.
Z = 5.0


def gaussian_mixture_eps(means, stds, weights):
  """Exact E[eps | x_t] for data ~ sum_k w_k N(mu_k, s_k^2 I).

  Given component k, x_t ~ N(a mu_k, c_k I) with a = sqrt(alpha-bar_t), c_k = a^2 s_k^2 + 1 - a^2,
  and Cov(eps, x_t) = sqrt(1 - alpha-bar_t) I, so E[eps | x_t, k] = sqrt(1 - a^2)(x_t - a mu_k)/c_k;
  the components are weighted by their posterior probabilities given x_t.
  """
  means, stds, weights = (jnp.asarray(v, jnp.float32) for v in (means, stds, weights))

  def denoise(x_t, t):
    a = SCHEDULE.sqrt_alphas_cumprod[t][:, None, None]  # [B, 1, 1]
    c = a**2 * stds[None, :, None] ** 2 + 1 - a**2  # [B, K, 1]
    diff = x_t[:, None, :] - a * means[None]  # [B, K, D]
    dim = x_t.shape[-1]
    log_p = jnp.log(weights)[None] - 0.5 * jnp.sum(diff**2 / c, -1) - 0.5 * dim * jnp.log(c[..., 0])
    responsibility = jax.nn.softmax(log_p, axis=-1)[..., None]
    return jnp.sum(responsibility * jnp.sqrt(1 - a**2) * diff / c, axis=1)

  return denoise


GAUSSIAN = dict(means=[[0.3, -0.2]], stds=[0.4], weights=[1.0])
MIXTURE = dict(
  means=[[-0.6, -0.5], [0.6, -0.3], [0.0, 0.6]], stds=[0.1, 0.1, 0.1], weights=[0.5, 0.3, 0.2]
)

# name -> (sampler kind, keyword arguments); all without clipping, so that each step is linear.
SAMPLERS = {
  "ddpm_1000": ("ddpm", dict(variance="fixed_small")),
  "ddpm_1000_fixed_large": ("ddpm", dict(variance="fixed_large")),
  "ddim_50_eta0": ("ddim", dict(num_steps=50, eta=0.0)),
  "ddim_50_eta1": ("ddim", dict(num_steps=50, eta=1.0)),
  "ddim_50_quadratic_eta0": ("ddim", dict(num_steps=50, eta=0.0, spacing="quadratic")),
}
SAMPLER_CLASSES = {"ddpm": DDPM, "ddim": DDIM, "dpmpp_2m": DPMSolverPP2M}


def run_sampler(name, denoise, rng):
  kind, kwargs = dict(SAMPLERS, dpmpp_2m_20=("dpmpp_2m", dict(num_steps=20)))[name]
  return np.asarray(
    base.run(
      SAMPLER_CLASSES[kind](**kwargs), denoise, SCHEDULE, (NUM_SAMPLES, 2), rng, thresholding="none"
    ),
    np.float64,
  )


def exact_output_law(name, mu, s):
  """Mean and variance of a sampler's output for data ~ N(mu, s^2), by a float64 recursion.

  With the exact denoiser every step is affine in x_t plus Gaussian noise: x_0-prediction
  A x + B with A = a s^2/c, B = (1 - a^2) mu/c; eps-prediction C x + D with C = sqrt(1 - a^2)/c,
  D = -sqrt(1 - a^2) a mu/c (a^2 = alpha-bar_t, c = a^2 s^2 + 1 - a^2). So a Gaussian stays
  Gaussian and its two moments propagate exactly. Written from DDPM eq. (6)-(7) and DDIM
  eq. (12), (16), independently of the library.
  """
  kind, kwargs = SAMPLERS[name]
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  if kind == "ddpm":
    steps = [(t, t - 1) for t in range(999, -1, -1)]
  else:
    visited = base.timestep_indices(SCHEDULE, kwargs["num_steps"], kwargs.get("spacing", "uniform"))
    steps = list(zip(visited[::-1], np.append(-1, visited[:-1])[::-1]))
  mean, var = 0.0, 1.0  # x_T ~ N(0, I)
  for t, t_prev in steps:
    a2 = abar[t]
    c = a2 * s**2 + 1 - a2
    A, B = np.sqrt(a2) * s**2 / c, (1 - a2) * mu / c
    C, D = np.sqrt(1 - a2) / c, -np.sqrt(1 - a2) * np.sqrt(a2) * mu / c
    if kind == "ddpm":
      posterior_var = betas[t] * (1 - abar_prev[t]) / (1 - a2)
      coef1 = betas[t] * np.sqrt(abar_prev[t]) / (1 - a2)
      coef2 = (1 - abar_prev[t]) * np.sqrt(1 - betas[t]) / (1 - a2)
      slope, offset = coef1 * A + coef2, coef1 * B
      if t == 0:
        added = 0.0
      elif kwargs["variance"] == "fixed_small":
        added = posterior_var
      else:
        added = betas[t]
    else:
      ap2 = 1.0 if t_prev < 0 else abar[t_prev]
      added = kwargs["eta"] ** 2 * (1 - ap2) / (1 - a2) * (1 - a2 / ap2)
      direction = np.sqrt(1 - ap2 - added)
      slope = np.sqrt(ap2) * A + direction * C
      offset = np.sqrt(ap2) * B + direction * D
    mean, var = slope * mean + offset, slope**2 * var + added
  return mean, var


def assert_moments(samples, mean, var):
  """Sample mean and variance within Z standard errors of (mean, var), per dimension."""
  n = len(samples)
  assert np.all(np.abs(samples.mean(0) - mean) < Z * np.sqrt(var / n)), (samples.mean(0), mean)
  assert np.all(np.abs(samples.var(0) - var) < Z * var * np.sqrt(2 / (n - 1))), (
    samples.var(0),
    var,
  )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_output_follows_its_exact_law_on_gaussian_data(name):
  """Pins every coefficient: the law is exact, so only sampling error remains."""
  samples = run_sampler(name, gaussian_mixture_eps(**GAUSSIAN), jax.random.key(0))
  mu, s = np.array(GAUSSIAN["means"][0]), GAUSSIAN["stds"][0]
  laws = [exact_output_law(name, mu[d], s) for d in range(2)]
  assert_moments(samples, np.array([m for m, _ in laws]), np.array([v for _, v in laws]))


def test_ddpm_recovers_the_gaussian_data_distribution():
  samples = run_sampler("ddpm_1000", gaussian_mixture_eps(**GAUSSIAN), jax.random.key(1))
  assert_moments(samples, np.array(GAUSSIAN["means"][0]), GAUSSIAN["stds"][0] ** 2)


def test_few_step_ddim_shrinks_the_variance_as_its_exact_law_predicts():
  """DDIM-50 is not exact: for s = 0.4 its output variance is 0.87 s^2 (uniform spacing) and
  0.94 s^2 (quadratic), while DDPM-1000 keeps 0.98 s^2. The shrinkage is the method's, not a bug;
  the test above shows the implementation follows it exactly."""
  mu, s = 0.3, GAUSSIAN["stds"][0]
  for name, expected_ratio in (
    ("ddim_50_eta0", 0.873),
    ("ddim_50_quadratic_eta0", 0.939),
    ("ddpm_1000", 0.981),
  ):
    mean, var = exact_output_law(name, mu, s)
    assert abs(var / s**2 - expected_ratio) < 1e-3, name
    assert abs(mean - mu) < 0.02 * mu, name


@pytest.mark.parametrize("name", ["ddpm_1000", "ddim_50_eta0", "ddim_50_eta1", "dpmpp_2m_20"])
def test_sampler_recovers_mixture_weights_and_component_means(name):
  samples = run_sampler(name, gaussian_mixture_eps(**MIXTURE), jax.random.key(2))
  means = np.array(MIXTURE["means"])
  component = np.argmin(((samples[:, None] - means[None]) ** 2).sum(-1), axis=1)
  for k, (weight, std) in enumerate(zip(MIXTURE["weights"], MIXTURE["stds"])):
    fraction = np.mean(component == k)
    assert abs(fraction - weight) < Z * np.sqrt(weight * (1 - weight) / NUM_SAMPLES), (k, fraction)
    members = samples[component == k]
    # Component variances shrink with every sampler here (narrow components, fixed variances),
    # as on the Gaussian above; the exact-law test pins the variances.
    assert np.all(np.abs(members.mean(0) - means[k]) < Z * std / np.sqrt(len(members)))


def nonlinear_eps(x_t, t):
  return 0.8 * jnp.tanh(x_t) + 1e-4 * t[:, None, None, None].astype(jnp.float32)


@pytest.mark.parametrize("thresholding", ["none", "static", "dynamic"])
def test_ddim_step_with_eta_one_equals_the_ddpm_step_at_every_t(thresholding):
  """Same x_t, output and noise at each of the T steps: the two formulas agree within 1e-5."""
  keys = jax.random.split(jax.random.key(2), 3)
  t = jnp.arange(1000, dtype=jnp.int32)
  x_t = jax.random.normal(keys[0], (1000, 4, 4, 2))
  output = jax.random.normal(keys[1], x_t.shape)
  noise = jax.random.normal(keys[2], x_t.shape)
  # The scan thresholds x_0 and recomputes eps once for every sampler (base.denoised).
  x0, eps = base.denoised(
    SCHEDULE,
    x_t,
    t,
    output,
    prediction=Prediction.EPS,
    thresholding=base.Thresholding(thresholding),
    percentile=0.995,
  )
  step, denoised = base.Step(t, t - 1, 0), base.Denoised(x0, eps)
  ddpm_prev, _ = DDPM(variance="fixed_small").step(SCHEDULE, x_t, denoised, step, noise, ())
  ddim_prev, _ = DDIM(num_steps=1000, eta=1.0).step(SCHEDULE, x_t, denoised, step, noise, ())
  np.testing.assert_allclose(ddim_prev, ddpm_prev, atol=1e-5, rtol=0)


def test_ddim_with_all_steps_and_eta_one_follows_the_ddpm_trajectory():
  shape, rng = (4, 3, 3, 2), jax.random.key(2)
  _, ddpm = base.run(
    DDPM(variance="fixed_small"), nonlinear_eps, SCHEDULE, shape, rng, num_frames=1000
  )
  _, ddim = base.run(
    DDIM(num_steps=1000, eta=1.0), nonlinear_eps, SCHEDULE, shape, rng, num_frames=1000
  )
  np.testing.assert_array_equal(ddpm.timesteps, np.arange(999, -1, -1))
  np.testing.assert_array_equal(ddpm.timesteps, ddim.timesteps)
  # Every intermediate state; float32 rounding of the two formulas adds up over 1000 steps
  # (measured 2.7e-5), so the whole run gets a looser bound than one step. The predicted x_0
  # is x_t / sqrt(alpha-bar_t) minus a term, which magnifies that difference by up to 160.
  np.testing.assert_allclose(ddim.x_t, ddpm.x_t, atol=1e-4, rtol=0)
  magnification = np.asarray(SCHEDULE.sqrt_recip_alphas_cumprod)[ddpm.timesteps]
  x0_error = np.abs(np.asarray(ddim.x0) - np.asarray(ddpm.x0)).reshape(1000, -1).max(axis=1)
  assert np.all(x0_error <= 1e-4 * magnification), (x0_error / magnification).max()


def with_variance_channels(v):
  """nonlinear_eps with a learned-variance network's second half set to the raw value v."""
  return lambda x_t, t: jnp.concatenate([nonlinear_eps(x_t, t), jnp.full_like(x_t, v)], -1)


@pytest.mark.parametrize("v, fixed", [(-1.0, "fixed_small"), (1.0, "fixed_large")])
def test_learned_variance_at_its_ends_samples_as_the_fixed_variance(v, fixed):
  """Improved DDPM eq. (15): v = 0 (raw -1) is beta~_t, v = 1 (raw +1) is beta_t."""
  shape, rng = (3, 4, 4, 1), jax.random.key(8)
  learned = base.run(
    DDPM(variance="learned"), with_variance_channels(v), SCHEDULE, shape, rng, learn_sigma=True
  )
  fixed = base.run(DDPM(variance=fixed), nonlinear_eps, SCHEDULE, shape, rng)
  np.testing.assert_allclose(learned, fixed, atol=2e-5, rtol=0)


def test_learned_variance_leaves_quadratic_spacings_repeated_timesteps_in_place():
  """Quadratic spacing repeats its first indices (0, 0, 1, ...): a step from t to t has beta = 0
  and must keep x_t for a learned variance too (it once drew infinite noise there)."""
  indices = base.timestep_indices(SCHEDULE, 50, "quadratic")
  assert len(np.unique(indices)) < len(indices)
  shape, rng = (3, 4, 4, 1), jax.random.key(10)
  for v in (-1.0, 0.5, 1.0):
    x = base.run(
      DDIM(num_steps=50, eta=1.0, spacing="quadratic", learned_variance=True),
      with_variance_channels(v),
      SCHEDULE,
      shape,
      rng,
      learn_sigma=True,
    )
    assert np.all(np.isfinite(np.asarray(x))), v
  eq_16 = base.run(
    DDIM(num_steps=50, eta=1.0, spacing="quadratic"), nonlinear_eps, SCHEDULE, shape, rng
  )
  np.testing.assert_allclose(
    base.run(
      DDIM(num_steps=50, eta=1.0, spacing="quadratic", learned_variance=True),
      with_variance_channels(-1.0),
      SCHEDULE,
      shape,
      rng,
      learn_sigma=True,
    ),
    eq_16,
    atol=2e-5,
    rtol=0,
  )


def test_ddim_with_learned_variance_is_ddim_at_beta_tilde_and_ddpm_with_every_step():
  shape, rng = (3, 4, 4, 1), jax.random.key(9)
  at_beta_tilde = base.run(
    DDIM(num_steps=25, eta=0.7, learned_variance=True),
    with_variance_channels(-1.0),
    SCHEDULE,
    shape,
    rng,
    learn_sigma=True,
  )
  eq_16 = base.run(DDIM(num_steps=25, eta=0.7), nonlinear_eps, SCHEDULE, shape, rng)
  np.testing.assert_allclose(at_beta_tilde, eq_16, atol=2e-5, rtol=0)
  _, ddpm = base.run(
    DDPM(variance="learned"),
    with_variance_channels(0.3),
    SCHEDULE,
    shape,
    rng,
    learn_sigma=True,
    num_frames=20,
  )
  _, ddim = base.run(
    DDIM(num_steps=1000, eta=1.0, learned_variance=True),
    with_variance_channels(0.3),
    SCHEDULE,
    shape,
    rng,
    learn_sigma=True,
    num_frames=20,
  )
  np.testing.assert_allclose(ddim.x_t, ddpm.x_t, atol=1e-4, rtol=0)
  _, fixed = base.run(
    DDPM(variance="fixed_small"), nonlinear_eps, SCHEDULE, shape, rng, num_frames=20
  )
  assert np.abs(np.asarray(fixed.x_t) - np.asarray(ddpm.x_t)).max() > 1e-2  # v mattered


def test_ddim_eta_zero_is_deterministic_given_initial_noise():
  noise = jax.random.normal(jax.random.key(3), (2, 4, 4, 1))
  first = base.run(
    DDIM(num_steps=20), nonlinear_eps, SCHEDULE, noise.shape, jax.random.key(4), initial_noise=noise
  )
  second = base.run(
    DDIM(num_steps=20), nonlinear_eps, SCHEDULE, noise.shape, jax.random.key(5), initial_noise=noise
  )
  np.testing.assert_array_equal(first, second)
  stochastic = base.run(
    DDIM(num_steps=20, eta=1.0),
    nonlinear_eps,
    SCHEDULE,
    noise.shape,
    jax.random.key(5),
    initial_noise=noise,
  )
  assert not np.allclose(first, stochastic)


def test_timestep_spacings():
  indices = lambda steps, spacing: base.timestep_indices(SCHEDULE, steps, spacing)
  np.testing.assert_array_equal(indices(50, "uniform"), np.arange(0, 1000, 20))
  quadratic = indices(10, "quadratic")
  assert quadratic[0] == 0 and len(np.unique(quadratic)) == 10 and quadratic[-1] in (799, 800)
  # As the DDIM code: 50 quadratic steps start 0, 0, 1, 2 (the repeat is an identity step).
  np.testing.assert_array_equal(indices(50, "quadratic")[:4], [0, 0, 1, 2])
  np.testing.assert_array_equal(indices(3, "uniform"), [0, 333, 666])
  # logsnr: from t = 0 to T - 1, strictly increasing, lambda steps equal where indices allow.
  log_alpha_bar = np.asarray(SCHEDULE.log_alphas_cumprod, np.float64)
  lam = 0.5 * (log_alpha_bar - np.log(-np.expm1(log_alpha_bar)))
  for steps in (5, 20, 200, 1000):
    chosen = indices(steps, "logsnr")
    assert chosen[0] == 0 and chosen[-1] == 999 and np.all(np.diff(chosen) > 0), chosen
  gaps = -np.diff(lam[indices(10, "logsnr")])
  assert gaps.max() / gaps.min() < 1.1, gaps


def test_trajectory_keeps_only_the_requested_frames():
  shape = (2, 4, 4, 1)
  final, trajectory = base.run(
    DDIM(num_steps=10), nonlinear_eps, SCHEDULE, shape, jax.random.key(6), num_frames=4
  )
  assert trajectory.x_t.shape == trajectory.x0.shape == (4,) + shape
  np.testing.assert_array_equal(trajectory.timesteps, [900, 600, 300, 0])
  # The last frame's prediction of x_0 is the returned sample (clipped, with no noise left).
  np.testing.assert_allclose(trajectory.x0[-1], final, atol=1e-6)


class CountingDenoiser:
  def __init__(self):
    self.traces = 0

  def __call__(self, x_t, t):
    self.traces += 1
    return 0.5 * jnp.tanh(x_t)


def instruction_count(hlo_text):
  return sum(1 for line in hlo_text.splitlines() if " = " in line and "constant(" not in line)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
def test_compile_cost_does_not_grow_with_step_count(name):
  shape = (2, 4, 4, 1)
  sizes, denoisers = [], []
  for steps in (10, 1000):
    denoise = CountingDenoiser()
    schedule = schedules.get_schedule("linear", steps) if name == "ddpm" else SCHEDULE
    if name == "ddpm":
      fn = lambda rng: base.run(DDPM(), denoise, schedule, shape, rng)
    else:
      fn = lambda rng: base.run(
        SAMPLER_CLASSES[name](num_steps=steps),
        denoise,
        schedule,
        shape,
        rng,
        thresholding="dynamic",
      )
    compiled = jax.jit(fn).lower(jax.random.key(0)).compile()
    sizes.append(instruction_count(compiled.as_text()))
    denoisers.append(denoise.traces)
  assert denoisers == [1, 1]
  assert sizes[0] == sizes[1], sizes


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(num_steps=0), r"num_steps must be an integer in 1\.\.1000"),
    (dict(num_steps=1001), r"num_steps must be an integer in 1\.\.1000"),
    (dict(eta=1.5), r"eta must be in \[0, 1\]"),
    (dict(eta=-0.1), r"eta must be in \[0, 1\]"),
    (dict(spacing="log"), r"Unknown spacing 'log'.*'uniform', 'quadratic'"),
    (dict(prediction="score"), r"Unknown prediction 'score'.*'eps', 'x0', 'v'"),
  ],
)
def test_bad_ddim_arguments_fail_before_tracing(kwargs, message):
  denoise = CountingDenoiser()
  options = {k: v for k, v in kwargs.items() if k in ("num_steps", "eta", "spacing")}
  with pytest.raises(ValueError, match=message):
    base.run(
      DDIM(**options),
      denoise,
      SCHEDULE,
      (1, 2),
      jax.random.key(0),
      **{k: v for k, v in kwargs.items() if k not in options},
    )
  assert denoise.traces == 0


def test_bad_ddpm_arguments_fail_before_tracing():
  denoise = CountingDenoiser()
  with pytest.raises(ValueError, match=r"Unknown variance 'huge'.*fixed_small.*fixed_large"):
    base.run(DDPM(variance="huge"), denoise, SCHEDULE, (1, 2), jax.random.key(0))
  with pytest.raises(ValueError, match=r"learned variance, but the network does not output one"):
    base.run(DDPM(variance="learned"), denoise, SCHEDULE, (1, 2), jax.random.key(0))
  with pytest.raises(ValueError, match=r"initial_noise has shape \(3, 2\), expected \(1, 2\)"):
    base.run(DDPM(), denoise, SCHEDULE, (1, 2), jax.random.key(0), initial_noise=jnp.zeros((3, 2)))
  assert denoise.traces == 0


def test_sampler_keeps_the_batch_sharded_over_the_mesh():
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  shape = (2 * len(devices), 4, 4, 1)
  sharded = base.run(
    DDIM(num_steps=5, eta=1.0), nonlinear_eps, SCHEDULE, shape, jax.random.key(7), sharding=sharding
  )
  assert sharded.sharding.is_equivalent_to(sharding, len(shape))
  single = base.run(DDIM(num_steps=5, eta=1.0), nonlinear_eps, SCHEDULE, shape, jax.random.key(7))
  np.testing.assert_allclose(sharded, single, atol=1e-6)


def test_ddpm_sample_defaults_to_the_configs_variance():
  from configs import default

  assert DDPM().variance.value == default.get_config().sampling.variance
