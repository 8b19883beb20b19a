"""Reverse-process samplers: DDPM ancestral sampling and DDIM, each one compiled `lax.scan`.

The samplers know nothing about networks: they take `denoise_fn(x_t, t) -> output`, where t is an
int32 array of shape [batch] of timestep indices and the output is an eps, x_0 or v prediction.
The scan body is traced once, so compile cost does not depend on the number of steps.

Noise stream: with rng split into (rng_init, rng_steps), x_T ~ N(0, I) is drawn from rng_init
and the noise added when leaving timestep index t from fold_in(rng_steps, t). Both samplers share
this convention, so DDIM with S = T and eta = 1 follows DDPM ("fixed_small") step for step.

To sample a Flax model without baking its weights into the program as constants, call these
functions inside your own `jax.jit` that takes the weights as an argument (see sampling.py).
"""

from __future__ import annotations

import enum
import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_ddpm import diffusion
from jax_ddpm.diffusion import Prediction, Variance, parse_enum
from jax_ddpm.schedules import DiffusionSchedule


class Spacing(str, enum.Enum):
  """How DDIM picks its S timesteps out of T."""
  UNIFORM = "uniform"  # every (T // S)-th index from 0, as the DDIM code's "uniform" skip
  QUADRATIC = "quadratic"  # int(linspace(0, sqrt(0.8 T), S)^2), the DDIM paper's CIFAR-10 choice


class Trajectory(NamedTuple):
  """A thinned record of one sampling run: frame k holds the state after leaving timesteps[k].

  x_t[k] is the sample entering that step and x0[k] the network's prediction of x_0 there.
  """
  timesteps: jnp.ndarray  # [K] int32
  x_t: jnp.ndarray  # [K, *shape]
  x0: jnp.ndarray  # [K, *shape]


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: Spacing | str) -> np.ndarray:
  """The S increasing timestep indices DDIM visits (it visits them in reverse)."""
  spacing = parse_enum(Spacing, spacing, "spacing")
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be an integer in 1..{num_timesteps} (T), got {num_steps!r}.")
  if spacing == Spacing.UNIFORM:
    return np.arange(num_steps, dtype=np.int32) * (num_timesteps // num_steps)
  # As the DDIM code: for large S the first indices repeat (0, 0, 1, 3, ...). A step from t to
  # the same t leaves x_t unchanged (sigma = 0 and alpha-bar_prev = alpha-bar_t in eq. 12), so
  # repeats cost a network call but keep the paper's timesteps exactly.
  return (np.linspace(0.0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int32)


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


def ddpm_step(schedule: DiffusionSchedule, output, x_t, t, noise, *, variance: Variance,
              prediction: Prediction, clip_denoised: bool):
  """One ancestral step x_t -> x_{t-1}, DDPM Algorithm 2 line 4; returns (x_{t-1}, predicted x_0).

  t: [B] int32 timestep indices; noise: z ~ N(0, I) of x_t's shape, ignored where t = 0.
  """
  mean, log_variance, x0 = diffusion.p_mean_variance(
      schedule, x_t, t, output, prediction=prediction, variance=variance,
      clip_denoised=clip_denoised)
  nonzero = (t > 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return mean + nonzero * jnp.exp(0.5 * log_variance) * noise, x0


def ddim_step(schedule: DiffusionSchedule, output, x_t, t, t_prev, noise, *, eta: float,
              prediction: Prediction, clip_denoised: bool):
  """One DDIM step x_t -> x_{t_prev}, Song et al. 2021 eq. (12); returns (x_{t_prev}, x_0).

  t, t_prev: [B] int32 indices with t_prev < t; t_prev = -1 means alpha-bar = 1 (the data).
  noise: N(0, I) of x_t's shape, or None when eta = 0.
  """
  x0, eps = diffusion.x0_and_eps_from_output(schedule, x_t, t, output, prediction)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
    # Recompute eps from the clipped x_0 so that eq. (12) stays consistent with x_t.
    eps = diffusion.predict_eps_from_x0(schedule, x_t, t, x0)
  # log alpha-bar at t and t_prev; t_prev = -1 reads the appended log 1 = 0.
  log_alpha_bar = diffusion.extract(schedule.log_alphas_cumprod, t, x_t.ndim)
  log_with_data = jnp.append(schedule.log_alphas_cumprod, 0.0)
  t_prev = jnp.where(t_prev < 0, schedule.num_timesteps, t_prev)
  log_alpha_bar_prev = diffusion.extract(log_with_data, t_prev, x_t.ndim)
  # The differences 1 - alpha-bar are ~1e-4 near the data; expm1 keeps them exact in float32.
  one_minus_alpha_bar = -jnp.expm1(log_alpha_bar)
  one_minus_alpha_bar_prev = -jnp.expm1(log_alpha_bar_prev)
  one_minus_ratio = -jnp.expm1(log_alpha_bar - log_alpha_bar_prev)  # 1 - alpha-bar_t/alpha-bar_prev
  # DDIM eq. (16): sigma_t(eta)^2; eta = 1 gives the DDPM posterior variance of eq. (7).
  sigma_squared = eta**2 * one_minus_alpha_bar_prev / one_minus_alpha_bar * one_minus_ratio
  # DDIM eq. (12): predicted x_0, direction pointing to x_t, random noise. The direction's
  # coefficient sqrt(1 - alpha-bar_prev - sigma^2) is factored to avoid cancellation.
  direction_coef_squared = one_minus_alpha_bar_prev * (
      1.0 - eta**2 * one_minus_ratio / one_minus_alpha_bar)
  direction = jnp.sqrt(jnp.maximum(direction_coef_squared, 0.0)) * eps
  sigma = jnp.sqrt(sigma_squared)
  x_prev = jnp.exp(0.5 * log_alpha_bar_prev) * x0 + direction
  if noise is not None:
    x_prev = x_prev + sigma * noise
  return x_prev, x0


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


def _run_scan(step_fn, x_t, xs, slots, shape):
  """Runs `step_fn(x_t, x) -> (x_prev, x0)` over xs, recording frames at `slots`."""
  num_frames = int((slots >= 0).sum())
  frames = None
  if num_frames:
    frames = (jnp.zeros((num_frames,) + shape, jnp.float32),
              jnp.zeros((num_frames,) + shape, jnp.float32))

  def body(carry, x):
    x_t, frames = carry
    slot = x[-1]
    x_prev, x0 = step_fn(x_t, x[:-1])
    return (x_prev, _record(frames, slot, x_t, x0)), None

  xs = tuple(xs) + (jnp.asarray(slots),)
  (x_final, frames), _ = jax.lax.scan(body, (x_t, frames), xs)
  return x_final, frames


def _check_common(schedule, shape, initial_noise, prediction):
  if not isinstance(schedule, DiffusionSchedule):
    raise TypeError(f"schedule must be a DiffusionSchedule, got {type(schedule).__name__}.")
  shape = tuple(int(d) for d in shape)
  if initial_noise is not None and tuple(initial_noise.shape) != shape:
    raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}, expected {shape}.")
  return shape, parse_enum(Prediction, prediction, "prediction")


@functools.partial(jax.jit, static_argnames=(
    "denoise_fn", "shape", "variance", "prediction", "clip_denoised", "num_frames", "sharding"))
def _ddpm_sample(denoise_fn, schedule, shape, rng, initial_noise, *, variance, prediction,
                 clip_denoised, num_frames, sharding):
  x_t, rng_steps = _initial_state(rng, shape, initial_noise, sharding)
  timesteps = np.arange(schedule.num_timesteps - 1, -1, -1, dtype=np.int32)
  slots = frame_slots(len(timesteps), num_frames)

  def step(x_t, x):
    (t,) = x
    t_batch = jnp.full((shape[0],), t, jnp.int32)
    noise = _step_noise(rng_steps, t, shape, sharding)
    return ddpm_step(schedule, denoise_fn(x_t, t_batch), x_t, t_batch, noise, variance=variance,
                     prediction=prediction, clip_denoised=clip_denoised)

  x0, frames = _run_scan(step, x_t, (jnp.asarray(timesteps),), slots, shape)
  if frames is None:
    return x0
  return x0, Trajectory(jnp.asarray(timesteps[slots >= 0]), *frames)


def ddpm_sample(denoise_fn: Callable, schedule: DiffusionSchedule, shape: Sequence[int],
                rng: jax.Array, *, variance: Variance | str = "fixed_large",
                prediction: Prediction | str = "eps", clip_denoised: bool = True,
                initial_noise: Optional[jnp.ndarray] = None, num_frames: int = 0,
                sharding: Optional[jax.sharding.Sharding] = None):
  """Ancestral sampling through all T steps, DDPM Algorithm 2.

  Args:
    denoise_fn: (x_t [B, ...] float32, t [B] int32) -> eps, x_0 or v prediction.
    schedule: the coefficient table the model was trained with.
    shape: [B, H, W, C] of the samples.
    rng: PRNG key; see the module docstring for how it is used.
    variance: "fixed_large" (beta_t, the original CIFAR-10 choice and sampling.variance's
      default) or "fixed_small" (beta~_t, which DDIM with eta = 1 and S = T reproduces).
    prediction: what denoise_fn predicts: "eps", "x0" or "v".
    clip_denoised: clip each predicted x_0 to [-1, 1] before taking the posterior mean.
    initial_noise: x_T to start from instead of drawing it from rng.
    num_frames: if > 0, also return a `Trajectory` of that many frames spread over the run.
    sharding: sharding of the batch (e.g. NamedSharding(mesh, P('data'))) kept inside the loop.

  Returns:
    Samples x_0 of `shape`, or (samples, Trajectory) when num_frames > 0.
  """
  shape, prediction = _check_common(schedule, shape, initial_noise, prediction)
  variance = parse_enum(Variance, variance, "variance")
  frame_slots(schedule.num_timesteps, num_frames)
  return _ddpm_sample(denoise_fn, schedule, shape, rng, initial_noise, variance=variance,
                      prediction=prediction, clip_denoised=bool(clip_denoised),
                      num_frames=int(num_frames), sharding=sharding)


@functools.partial(jax.jit, static_argnames=(
    "denoise_fn", "shape", "num_steps", "eta", "spacing", "prediction", "clip_denoised",
    "num_frames", "sharding"))
def _ddim_sample(denoise_fn, schedule, shape, rng, initial_noise, *, num_steps, eta, spacing,
                 prediction, clip_denoised, num_frames, sharding):
  x_t, rng_steps = _initial_state(rng, shape, initial_noise, sharding)
  visited = ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
  timesteps = visited[::-1].copy()
  previous = np.append(-1, visited[:-1])[::-1].copy()  # -1 stands for alpha-bar = 1
  slots = frame_slots(len(timesteps), num_frames)

  def step(x_t, x):
    t, t_prev = x
    t_batch = jnp.full((shape[0],), t, jnp.int32)
    noise = _step_noise(rng_steps, t, shape, sharding) if eta > 0 else None
    return ddim_step(schedule, denoise_fn(x_t, t_batch), x_t, t_batch,
                     jnp.full((shape[0],), t_prev, jnp.int32), noise, eta=eta,
                     prediction=prediction, clip_denoised=clip_denoised)

  xs = (jnp.asarray(timesteps), jnp.asarray(previous))
  x0, frames = _run_scan(step, x_t, xs, slots, shape)
  if frames is None:
    return x0
  return x0, Trajectory(jnp.asarray(timesteps[slots >= 0]), *frames)


def ddim_sample(denoise_fn: Callable, schedule: DiffusionSchedule, shape: Sequence[int],
                rng: jax.Array, *, num_steps: int = 50, eta: float = 0.0,
                spacing: Spacing | str = "uniform", prediction: Prediction | str = "eps",
                clip_denoised: bool = True, initial_noise: Optional[jnp.ndarray] = None,
                num_frames: int = 0, sharding: Optional[jax.sharding.Sharding] = None):
  """DDIM sampling in S steps, Song et al. 2021, eq. (12) with sigma from eq. (16).

  eta = 0 is the deterministic DDIM sampler; eta = 1 with S = T is DDPM with "fixed_small".
  Arguments as `ddpm_sample`, plus:
    num_steps: S, in 1..T.
    eta: in [0, 1], scales the noise of eq. (16).
    spacing: "uniform" or "quadratic"; see `Spacing`.
  """
  shape, prediction = _check_common(schedule, shape, initial_noise, prediction)
  spacing = parse_enum(Spacing, spacing, "spacing")
  ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
  if not 0.0 <= float(eta) <= 1.0:
    raise ValueError(f"eta must be in [0, 1], got {eta!r}.")
  frame_slots(num_steps, num_frames)
  return _ddim_sample(denoise_fn, schedule, shape, rng, initial_noise, num_steps=int(num_steps),
                      eta=float(eta), spacing=spacing, prediction=prediction,
                      clip_denoised=bool(clip_denoised), num_frames=int(num_frames),
                      sharding=sharding)
