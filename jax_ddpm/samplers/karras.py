"""Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM)
sampling for the VP-trained networks here: Euler, Heun (Algorithm 1), the stochastic sampler
(Algorithm 2: S_churn, S_tmin, S_tmax, S_noise) and Euler ancestral, on their sigma grid (eq. 5).

The VP process x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (DDPM eq. 4) is the VE
process x = x_0 + sigma n with sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), scaled by
s = sqrt(alpha-bar_t) = 1 / sqrt(1 + sigma^2) (EDM Sec. 2 and Table 1). The samplers integrate
the probability-flow ODE in sigma, dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 3 with
sigma(t) = t, s(t) = 1), whose right side is the network's eps at sigma. The loop carries the VP
x_t, which the network takes; a step scales it to x, moves, and scales back.

Network time: the network was trained at the integer timesteps 0..T-1, whose sigmas increase
with t. A grid sigma between two of them is given to the network as the fractional t linear in
log sigma between its neighbours (`sigma_to_t="interpolate"`; the U-Net's sinusoidal embedding
takes any real t, and log sigma is close to linear in t over most of the range), or every grid
sigma is moved to the nearest trained sigma (`"nearest"`: the network sees only inputs it was
trained on, at the cost of a grid that is no longer eq. 5's). x_0 and eps are always read at the
grid's own sigma (`base.denoised_at_sigma`), so the ODE is consistent with the step either way.

The grid runs from the largest sigma the network was trained at (t = T - 1, or
training.max_timestep) to the smallest (t = 0), then to sigma = 0, where the last step returns
the network's x_0. Every sampler here is a table of per-call coefficients (`Plan.aux`, computed
in float64) driving one step function, so Euler, Heun, churn and ancestral noise share one scan.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from jax_ddpm.diffusion.process import parse_enum
from jax_ddpm.diffusion.schedules import DiffusionSchedule
from jax_ddpm.io.errors import ConfigError
from jax_ddpm.samplers import base


class SigmaToT(str, enum.Enum):
  """How a grid sigma becomes the timestep the network is given."""

  INTERPOLATE = "interpolate"  # fractional t, linear in log sigma between trained timesteps
  NEAREST = "nearest"  # the grid sigma moves to the nearest trained sigma and its integer t


# Columns of a call's coefficient row (Plan.aux): the step starts from x at sigma_from, moves
# by the ODE to sigma_ode, adds noise_std * N(0, I) (reaching sigma_after), and a Heun
# corrector (phase 1) averages the two slopes of its step.
SIGMA_FROM, SIGMA_ODE, SIGMA_AFTER, NOISE_STD, PHASE = range(5)


def trained_sigmas(schedule: DiffusionSchedule) -> np.ndarray:
  """sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t) of every trained timestep, increasing
  (float64, from the table the other samplers read)."""
  log_alpha_bar = np.asarray(schedule.log_alphas_cumprod, np.float64)
  return np.sqrt(np.expm1(-log_alpha_bar))


def karras_grid(sigma_min: float, sigma_max: float, num_steps: int, rho: float) -> np.ndarray:
  """The N + 1 sigmas of EDM eq. (5): sigma_i = (sigma_max^(1/rho) + i / (N - 1)
  (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < N, and sigma_N = 0."""
  fraction = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
  inverse_min, inverse_max = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return np.append((inverse_max + fraction * (inverse_min - inverse_max)) ** rho, 0.0)


def sigma_to_t(sigmas: np.ndarray, sigma, mode: SigmaToT):
  """(t, sigma') for each sigma in [sigmas[0], sigmas[-1]]: the network time and the sigma the
  step uses (sigma itself when interpolating, the nearest trained one otherwise)."""
  t = np.interp(np.log(sigma), np.log(sigmas), np.arange(len(sigmas), dtype=np.float64))
  if mode == SigmaToT.INTERPOLATE:
    return t, np.asarray(sigma, np.float64)
  nearest = np.abs(np.log(sigmas)[None, :] - np.log(np.atleast_1d(sigma))[:, None]).argmin(1)
  return nearest.astype(np.float64).reshape(np.shape(t)), sigmas[nearest].reshape(np.shape(t))


def check_karras_options(num_steps, rho, t_max) -> None:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ConfigError(f"num_steps must be a positive integer, got {num_steps!r}.")
  if not isinstance(rho, (int, float)) or not rho > 0:
    raise ConfigError(f"rho must be > 0 (EDM eq. 5; 7 is the paper's), got {rho!r}.")
  if t_max is not None and (not isinstance(t_max, (int, np.integer)) or t_max < 1):
    raise ConfigError(f"t_max must be None or a positive timestep index, got {t_max!r}.")


def check_churn(s_churn, s_tmin, s_tmax, s_noise, key: str = "") -> None:
  """ConfigError unless EDM Algorithm 2's options are S_churn >= 0, 0 <= S_tmin <= S_tmax and
  S_noise > 0; `key` prefixes the names reported (e.g. "sampling.")."""
  values = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
  for name, value in values.items():
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
      raise ConfigError(f"{key}{name} must be a number >= 0, got {value!r}.")
  if s_tmin > s_tmax:
    raise ConfigError(f"{key}s_tmin={s_tmin!r} must be <= {key}s_tmax={s_tmax!r}.")
  if not s_noise > 0:
    raise ConfigError(f"{key}s_noise must be > 0, got {s_noise!r}.")


@dataclasses.dataclass(frozen=True)
class KarrasSampler(base.Sampler):
  """A sampler on EDM's sigma grid; subclasses make the plan's coefficient rows.

  num_steps: N, the grid's sigmas above 0; rho: eq. (5)'s (7); sigma_to_t: see `SigmaToT`;
  t_max: the largest timestep the grid starts from (None: T - 1; a run sets it to
  training.max_timestep through `trained_up_to`).
  """

  num_steps: int = 20
  rho: float = 7.0
  sigma_to_t: SigmaToT = SigmaToT.INTERPOLATE
  t_max: int | None = None

  second_order: ClassVar[bool] = False

  def __post_init__(self):
    object.__setattr__(self, "sigma_to_t", parse_enum(SigmaToT, self.sigma_to_t, "sigma_to_t"))
    check_karras_options(self.num_steps, self.rho, self.t_max)
    object.__setattr__(self, "rho", float(self.rho))

  @property
  def tags(self) -> tuple[str, ...]:
    return (f"rho{self.rho:g}",) * (self.rho != 7.0) + ("nearest",) * (
      self.sigma_to_t == SigmaToT.NEAREST
    )

  def trained_up_to(self, max_timestep: int | None) -> KarrasSampler:
    if self.t_max is not None or max_timestep is None:
      return self
    return dataclasses.replace(self, t_max=max_timestep)

  def grid(self, schedule: DiffusionSchedule) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, t): the N + 1 grid sigmas as the steps use them (`sigma_to_t`) and the network
    times of the first N."""
    sigmas = trained_sigmas(schedule)
    t_max = schedule.num_timesteps - 1 if self.t_max is None else self.t_max
    if t_max >= schedule.num_timesteps:
      raise ConfigError(f"t_max={t_max} is beyond the schedule's T - 1 = {sigmas.size - 1}.")
    grid = karras_grid(sigmas[0], sigmas[t_max], self.num_steps, self.rho)
    t, grid[:-1] = sigma_to_t(sigmas[: t_max + 1], grid[:-1], self.sigma_to_t)
    return grid, t

  def timesteps(self, schedule: DiffusionSchedule) -> np.ndarray:
    return np.asarray(self.plan(schedule).t, np.float64)

  def init_state(self, x_T):
    """A Heun step's start and first slope, (x^_i, d_i), for its corrector."""
    return (jnp.zeros_like(x_T),) * 2 if self.second_order else ()

  def step(self, schedule, x_t, denoised, step, noise, state):
    """One call's move, EDM Algorithm 1/2 in x = x_t / s: an Euler step from sigma_from to
    sigma_ode with the slope d = (x - D) / sigma = eps (lines 5-6), or for a Heun corrector
    (phase 1) the mean of the step's two slopes (line 8), then noise to sigma_after (the next
    step's churn, Algorithm 2 lines 4-5, or the ancestral noise)."""
    aux = step.aux
    sigma_from, sigma_ode, corrector = aux[SIGMA_FROM], aux[SIGMA_ODE], aux[PHASE] > 0
    sigma = jnp.where(corrector, sigma_ode, sigma_from)  # the sigma this call was made at
    x = x_t * jnp.sqrt(1.0 + sigma**2)
    slope = denoised.eps
    if self.second_order:
      x_start, first_slope = state
      x = jnp.where(corrector, x_start, x)
      slope = jnp.where(corrector, 0.5 * (first_slope + slope), slope)
      state = (x, slope)  # a predictor's start and slope, which its corrector reads
    x = x + (sigma_ode - sigma_from) * slope
    if noise is not None:
      x = x + aux[NOISE_STD] * noise
    return x * jnp.reciprocal(jnp.sqrt(1.0 + aux[SIGMA_AFTER] ** 2)), state

  def churned(self, sigma: np.ndarray, schedule: DiffusionSchedule) -> np.ndarray:
    """sigma^ of each grid sigma: sigma itself unless the sampler adds churn."""
    return sigma


def _noise_std(sigma_after, sigma_ode, s_noise):
  return s_noise * np.sqrt(np.maximum(sigma_after**2 - sigma_ode**2, 0.0))


@dataclasses.dataclass(frozen=True)
class Euler(KarrasSampler):
  """Euler's method on the probability-flow ODE, first order, one call per step (EDM
  Algorithm 1 without line 8); with s_churn > 0 the stochastic sampler of Algorithm 2 on Euler
  steps. s_churn, s_tmin, s_tmax, s_noise: Algorithm 2's; gamma_i = min(S_churn / N, sqrt(2) -
  1) where S_tmin <= sigma_i <= S_tmax, sigma^_i = (1 + gamma_i) sigma_i, at most the grid's
  first sigma (the network was trained no higher)."""

  name = "euler"
  s_churn: float = 0.0
  s_tmin: float = 0.0
  s_tmax: float = math.inf
  s_noise: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    check_churn(self.s_churn, self.s_tmin, self.s_tmax, self.s_noise)

  @classmethod
  def from_config(cls, sampling) -> Euler:
    return cls(
      num_steps=sampling.num_steps,
      rho=sampling.rho,
      sigma_to_t=sampling.sigma_to_t,
      s_churn=sampling.s_churn,
      s_tmin=sampling.s_tmin,
      s_tmax=sampling.s_tmax,
      s_noise=sampling.s_noise,
    )

  @property
  def uses_noise(self) -> bool:
    return self.s_churn > 0

  @property
  def tags(self) -> tuple[str, ...]:
    if self.s_churn <= 0:
      return super().tags
    defaults = dict(s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)
    changed = [
      f"{key[2:]}{getattr(self, key):g}"
      for key, value in defaults.items()
      if getattr(self, key) != value
    ]
    return (*super().tags, f"churn{self.s_churn:g}", *changed)

  def churned(self, sigma: np.ndarray, schedule: DiffusionSchedule) -> np.ndarray:
    """sigma^_i of Algorithm 2, line 4 (and 5's noise level), moved like the grid."""
    if self.s_churn <= 0:
      return sigma
    gamma = min(self.s_churn / self.num_steps, math.sqrt(2.0) - 1.0)
    inside = (sigma >= self.s_tmin) & (sigma <= self.s_tmax) & (sigma > 0)
    raised = np.minimum(np.where(inside, sigma * (1.0 + gamma), sigma), sigma[0])
    trained = trained_sigmas(schedule)
    moved = sigma_to_t(trained, np.maximum(raised[:-1], trained[0]), self.sigma_to_t)[1]
    return np.append(np.maximum(moved, sigma[:-1]), sigma[-1])

  def plan(self, schedule: DiffusionSchedule) -> base.Plan:
    """Call i at sigma^_i, Euler to sigma_{i+1}, then churn to sigma^_{i+1}; x_T ~ N(0, I) is
    taken as the sample at sigma^_0 (the prior is a Gaussian at the top of the grid)."""
    grid, _ = self.grid(schedule)
    raised = self.churned(grid, schedule)
    t, _ = sigma_to_t(trained_sigmas(schedule), raised[:-1], SigmaToT.INTERPOLATE)
    rows = [
      (
        raised[i],
        grid[i + 1],
        raised[i + 1],
        _noise_std(raised[i + 1], grid[i + 1], self.s_noise),
        0,
      )
      for i in range(self.num_steps)
    ]
    return base.Plan.of_timesteps(t, sigma=raised[:-1], aux=rows)


@dataclasses.dataclass(frozen=True)
class Heun(Euler):
  """Heun's second-order method, EDM Algorithm 1: an Euler step, then the mean of its slope and
  the slope at its end (line 8), two calls per step except the last (to sigma = 0), so 2N - 1
  calls in all; with s_churn > 0, Algorithm 2 (the EDM paper's stochastic sampler)."""

  name = "heun"
  second_order: ClassVar[bool] = True

  def plan(self, schedule: DiffusionSchedule) -> base.Plan:
    """Per step i: a call at sigma^_i (Euler to sigma_{i+1}, phase 0), and unless sigma_{i+1}
    = 0 a call at sigma_{i+1} (the corrector, phase 1, then churn to sigma^_{i+1})."""
    grid, _ = self.grid(schedule)
    raised = self.churned(grid, schedule)
    sigmas, rows = [], []
    for i in range(self.num_steps):
      last = i == self.num_steps - 1
      sigmas.append(raised[i])
      rows.append((raised[i], grid[i + 1], grid[i + 1], 0.0, 0))
      if not last:
        sigmas.append(grid[i + 1])
        noise = _noise_std(raised[i + 1], grid[i + 1], self.s_noise)
        rows.append((raised[i], grid[i + 1], raised[i + 1], noise, 1))
    t, _ = sigma_to_t(trained_sigmas(schedule), np.asarray(sigmas), SigmaToT.INTERPOLATE)
    return base.Plan.of_timesteps(t, sigma=sigmas, aux=rows)


@dataclasses.dataclass(frozen=True)
class EulerAncestral(KarrasSampler):
  """Euler ancestral: each step splits sigma_{i+1}^2 into the part the ODE moves to,
  sigma_down^2, and fresh noise sigma_up^2 = eta^2 sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) /
  sigma_i^2 (at most sigma_{i+1}^2), the variance of the DDPM posterior q(x_{i+1} | x_i, x_0)
  (DDPM eq. 7 in the VE variables); an Euler step to sigma_down, then the noise. One call per
  step; eta = 0 is Euler. The name k-diffusion and diffusers use."""

  name = "euler_ancestral"
  eta: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    base.check_eta(self.eta)
    object.__setattr__(self, "eta", float(self.eta))

  @classmethod
  def from_config(cls, sampling) -> EulerAncestral:
    return cls(num_steps=sampling.num_steps, rho=sampling.rho, sigma_to_t=sampling.sigma_to_t)

  @property
  def uses_noise(self) -> bool:
    return self.eta > 0

  @property
  def tags(self) -> tuple[str, ...]:
    return super().tags + (f"eta{self.eta:g}",) * (self.eta != 1.0)

  def plan(self, schedule: DiffusionSchedule) -> base.Plan:
    grid, t = self.grid(schedule)
    current, following = grid[:-1], grid[1:]
    sigma_up = np.minimum(
      following, self.eta * np.sqrt(following**2 * (current**2 - following**2) / current**2)
    )
    sigma_down = np.sqrt(following**2 - sigma_up**2)
    rows = np.stack([current, sigma_down, following, sigma_up, np.zeros_like(current)], axis=1)
    return base.Plan.of_timesteps(t, sigma=current, aux=rows)
