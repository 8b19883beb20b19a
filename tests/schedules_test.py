"""Every table entry against an independent float64 reference written here, element by element."""

import math

import numpy as np
import pytest

from jax_ddpm.diffusion import schedules

T = 1000


def reference_betas(name, num_timesteps, beta_start=1e-4, beta_end=0.02):
  if name == "linear":
    step = (beta_end - beta_start) / (num_timesteps - 1)
    return np.array([beta_start + i * step for i in range(num_timesteps)])
  if name == "quadratic":
    lo, hi = math.sqrt(beta_start), math.sqrt(beta_end)
    return np.array([(lo + i * (hi - lo) / (num_timesteps - 1)) ** 2 for i in range(num_timesteps)])
  if name == "sigmoid":
    xs = [-6 + 12 * i / (num_timesteps - 1) for i in range(num_timesteps)]
    return np.array([beta_start + (beta_end - beta_start) / (1 + math.exp(-x)) for x in xs])
  if name == "cosine":

    def alpha_bar(i):
      return math.cos((i / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999) for i in range(num_timesteps)])
  raise AssertionError(name)


def reference_table(betas):
  """Loop-by-loop float64 version of DDPM eq. (4), (6), (7)."""
  table = {
    name: []
    for name in (
      "alphas",
      "alphas_cumprod",
      "alphas_cumprod_prev",
      "posterior_variance",
      "posterior_mean_coef1",
      "posterior_mean_coef2",
    )
  }
  running = 1.0
  for beta in betas:
    prev = running
    running *= 1.0 - beta
    table["alphas"].append(1.0 - beta)
    table["alphas_cumprod"].append(running)
    table["alphas_cumprod_prev"].append(prev)
    table["posterior_variance"].append(beta * (1 - prev) / (1 - running))
    table["posterior_mean_coef1"].append(beta * math.sqrt(prev) / (1 - running))
    table["posterior_mean_coef2"].append((1 - prev) * math.sqrt(1 - beta) / (1 - running))
  table = {k: np.array(v) for k, v in table.items()}
  abar = table["alphas_cumprod"]
  table["betas"] = np.asarray(betas)
  table["log_alphas_cumprod"] = np.log(abar)
  table["sqrt_alphas_cumprod"] = np.sqrt(abar)
  table["sqrt_one_minus_alphas_cumprod"] = np.sqrt(1 - abar)
  table["sqrt_recip_alphas_cumprod"] = 1 / np.sqrt(abar)
  table["sqrt_recipm1_alphas_cumprod"] = np.sqrt((1 - abar) / abar)
  variance = table["posterior_variance"]
  table["posterior_log_variance_clipped"] = np.log(np.concatenate([[variance[1]], variance[1:]]))
  table["fixed_large_log_variance"] = np.log(np.concatenate([[variance[1]], betas[1:]]))
  table["log_betas"] = np.log(betas)
  return table


@pytest.mark.parametrize("name", ["linear", "quadratic", "cosine", "sigmoid"])
def test_every_table_entry_matches_float64_reference(name):
  schedule = schedules.get_schedule(name, T)
  betas = reference_betas(name, T)
  reference = reference_table(betas)
  assert schedule.num_timesteps == T
  for field, expected in reference.items():
    actual = np.asarray(getattr(schedule, field))
    assert actual.dtype == np.float32 and actual.shape == (T,), field
    nonzero = expected != 0
    np.testing.assert_array_equal(actual[~nonzero], 0.0, err_msg=field)
    relative = np.abs(actual[nonzero] - expected[nonzero]) / np.abs(expected[nonzero])
    assert relative.max() <= 1e-6, (field, relative.max())


def test_linear_schedule_has_paper_endpoints():
  schedule = schedules.get_schedule("linear", T)
  assert np.isclose(schedule.betas[0], 1e-4) and np.isclose(schedule.betas[-1], 0.02)
  # DDPM Sec. 4: with these betas, q(x_T | x_0) is close to N(0, I).
  assert float(schedule.alphas_cumprod[-1]) < 1e-4


def test_cosine_betas_are_clipped():
  betas = np.asarray(schedules.get_schedule("cosine", T).betas)
  assert np.isclose(betas.max(), 0.999)


def test_unknown_schedule_names_the_allowed_values():
  with pytest.raises(ValueError, match=r"Unknown beta schedule 'cosin'.*cosine.*linear"):
    schedules.get_schedule("cosin", T)


@pytest.mark.parametrize(
  "kwargs",
  [
    {"num_timesteps": 1},
    {"num_timesteps": 10, "beta_end": 1.5},
    {"num_timesteps": 10, "beta_start": 0.0},
  ],
)
def test_bad_schedule_arguments_are_rejected(kwargs):
  with pytest.raises(ValueError):
    schedules.get_schedule("linear", **kwargs)
