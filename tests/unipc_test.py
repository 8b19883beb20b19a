"""UniPC against Gaussian data's exact probability-flow ODE: UniP-p converges at order p, the
corrector UniC-p adds one, at one network call per step."""

import jax
import numpy as np
import pytest
from sampler_family_test import exact_flow_then_denoise
from samplers_test import GAUSSIAN, SCHEDULE, gaussian_mixture_eps, nonlinear_eps

from jax_ddpm.samplers import base
from jax_ddpm.samplers.ddim import DDIM
from jax_ddpm.samplers.dpm_solver import DPMSolverPP2M
from jax_ddpm.samplers.unipc import UniPC, step_weights

X_T = jax.random.normal(jax.random.key(0), (512, 2))


def errors(make, counts):
  """Max error against the exact flow from the sampler's first timestep, then the posterior
  mean at t = 0 (the step to the data), for each step count; and the log2 slopes."""
  found = []
  for steps in counts:
    sampler = make(steps)
    out = base.run(
      sampler,
      gaussian_mixture_eps(**GAUSSIAN),
      SCHEDULE,
      X_T.shape,
      jax.random.key(1),
      initial_noise=X_T,
      thresholding="none",
    )
    exact = exact_flow_then_denoise(X_T, sampler.timesteps(SCHEDULE)[0])
    found.append(float(np.abs(np.asarray(out, np.float64) - exact).max()))
  return found, [float(np.log2(a / b)) for a, b in zip(found, found[1:])]


# (order, corrector) -> (step counts, the error's expected order). Order 3 is measured between 20
# and 40 steps: below 20 it is not yet asymptotic, beyond 40 float32 round-off (about 5e-5 on
# this problem, DDIM's and DPM-Solver's alike) is as large as the error.
CASES = {
  (1, False): ((20, 40, 80), 1),
  (1, True): ((20, 40, 80), 2),
  (2, False): ((20, 40, 80), 2),
  (2, True): ((20, 40, 80), 3),
  (3, False): ((20, 40), 3),
  (3, True): ((20, 40), 4),
}


@pytest.mark.parametrize("order,corrector", list(CASES))
def test_unipc_error_falls_at_its_order(order, corrector):
  counts, expected = CASES[(order, corrector)]
  found, slopes = errors(lambda n: UniPC(num_steps=n, order=order, corrector=corrector), counts)
  message = (
    f"UniPC order {order}, corrector {corrector}: errors at {counts} steps {found}, slopes {slopes}"
  )
  print(message)
  assert all(expected - 0.3 < slope < expected + 0.5 for slope in slopes), message


def test_unipc_beats_dpm_solver_at_the_same_calls():
  """The corrector is free: UniPC-2 in 40 calls against DPM-Solver++(2M) in 40."""
  unipc, _ = errors(lambda n: UniPC(num_steps=n), (40,))
  dpm, _ = errors(lambda n: DPMSolverPP2M(num_steps=n), (40,))
  assert unipc[0] < 0.5 * dpm[0], (unipc, dpm)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_first_order_unip_is_ddim_with_eta_zero(prediction):
  shape, rng = (4, 3, 3, 2), jax.random.key(3)
  options = dict(prediction=prediction, thresholding="static")
  steps = dict(num_steps=12, spacing="uniform")
  unip = base.run(
    UniPC(order=1, corrector=False, **steps), nonlinear_eps, SCHEDULE, shape, rng, **options
  )
  ddim = base.run(DDIM(**steps), nonlinear_eps, SCHEDULE, shape, rng, **options)
  np.testing.assert_allclose(unip, ddim, atol=2e-6, rtol=2e-6)


def test_the_weights_solve_the_papers_order_conditions():
  """UniC-1's weight is B(h)'s phi_2 ratio (0.5 + O(h)); UniP-2's one earlier point at r = -1
  with equal steps gets 0.5 + O(h), as the authors' simplified 0.5."""
  lam = np.array([0.0, 0.1, 0.2, 0.3])
  h, b_of_h, predictor, corrector, new = step_weights(lam, 0, 1, "bh2")
  assert h == pytest.approx(0.1) and b_of_h == pytest.approx(np.expm1(-0.1))
  assert predictor.size == 0 and corrector.size == 0 and new == pytest.approx(0.5, abs=0.02)
  _, _, predictor, corrector, new = step_weights(lam, 1, 2, "bh2")
  assert predictor[0] * -1.0 == pytest.approx(0.5, abs=0.02)  # a_1 / r_1 with r_1 = -1
  # UniC-2: c solves [[1, 1], [r, 1]] c = g, so c_1 + c_2 = g_1 (the first order condition).
  g1 = (np.expm1(-0.1) / -0.1 - 1) / np.expm1(-0.1)
  assert corrector[0] * -1.0 + new == pytest.approx(g1)


def test_unipc_calls_the_network_once_a_step_and_lowers_its_order_at_the_ends():
  sampler = UniPC(num_steps=6, order=3)
  assert len(sampler.plan(SCHEDULE).t) == 6
  assert [sampler.step_order(i) for i in range(5)] == [1, 2, 3, 3, 2]
  with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
    UniPC(order=4)


def test_unipc_steps_over_the_timesteps_quadratic_spacing_repeats():
  """Quadratic spacing at S = 50 of T = 1000 visits t = 0 twice (and 1 twice): a zero-length
  step stays, and no weight divides by a zero lambda difference."""
  sampler = UniPC(num_steps=50, spacing="quadratic")
  timesteps = sampler.timesteps(SCHEDULE)
  assert len(set(timesteps.tolist())) < len(timesteps)
  assert np.all(np.isfinite(np.asarray(sampler.plan(SCHEDULE).aux)))
  found, _ = errors(lambda n: sampler, (50,))
  ddim, _ = errors(lambda n: DDIM(num_steps=50, spacing="quadratic"), (50,))
  assert found[0] < ddim[0], (found, ddim)
