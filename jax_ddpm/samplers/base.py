"""The sampler interface and the one compiled loop that runs every sampler.

A sampler says where it calls the network (its `Plan`: one row per call) and how it moves on
from each call given the network's (thresholded) predictions of x_0 and eps; `run` drives it
through one `lax.scan` with one network call per iteration, so the network is traced once and
compile cost does not depend on the number of steps. A sampler that needs memory across calls (a
multistep solver's earlier x_0 predictions, a Heun step's first slope) keeps it in its own scan
state.

Time: the samplers of DDPM and DDIM visit integer timestep indices t and read the schedule's
table there. Samplers on Karras et al.'s sigma grid (karras.py) call the network at fractional
t, and give each call's sigma = sqrt((1 - alpha-bar) / alpha-bar) in the plan, from which x_0
is read exactly (`denoised_at_sigma`).

Noise stream: with rng split into (rng_init, rng_steps), x_T ~ N(0, I) is drawn from rng_init
and the noise added when leaving timestep index t from fold_in(rng_steps, t) (the k-th call's
fold_in(rng_steps, k) where t is fractional). Every sampler on integer timesteps shares this
convention, so DDIM with S = T and eta = 1 follows DDPM ("fixed_small") step for step.

The checks of a sampler's options are functions of the value and the name to report, so that a
run config names its key (sampling.num_steps) and a Python caller its argument (num_steps).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_ddpm.diffusion import process as diffusion
from jax_ddpm.diffusion.process import Prediction, parse_enum
from jax_ddpm.diffusion.schedules import DiffusionSchedule
from jax_ddpm.io.errors import ConfigError


class Thresholding(str, enum.Enum):
  """What is done to each predicted x_0 before a step uses it."""

  NONE = "none"
  STATIC = "static"  # clip to [-1, 1], as the original DDPM sampler did
  DYNAMIC = "dynamic"  # Saharia et al. 2022 (Imagen), Sec. 2.3: see `threshold_x0`


class Spacing(str, enum.Enum):
  """How a few-step sampler picks its S timesteps out of T."""

  UNIFORM = "uniform"  # every (T // S)-th index from 0, as the DDIM code's "uniform" skip
  QUADRATIC = "quadratic"  # int(linspace(0, sqrt(0.8 T), S)^2), the DDIM paper's CIFAR-10 choice
  LOGSNR = "logsnr"  # uniform in lambda = log(alpha_t / sigma_t), DPM-Solver's choice (Sec. 3.3)


class Trajectory(NamedTuple):
  """A thinned record of one sampling run: frame k holds the state after leaving timesteps[k].

  x_t[k] is the sample entering that step and x0[k] the network's prediction of x_0 there.
  """

  timesteps: jnp.ndarray  # [K] int32
  x_t: jnp.ndarray  # [K, *shape]
  x0: jnp.ndarray  # [K, *shape]


class Denoised(NamedTuple):
  """The network's estimates at (x_t, t) that a step reads: x_0 (thresholded) and the eps
  consistent with it, and a learned-variance network's raw variance channels (else None)."""

  x0: jax.Array
  eps: jax.Array
  variance_output: jax.Array | None = None


class Step(NamedTuple):
  """Where a step goes: from t to t_next ([B] timesteps; t_next = -1 is the data), its index in
  the run (0 first), and its row of the plan's per-call coefficients (`Plan.aux`, else None)."""

  t: jax.Array
  t_next: jax.Array
  index: jax.Array
  aux: jax.Array | None = None


class Plan(NamedTuple):
  """Where a sampler calls the network, one entry per call in visiting order, as tuples (so
  that a plan is a static argument of the compiled loop).

  t: the timestep the network is given (int indices, or floats for fractional timesteps);
  t_next: where the step after the call goes (-1: the data); sigma: None to read x_0 from the
  schedule's table at t, else each call's sigma (`denoised_at_sigma`); aux: None, or per call a
  tuple of sampler-defined coefficients computed in float64 when the plan is made.
  """

  t: tuple
  t_next: tuple
  sigma: tuple | None = None
  aux: tuple | None = None

  @classmethod
  def of_timesteps(cls, timesteps, sigma=None, aux=None) -> Plan:
    """The plan that visits `timesteps` in order, each step going to the next (the last to the
    data), with optional per-call sigmas and coefficient rows."""
    timesteps = np.asarray(timesteps)
    t_next = np.append(timesteps[1:], -1).astype(timesteps.dtype)
    return cls(
      t=tuple(timesteps.tolist()),
      t_next=tuple(t_next.tolist()),
      sigma=None if sigma is None else tuple(np.asarray(sigma, np.float64).tolist()),
      aux=None if aux is None else tuple(tuple(row) for row in np.asarray(aux).tolist()),
    )


def check_num_steps(num_steps, num_timesteps: int, key: str = "num_steps") -> None:
  """ConfigError unless `key` = num_steps is an integer in 1..T."""
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
    raise ConfigError(f"{key} must be an integer in 1..{num_timesteps} (T), got {num_steps!r}.")


def check_eta(eta, key: str = "eta") -> None:
  """ConfigError unless `key` = eta, DDIM's noise scale (DDIM eq. 16), is in [0, 1]."""
  if not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
    raise ConfigError(f"{key} must be in [0, 1], got {eta!r}.")


def timestep_indices(
  schedule: DiffusionSchedule, num_steps: int, spacing: Spacing | str
) -> np.ndarray:
  """The S increasing timestep indices a few-step sampler visits (it visits them in reverse)."""
  spacing = parse_enum(Spacing, spacing, "spacing")
  num_timesteps = schedule.num_timesteps
  check_num_steps(num_steps, num_timesteps)
  if spacing == Spacing.UNIFORM:
    return np.arange(num_steps, dtype=np.int32) * (num_timesteps // num_steps)
  if spacing == Spacing.QUADRATIC:
    # As the DDIM code: for large S the first indices repeat (0, 0, 1, 3, ...). A step from t to
    # the same t leaves x_t unchanged, so repeats cost a network call but keep the paper's steps.
    return (np.linspace(0.0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int32)
  # lambda_t = (log alpha-bar_t - log(1 - alpha-bar_t)) / 2 falls with t; take the index nearest
  # to each of S values uniform in lambda, then push apart indices that coincide near t = 0.
  log_alpha_bar = np.asarray(schedule.log_alphas_cumprod, np.float64)
  lam = 0.5 * (log_alpha_bar - np.log(-np.expm1(log_alpha_bar)))
  targets = np.linspace(lam[0], lam[-1], num_steps)
  indices = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
  for i in range(1, num_steps):  # strictly increasing; S <= T leaves room at the top
    indices[i] = max(indices[i], indices[i - 1] + 1)
  indices[-1] = min(indices[-1], num_timesteps - 1)
  for i in range(num_steps - 2, -1, -1):
    indices[i] = min(indices[i], indices[i + 1] - 1)
  return indices.astype(np.int32)


# The most of the data, sqrt(alpha-bar_t), that a sampler's first timestep may keep when the
# schedule's last one keeps no more: every sampler starts from x_T ~ N(0, I), which is q(x_t) only
# where sqrt(alpha-bar_t) is about 0. Quadratic spacing stops at t = 0.8 T (0.039 under the linear
# schedule it was made for, 0.31 under the cosine schedule).
START_SIGNAL_TOLERANCE = 0.1


def check_start(schedule: DiffusionSchedule, timesteps, what: str = "the sampler") -> None:
  """ConfigError when the first timestep visited keeps more than START_SIGNAL_TOLERANCE of the
  data though the schedule's last keeps less: the start x_T ~ N(0, I) is then not q(x_t), and
  the samples are poor (the cosine schedule on quadratic spacing). A schedule that never reaches
  noise (e.g. T = 100 with the linear betas of T = 1000, as the tests' tiny config) is the
  schedule's choice, not the sampler's. `what` names the sampler's settings in the message."""
  log_alpha_bar = np.asarray(schedule.log_alphas_cumprod, np.float64)
  start = int(np.max(timesteps))
  signal, last = np.exp(0.5 * log_alpha_bar[start]), np.exp(0.5 * log_alpha_bar[-1])
  if signal > START_SIGNAL_TOLERANCE >= last:
    raise ConfigError(
      f"{what}: the sampler's first timestep t = {start} keeps sqrt(alpha-bar_t) = "
      f"{signal:.3f} of the data (the schedule's t = {len(log_alpha_bar) - 1}: {last:.3f}), but "
      f"it starts from x_T ~ N(0, I); choose a spacing that starts nearer t = T - 1 for this "
      f"schedule (uniform or logsnr)."
    )


def frame_slots(num_steps: int, num_frames: int) -> np.ndarray:
  """For each of the steps in visiting order, the trajectory slot it writes, or -1.

  Frames are spread evenly over the run and always include the first and the last step.
  """
  if not isinstance(num_frames, (int, np.integer)) or not 0 <= num_frames <= num_steps:
    raise ValueError(f"num_frames must be an integer in 0..{num_steps}, got {num_frames!r}.")
  slots = np.full(num_steps, -1, dtype=np.int32)
  if num_frames:
    chosen = np.unique(np.round(np.linspace(0, num_steps - 1, num_frames)).astype(np.int32))
    slots[chosen] = np.arange(len(chosen), dtype=np.int32)
  return slots


def threshold_x0(x0, thresholding: Thresholding | str, percentile: float = 0.995):
  """x_0 after static or dynamic thresholding.

  Dynamic (Saharia et al. 2022, Sec. 2.3): per sample, s = max(1, the `percentile` quantile of
  |x_0| over its pixels); x_0 is clipped to [-s, s] and divided by s, so saturated pixels are
  pulled inwards instead of piling up at +-1.
  """
  thresholding = Thresholding(thresholding)
  if thresholding == Thresholding.NONE:
    return x0
  if thresholding == Thresholding.STATIC:
    return jnp.clip(x0, -1.0, 1.0)
  flat = jnp.abs(x0).reshape(x0.shape[0], -1)
  s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.clip(x0, -s, s) / s


def read_x0_and_eps(sigma, x_t, output, prediction: Prediction):
  """(x_0, eps) from the network output at the VP point whose sigma = sqrt((1 - alpha-bar) /
  alpha-bar) is given: alpha-bar = 1 / (1 + sigma^2), so sqrt(alpha-bar) = 1 / sqrt(1 + sigma^2)
  and sqrt(1 - alpha-bar) = sigma / sqrt(1 + sigma^2) in DDPM eq. (4) and Salimans & Ho's v."""
  scale = jax.lax.rsqrt(1.0 + sigma**2)  # sqrt(alpha-bar)
  noise_scale = sigma * scale  # sqrt(1 - alpha-bar)
  if prediction == Prediction.EPS:
    return (x_t - noise_scale * output) / scale, output
  if prediction == Prediction.X0:
    return output, (x_t - scale * output) / noise_scale
  return scale * x_t - noise_scale * output, noise_scale * x_t + scale * output


def denoised_at_sigma(
  sigma, x_t, output, *, prediction: Prediction, thresholding: Thresholding, percentile: float
):
  """`denoised` where the call's sigma is given instead of an integer t (karras.py)."""
  x0, eps = read_x0_and_eps(sigma, x_t, output, prediction)
  if thresholding != Thresholding.NONE:
    x0 = threshold_x0(x0, thresholding, percentile)
    eps = read_x0_and_eps(sigma, x_t, x0, Prediction.X0)[1]
  return x0, eps


def denoised(
  schedule: DiffusionSchedule,
  x_t,
  t,
  output,
  *,
  prediction: Prediction,
  thresholding: Thresholding,
  percentile: float,
):
  """(x_0, eps) from the network output, x_0 thresholded and eps recomputed from it.

  eps is recomputed so that x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps still holds
  (DDPM eq. 4), which keeps DDIM's eq. (12) consistent with x_t.
  """
  x0, eps = diffusion.x0_and_eps_from_output(schedule, x_t, t, output, prediction)
  if thresholding != Thresholding.NONE:
    x0 = threshold_x0(x0, thresholding, percentile)
    eps = diffusion.predict_eps_from_x0(schedule, x_t, t, x0)
  return x0, eps


@dataclasses.dataclass(frozen=True)
class Sampler(abc.ABC):
  """A reverse process. Subclasses are frozen dataclasses of their options (hashable, so a
  compiled program is reused for equal options) and validate them in `__post_init__`.

  name: the registry name (`sampling.sampler`).
  """

  name: ClassVar[str]

  @abc.abstractmethod
  def timesteps(self, schedule: DiffusionSchedule) -> np.ndarray:
    """The timesteps of the network calls, in visiting (decreasing) order, one per call; fails
    on bad options."""

  def plan(self, schedule: DiffusionSchedule) -> Plan:
    """The calls and what the loop gives each step (by default `timesteps`, each step going to
    the next, x_0 read from the schedule's table)."""
    return Plan.of_timesteps(self.timesteps(schedule))

  def trained_up_to(self, max_timestep: int | None) -> Sampler:
    """This sampler for a network trained on t <= max_timestep only (None: every t). Samplers
    whose timesteps come from their options are unchanged (the run checks them); those that
    start from the largest trained noise level (karras.py) start there."""
    return self

  @classmethod
  @abc.abstractmethod
  def from_config(cls, sampling) -> Sampler:
    """The sampler from its options among the keys of a run config's typed `sampling` section
    (config.sections.SamplingConfig)."""

  @property
  def uses_noise(self) -> bool:
    return False

  @property
  def uses_learned_variance(self) -> bool:
    """Whether `step` needs a learned-variance network's variance_output."""
    return False

  @property
  def tags(self) -> tuple[str, ...]:
    """Options that change the images, beyond the name and step count, as short words for
    file names ("eta1", "logsnr"); empty at the defaults, so default names stay short."""
    return ()

  def init_state(self, x_T) -> Any:
    """The scan state the sampler keeps across steps (none by default)."""
    return ()

  @abc.abstractmethod
  def step(self, schedule: DiffusionSchedule, x_t, denoised: Denoised, step: Step, noise, state):
    """x_t -> x_{t_next}; returns (x_next, state). noise: N(0, I) of x_t's shape, or None
    unless `uses_noise`; state: what `init_state` or the previous step returned."""


def _initial_state(rng, shape, initial_noise, sharding):
  rng_init, rng_steps = jax.random.split(rng)
  if initial_noise is None:
    x_t = jax.random.normal(rng_init, shape, jnp.float32)
  else:
    x_t = jnp.asarray(initial_noise, jnp.float32)
  if sharding is not None:
    x_t = jax.lax.with_sharding_constraint(x_t, sharding)
  return x_t, rng_steps


def _step_noise(rng_steps, t, shape, sharding):
  noise = jax.random.normal(jax.random.fold_in(rng_steps, t), shape, jnp.float32)
  if sharding is not None:
    noise = jax.lax.with_sharding_constraint(noise, sharding)
  return noise


def _record(frames, slot, x_t, x0):
  """Writes (x_t, x0) into slot `slot` of the frame buffers; a no-op where slot < 0."""
  if frames is None:
    return None
  frames_x_t, frames_x0 = frames
  index = jnp.maximum(slot, 0)
  keep = slot >= 0
  frames_x_t = frames_x_t.at[index].set(jnp.where(keep, x_t, frames_x_t[index]))
  frames_x0 = frames_x0.at[index].set(jnp.where(keep, x0, frames_x0[index]))
  return frames_x_t, frames_x0


@functools.partial(
  jax.jit,
  static_argnames=(
    "sampler",
    "denoise_fn",
    "shape",
    "plan",
    "prediction",
    "learn_sigma",
    "thresholding",
    "percentile",
    "num_frames",
    "sharding",
  ),
)
def _run(
  sampler,
  denoise_fn,
  schedule,
  shape,
  rng,
  initial_noise,
  *,
  plan,
  prediction,
  learn_sigma,
  thresholding,
  percentile,
  num_frames,
  sharding,
):
  x_t, rng_steps = _initial_state(rng, shape, initial_noise, sharding)
  integer_time = all(isinstance(t, int) for t in plan.t)
  time_dtype = np.int32 if integer_time else np.float32
  timesteps = np.asarray(plan.t, time_dtype)
  slots = frame_slots(len(timesteps), num_frames)
  frames = None
  if num_frames:
    frames = (jnp.zeros((len(slots[slots >= 0]),) + shape, jnp.float32),) * 2
  read = dict(prediction=prediction, thresholding=thresholding, percentile=percentile)

  def body(carry, xs):
    x_t, state, frames = carry
    t, t_next, index, slot, sigma, aux = xs
    t_batch, t_next_batch = (jnp.full((shape[0],), v, time_dtype) for v in (t, t_next))
    output, variance_output = diffusion.split_output(denoise_fn(x_t, t_batch), learn_sigma)
    if sigma is None:
      x0, eps = denoised(schedule, x_t, t_batch, output, **read)
    else:
      x0, eps = denoised_at_sigma(sigma, x_t, output, **read)
    noise = None
    if sampler.uses_noise:
      noise = _step_noise(rng_steps, t if integer_time else index, shape, sharding)
    x_next, state = sampler.step(
      schedule,
      x_t,
      Denoised(x0, eps, variance_output),
      Step(t_batch, t_next_batch, index, aux),
      noise,
      state,
    )
    return (x_next, state, _record(frames, slot, x_t, x0)), None

  xs = (
    jnp.asarray(timesteps),
    jnp.asarray(np.asarray(plan.t_next, time_dtype)),
    jnp.arange(len(timesteps)),
    jnp.asarray(slots),
    None if plan.sigma is None else jnp.asarray(plan.sigma, jnp.float32),
    None if plan.aux is None else jnp.asarray(plan.aux, jnp.float32),
  )
  (x_final, _, frames), _ = jax.lax.scan(body, (x_t, sampler.init_state(x_t), frames), xs)
  if frames is None:
    return x_final
  return x_final, Trajectory(jnp.asarray(timesteps[slots >= 0]), *frames)


def run(
  sampler: Sampler,
  denoise_fn: Callable,
  schedule: DiffusionSchedule,
  shape: Sequence[int],
  rng: jax.Array,
  *,
  prediction: Prediction | str = "eps",
  learn_sigma: bool = False,
  thresholding: Thresholding | str = "static",
  threshold_percentile: float = 0.995,
  initial_noise: jnp.ndarray | None = None,
  num_frames: int = 0,
  sharding: jax.sharding.Sharding | None = None,
):
  """Samples with `sampler`, one `lax.scan` over its timesteps.

  Args:
    sampler: a `Sampler` (samplers/registry.py lists them by name).
    denoise_fn: (x_t [B, ...] float32, t [B] int32) -> eps, x_0 or v prediction.
    schedule: the coefficient table the model was trained with (concrete, not traced).
    shape: [B, H, W, C] of the samples.
    rng: PRNG key; see the module docstring for how it is used.
    prediction: what denoise_fn predicts: "eps", "x0" or "v".
    learn_sigma: denoise_fn outputs 2C channels, the prediction and its variance's raw v
      (Improved DDPM eq. 15), which samplers that add noise may use (their `variance` options).
    thresholding: "none", "static" (clip x_0 to [-1, 1]) or "dynamic" (`threshold_x0`).
    threshold_percentile: the quantile of |x_0| that dynamic thresholding scales by, in (0, 1].
    initial_noise: x_T to start from instead of drawing it from rng.
    num_frames: if > 0, also return a `Trajectory` of that many frames spread over the run.
    sharding: sharding of the batch (e.g. NamedSharding(mesh, P('data'))) kept inside the loop.

  Returns:
    Samples x_0 of `shape`, or (samples, Trajectory) when num_frames > 0.
  """
  if not isinstance(sampler, Sampler):
    raise TypeError(f"sampler must be a Sampler, got {type(sampler).__name__}.")
  if not isinstance(schedule, DiffusionSchedule):
    raise TypeError(f"schedule must be a DiffusionSchedule, got {type(schedule).__name__}.")
  shape = tuple(int(d) for d in shape)
  if initial_noise is not None and tuple(initial_noise.shape) != shape:
    raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}, expected {shape}.")
  prediction = parse_enum(Prediction, prediction, "prediction")
  thresholding = parse_enum(Thresholding, thresholding, "thresholding")
  if not 0.0 < float(threshold_percentile) <= 1.0:
    raise ValueError(f"threshold_percentile must be in (0, 1], got {threshold_percentile!r}.")
  if sampler.uses_learned_variance and not learn_sigma:
    raise ValueError(
      f"{sampler} uses a learned variance, but the network does not output one "
      "(learn_sigma=False; model.learn_sigma in a run config)."
    )
  plan = sampler.plan(schedule)
  check_start(schedule, plan.t)
  frame_slots(len(plan.t), num_frames)
  return _run(
    sampler,
    denoise_fn,
    schedule,
    shape,
    rng,
    initial_noise,
    plan=plan,
    prediction=prediction,
    learn_sigma=bool(learn_sigma),
    thresholding=thresholding,
    percentile=float(threshold_percentile),
    num_frames=int(num_frames),
    sharding=sharding,
  )
