"""UniPC, Zhao et al. 2023 ("UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): the multistep predictor UniP-p and the corrector UniC-p in data prediction,
with B(h) = e^h - 1 ("bh2", their choice for few steps; "bh1" is B(h) = h).

Notation as DPM-Solver++ (dpm_solver.py): alpha_t = sqrt(alpha-bar_t), sigma_t =
sqrt(1 - alpha-bar_t), lambda_t = log(alpha_t / sigma_t), m_i the network's x_0 at the i-th
visited timestep, h_i = lambda_{i+1} - lambda_i. A step from t_i to t_{i+1} is

  x~_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h}) m_i
             - alpha_{i+1} B(-h) sum_k a_k D_k / r_k,   D_k = m_{i-k} - m_i,

with r_k = (lambda_{i-k} - lambda_i) / h and the weights a_k solving R_p a = g_p (the paper's
Algorithm 2 and Theorem 3.1: row n of R_p holds r_k^(n-1), g_n = n! phi_{n+1}(-h) / B(-h) in the
phi functions of -h, the exponential integrator's). The first term pair is DDIM (eta = 0); the
sum is UniP-p's correction from the p - 1 earlier predictions. The network's x_0 at the new point,
m_{i+1} = m(x~_{i+1}), then corrects the same step (UniC-p, order p + 1):

  x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h}) m_i
            - alpha_{i+1} B(-h) (sum_k c_k D_k / r_k + c_p (m_{i+1} - m_i)),

with c solving the p x p system R c = g (its last column r = 1 is the new point). The corrector
reuses m_{i+1}, which the next step needs anyway, so a step still costs one network call; x~ is
the network's input and x the corrected sample the next step starts from. Orders are lowered on
the first steps (no earlier predictions yet) and the last ones (p <= the steps left, as the
authors' code does with few steps); the step to the data is first order (it returns m).
"""

from __future__ import annotations

import dataclasses
import enum
import math

import jax.numpy as jnp
import numpy as np

from jax_ddpm.diffusion.process import parse_enum
from jax_ddpm.diffusion.schedules import DiffusionSchedule
from jax_ddpm.samplers import base

MAX_ORDER = 3

# Columns of a call's coefficient row (Plan.aux): the predictor of the step leaving this call,
# then the corrector of the step that arrived here.
PRED_RATIO, PRED_X0, PRED_B, PRED_W1, PRED_W2 = range(5)
CORRECT, CORR_RATIO, CORR_X0, CORR_B, CORR_W1, CORR_W2, CORR_NEW = range(5, 12)


class Variant(str, enum.Enum):
  """B(h) of UniPC's update (Sec. 3.1, written at -h in data prediction)."""

  BH1 = "bh1"  # B(h) = h
  BH2 = "bh2"  # B(h) = e^h - 1


def half_log_snr(schedule: DiffusionSchedule, timesteps: np.ndarray) -> np.ndarray:
  """lambda_t = log(alpha_t / sigma_t) at integer timesteps (float64)."""
  log_alpha_bar = np.asarray(schedule.log_alphas_cumprod, np.float64)[timesteps]
  return 0.5 * (log_alpha_bar - np.log(-np.expm1(log_alpha_bar)))


def step_weights(lam: np.ndarray, i: int, order: int, variant: Variant):
  """(h, B(-h), predictor weights a_k / r_k, corrector weights c_k / r_k and c_p) for the step
  from visited point i to i + 1 at order p = `order`, from R_p a = g_p (UniPC Theorem 3.1)."""
  h = lam[i + 1] - lam[i]
  hh = -h  # data prediction integrates in -lambda
  b_of_h = hh if variant == Variant.BH1 else math.expm1(hh)
  r = np.array([(lam[i - k] - lam[i]) / h for k in range(1, order)] + [1.0])
  # g_n = n! phi_{n+1}(hh) / B(hh), with h phi_k(h) recursions as in the exponential integrator.
  g, h_phi, factorial = [], math.expm1(hh) / hh - 1.0, 1.0
  for n in range(1, order + 1):
    g.append(h_phi * factorial / b_of_h)
    factorial *= n + 1
    h_phi = h_phi / hh - 1.0 / factorial
  R = np.stack([r**n for n in range(order)])
  g = np.asarray(g)
  predictor = np.linalg.solve(R[:-1, :-1], g[:-1]) / r[:-1] if order > 1 else np.zeros(0)
  corrector = np.linalg.solve(R, g)
  return h, b_of_h, predictor, corrector[:-1] / r[:-1], corrector[-1]


def usable_order(lam: np.ndarray, i: int, order: int) -> int:
  """`order`, lowered until the earlier points it uses lie at distinct lambdas other than
  lambda_i (quadratic spacing repeats t = 0 for large S: R would be singular)."""
  while order > 1 and len({lam[i - k] for k in range(order)}) < order:
    order -= 1
  return order


def padded(weights: np.ndarray) -> list[float]:
  return list(weights) + [0.0] * (MAX_ORDER - 1 - len(weights))


@dataclasses.dataclass(frozen=True)
class UniPC(base.Sampler):
  """UniPC in num_steps = S network calls: UniP-`order` and, with `corrector`, UniC-`order`
  (accuracy order + 1). spacing: as DPMSolverPP2M ("logsnr", the paper's for pixel models);
  variant: "bh2" (B(h) = e^h - 1) or "bh1" (B(h) = h)."""

  name = "unipc"
  num_steps: int = 20
  spacing: base.Spacing = base.Spacing.LOGSNR
  order: int = 2
  corrector: bool = True
  variant: Variant = Variant.BH2

  def __post_init__(self):
    object.__setattr__(self, "spacing", parse_enum(base.Spacing, self.spacing, "spacing"))
    object.__setattr__(self, "variant", parse_enum(Variant, self.variant, "variant"))
    if self.order not in range(1, MAX_ORDER + 1):
      raise ValueError(f"order must be 1, 2 or 3, got {self.order!r}.")

  @classmethod
  def from_config(cls, sampling) -> UniPC:
    return cls(num_steps=sampling.num_steps, spacing=sampling.spacing)

  @property
  def tags(self) -> tuple[str, ...]:
    return (
      (self.spacing.value,) * (self.spacing != base.Spacing.UNIFORM)
      + (f"order{self.order}",) * (self.order != 2)
      + ("nocorrector",) * (not self.corrector)
      + (self.variant.value,) * (self.variant != Variant.BH2)
    )

  def timesteps(self, schedule: DiffusionSchedule) -> np.ndarray:
    return base.timestep_indices(schedule, self.num_steps, self.spacing)[::-1].copy()

  def step_order(self, i: int) -> int:
    """p of the step leaving visited point i: no more earlier points than there are, and no
    more than the steps left (the last, to the data, is first order)."""
    return max(1, min(self.order, i + 1, self.num_steps - i))

  def plan(self, schedule: DiffusionSchedule) -> base.Plan:
    timesteps = self.timesteps(schedule)
    lam = half_log_snr(schedule, timesteps)
    log_alpha_bar = np.asarray(schedule.log_alphas_cumprod, np.float64)[timesteps]
    alpha, sigma = np.exp(0.5 * log_alpha_bar), np.sqrt(-np.expm1(log_alpha_bar))
    steps = []  # per step i -> i + 1 (not the one to the data): its coefficients
    for i in range(len(timesteps) - 1):
      if lam[i + 1] == lam[i]:  # a repeated timestep: the step stays where it is
        steps.append((1.0, 0.0, 0.0, np.zeros(0), np.zeros(0), 0.0))
        continue
      order = usable_order(lam, i, self.step_order(i))
      h, b_of_h, predictor, corrector, new = step_weights(lam, i, order, self.variant)
      ratio, x0 = sigma[i + 1] / sigma[i], alpha[i + 1] * -math.expm1(-h)
      steps.append((ratio, x0, alpha[i + 1] * b_of_h, predictor, corrector, new))
    rows = []
    for i in range(len(timesteps)):
      if i < len(steps):
        ratio, x0, b, predictor, _, _ = steps[i]
        row = [ratio, x0, b, *padded(predictor)]
      else:  # to the data: x = m_i
        row = [0.0, 1.0, 0.0, 0.0, 0.0]
      if i > 0 and self.corrector:
        ratio, x0, b, _, corrector, new = steps[i - 1]
        row += [1.0, ratio, x0, b, *padded(corrector), new]
      else:
        row += [0.0] * 7
      rows.append(row)
    return base.Plan.of_timesteps(timesteps, aux=rows)

  def init_state(self, x_T):
    """(the previous corrected sample, the x_0 predictions m_{i-1}, m_{i-2}, m_{i-3})."""
    return (jnp.zeros_like(x_T),) * 4

  def step(self, schedule, x_t, denoised, step, noise, state):
    aux, m = step.aux, denoised.x0
    x_previous, m1, m2, m3 = state
    corrected = (
      aux[CORR_RATIO] * x_previous
      + aux[CORR_X0] * m1
      - aux[CORR_B]
      * (aux[CORR_W1] * (m2 - m1) + aux[CORR_W2] * (m3 - m1) + aux[CORR_NEW] * (m - m1))
    )
    x = jnp.where(aux[CORRECT] > 0, corrected, x_t)
    x_next = (
      aux[PRED_RATIO] * x
      + aux[PRED_X0] * m
      - aux[PRED_B] * (aux[PRED_W1] * (m1 - m) + aux[PRED_W2] * (m2 - m))
    )
    return x_next, (x, m, m1, m2)
