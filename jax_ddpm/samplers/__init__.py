"""Reverse-process samplers: one interface, each run as one compiled `lax.scan`, chosen by name.

The samplers know nothing about networks: they take `denoise_fn(x_t, t) -> output`, where t is an
int32 array of shape [batch] of timestep indices and the output is an eps, x_0 or v prediction.

  ddpm      Ho et al. 2020, Algorithm 2 (ddpm.py)
  ddim      Song et al. 2021, eq. (12) and (16) (ddim.py)
  dpmpp_2m  DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (dpm_solver.py)
  sde_dpmpp_2m  its stochastic form, SDE-DPM-Solver++(2M) (dpm_solver.py)

Adding a sampler: a file with a frozen-dataclass subclass of `base.Sampler` (its options, their
checks in `__post_init__`, `from_config`, `timesteps`, `step`, and `init_state` if it keeps
state across steps), plus its line in REGISTRY.

To sample a Flax model without baking its weights into the program as constants, call `run`
inside your own `jax.jit` that takes the weights as an argument (see sampling.py).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jax_ddpm.diffusion.process import Prediction, Variance
from jax_ddpm.samplers.base import (Sampler, Spacing, Thresholding, Trajectory, check_start,
                                    frame_slots, run, threshold_x0, timestep_indices)
from jax_ddpm.samplers.ddim import DDIM, ddim_step
from jax_ddpm.samplers.ddpm import DDPM, ddpm_step
from jax_ddpm.samplers.dpm_solver import DPMSolverPP2M, SDEDPMSolverPP2M
from jax_ddpm.diffusion.schedules import DiffusionSchedule

REGISTRY: dict[str, type[Sampler]] = {
    DDPM.name: DDPM,
    DDIM.name: DDIM,
    DPMSolverPP2M.name: DPMSolverPP2M,
    SDEDPMSolverPP2M.name: SDEDPMSolverPP2M,
}


def from_config(sampling) -> Sampler:
  """The sampler a `sampling` config section names, with its options; ValueError if unknown."""
  if sampling.sampler not in REGISTRY:
    raise ValueError(f"Unknown sampling.sampler {sampling.sampler!r}; allowed values: "
                     f"{list(REGISTRY)}.")
  return REGISTRY[sampling.sampler].from_config(sampling)


def ddpm_sample(denoise_fn: Callable, schedule: DiffusionSchedule, shape: Sequence[int],
                rng: jax.Array, *, variance: Variance | str = "fixed_large",
                initial_noise: Optional[jnp.ndarray] = None, **options):
  """`run` with DDPM(variance); options as `run` (prediction, thresholding, num_frames, ...)."""
  return run(DDPM(variance=variance), denoise_fn, schedule, shape, rng,
             initial_noise=initial_noise, **options)


def ddim_sample(denoise_fn: Callable, schedule: DiffusionSchedule, shape: Sequence[int],
                rng: jax.Array, *, num_steps: int = 50, eta: float = 0.0,
                spacing: Spacing | str = "uniform", learned_variance: bool = False,
                initial_noise: Optional[jnp.ndarray] = None, **options):
  """`run` with DDIM(num_steps, eta, spacing, learned_variance); options as `run`."""
  return run(DDIM(num_steps=num_steps, eta=eta, spacing=spacing,
                  learned_variance=learned_variance), denoise_fn, schedule, shape,
             rng, initial_noise=initial_noise, **options)


def dpm_solver_sample(denoise_fn: Callable, schedule: DiffusionSchedule, shape: Sequence[int],
                      rng: jax.Array, *, num_steps: int = 20, spacing: Spacing | str = "logsnr",
                      order: int = 2, initial_noise: Optional[jnp.ndarray] = None, **options):
  """`run` with DPMSolverPP2M(num_steps, spacing, order); options as `run`."""
  return run(DPMSolverPP2M(num_steps=num_steps, spacing=spacing, order=order), denoise_fn,
             schedule, shape, rng, initial_noise=initial_noise, **options)


__all__ = ["DDIM", "DDPM", "DPMSolverPP2M", "Prediction", "REGISTRY", "SDEDPMSolverPP2M", "Sampler",
           "Spacing", "Thresholding", "Trajectory", "ddim_sample", "ddim_step", "ddpm_sample",
           "ddpm_step", "dpm_solver_sample", "frame_slots", "from_config", "run", "threshold_x0",
           "timestep_indices"]
