"""Up-front validation of a run's config: every error names the key and the allowed values.

Runs before any data is read, any file is written or anything is compiled.
"""

from __future__ import annotations

import numpy as np

from jax_ddpm.config import builders
from jax_ddpm.data import sources as data_sources
from jax_ddpm.diffusion import process as diffusion
from jax_ddpm.io import errors
from jax_ddpm import samplers
from jax_ddpm.diffusion import schedules
from jax_ddpm.diffusion.process import Prediction

NONFINITE_POLICIES = ("halt", "skip")


def _choice(value, allowed, key):
  if value not in allowed:
    raise errors.ConfigError(f"Unknown {key} {value!r}; allowed values: {list(allowed)}.")


def _positive_int(value, key):
  if not isinstance(value, int) or value <= 0:
    raise errors.ConfigError(f"{key} must be a positive integer, got {value!r}.")


def validate_model_and_diffusion(config) -> None:
  """The parts of a config that sampling and training both need."""
  _choice(config.data.source, data_sources.SOURCES, "data.source")
  _choice(config.diffusion.schedule, sorted(schedules.BETA_SCHEDULES), "diffusion.schedule")
  _choice(config.diffusion.prediction, [p.value for p in Prediction], "diffusion.prediction")
  _positive_int(config.diffusion.num_timesteps, "diffusion.num_timesteps")
  if config.diffusion.num_timesteps < 2:
    raise errors.ConfigError("diffusion.num_timesteps must be at least 2.")
  if config.data.channels not in (1, 3):
    raise errors.ConfigError(f"data.channels must be 1 or 3, got {config.data.channels!r}.")
  _positive_int(config.data.image_size, "data.image_size")
  try:
    builders.unet_config(config).validate()
  except ValueError as error:  # the model's own checks name the model.* keys
    raise errors.ConfigError(str(error)) from None
  validate_conditioning(config)
  max_timestep = config.training.max_timestep
  if max_timestep is not None and (not isinstance(max_timestep, int)
                                   or not 1 <= max_timestep < config.diffusion.num_timesteps):
    raise errors.ConfigError(f"training.max_timestep must be None (every t) or an integer in "
                             f"1..{config.diffusion.num_timesteps - 1} (T - 1), got "
                             f"{max_timestep!r}.")
  validate_sampling(config)


def check_trained_timesteps(config, sampler: samplers.Sampler, what: str) -> None:
  """ConfigError when `sampler` (named `what`) visits a timestep above training.max_timestep,
  where the network was never trained."""
  max_timestep = config.training.max_timestep
  if max_timestep is None:
    return
  start = int(np.max(sampler.timesteps(builders.schedule(config))))
  if start > max_timestep:
    raise errors.ConfigError(
        f"{what} starts at t = {start}, above training.max_timestep={max_timestep}, where the "
        f"network was never trained: choose a spacing that starts at or below it (quadratic "
        f"starts at 0.8 T) or raise training.max_timestep.")


def validate_conditioning(config) -> None:
  """model.num_classes, and the labels and guidance asked of its samples."""
  num_classes, sampling = config.model.num_classes, config.sampling
  if num_classes is None:
    if str(sampling.labels) != "grid" or sampling.guidance_scale != 1.0:
      raise errors.ConfigError(
          f"sampling.labels={sampling.labels!r} and sampling.guidance_scale="
          f"{sampling.guidance_scale!r} ask for labels, but the model is unconditional "
          "(model.num_classes is unset): set model.num_classes and train on labelled data.")
    return
  _positive_int(num_classes, "model.num_classes")
  if not 0.0 <= config.training.label_dropout < 1.0:
    raise errors.ConfigError(f"training.label_dropout must be in [0, 1), got "
                             f"{config.training.label_dropout!r}.")
  try:
    builders.conditioning(config)
  except ValueError as error:
    raise errors.ConfigError(str(error)) from None
  if sampling.guidance_scale != 1.0 and config.training.label_dropout == 0:
    raise errors.ConfigError(
        f"sampling.guidance_scale={sampling.guidance_scale!r} mixes in the unconditional model, "
        "which a model trained with training.label_dropout=0 never learnt.")


def validate_sampling(config) -> None:
  """The sampler's own checks (builders.sampler, Sampler.timesteps), as config errors."""
  sampling = config.sampling
  _choice(sampling.variance, [v.value for v in diffusion.Variance], "sampling.variance")
  if sampling.variance == diffusion.Variance.LEARNED and not config.model.learn_sigma:
    raise errors.ConfigError("sampling.variance='learned' needs a model that learns it: set "
                             "model.learn_sigma=True (and train it), or choose fixed_large or "
                             "fixed_small.")
  _choice(sampling.thresholding, [t.value for t in samplers.Thresholding], "sampling.thresholding")
  if not 0.0 < sampling.threshold_percentile <= 1.0:
    raise errors.ConfigError(f"sampling.threshold_percentile must be in (0, 1], got "
                             f"{sampling.threshold_percentile!r}.")
  try:
    schedule = builders.schedule(config)
  except ValueError as error:
    raise errors.ConfigError(f"diffusion: {error}") from None
  try:
    sampler = builders.sampler(config)
    timesteps = sampler.timesteps(schedule)
  except ValueError as error:  # "num_steps must be ...", "Unknown spacing ...": sampling.* keys
    message = str(error)
    if not message.startswith("Unknown sampling.sampler"):
      unknown = message.startswith("Unknown ")
      message = ("Unknown sampling." + message[len("Unknown "):] if unknown
                 else "sampling." + message) + f" (sampling.sampler={sampling.sampler!r})"
    raise errors.ConfigError(message) from None
  if (sampling.variance == diffusion.Variance.LEARNED and sampler.uses_noise
      and not sampler.uses_learned_variance):
    raise errors.ConfigError(
        f"sampling.variance='learned': sampling.sampler={sampling.sampler!r} adds its own noise "
        "and does not read the network's variance; choose ddpm or ddim (eta > 0) to sample "
        "with it.")
  check_trained_timesteps(config, sampler, f"sampling.sampler={sampling.sampler!r} on "
                                          f"sampling.spacing={sampling.spacing!r}")
  try:
    samplers.check_start(schedule, timesteps)
  except ValueError as error:
    raise errors.ConfigError(
        f"sampling.spacing={sampling.spacing!r} under diffusion.schedule="
        f"{config.diffusion.schedule!r}: {error}") from None


def validate_training(config, num_devices: int, num_processes: int) -> None:
  """Everything `train_and_evaluate` relies on, for a mesh of `num_devices` devices."""
  validate_model_and_diffusion(config)
  training = config.training
  for key in ("batch_size", "num_train_steps", "steps_per_dispatch", "log_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "sample_every_steps",
              "num_sample_images", "sample_ddim_steps"):
    _positive_int(training[key], f"training.{key}")
  if training.batch_size % num_devices:
    raise errors.ConfigError(
        f"training.batch_size={training.batch_size} (the global batch) must be divisible by "
        f"the number of devices, {num_devices}, so that each device gets an equal share.")
  if training.batch_size % num_processes:
    raise errors.ConfigError(f"training.batch_size={training.batch_size} must be divisible by the "
                     f"number of processes, {num_processes}.")
  k = training.steps_per_dispatch
  for key in ("num_train_steps", "log_every_steps", "checkpoint_every_steps",
              "sample_every_steps"):
    if training[key] % k:
      raise errors.ConfigError(f"training.{key}={training[key]} must be a multiple of "
                       f"training.steps_per_dispatch={k}.")
  if training.sample_ddim_steps > config.diffusion.num_timesteps:
    raise errors.ConfigError(f"training.sample_ddim_steps={training.sample_ddim_steps} exceeds "
                     f"diffusion.num_timesteps={config.diffusion.num_timesteps}.")
  check_trained_timesteps(config, builders.grid_sampler(config),
                          f"The sample grid's DDIM-{training.sample_ddim_steps} "
                          f"(training.sample_ddim_steps) on sampling.spacing="
                          f"{config.sampling.spacing!r}")
  if training.eval_every_steps and training.eval_num_steps:
    check_trained_timesteps(config, builders.measurement_sampler(config),
                            f"The in-training measurement's sampler at training.eval_num_steps="
                            f"{training.eval_num_steps}")
  _choice(training.nonfinite_policy, NONFINITE_POLICIES, "training.nonfinite_policy")
  _validate_objective(config)
  _validate_optimizer(config.optim)
  if config.data.source in ("idx", "folder") and not config.data.path:
    raise errors.ConfigError(f"data.source={config.data.source!r} needs data.path (a directory).")
  if config.data.source == "tfds" and not config.data.tfds_name:
    raise errors.ConfigError("data.source='tfds' needs data.tfds_name (e.g. 'cifar10').")


def _validate_objective(config) -> None:
  """training's loss: weighting, objective and how t is drawn, and that they fit together."""
  training = config.training
  _choice(training.loss_weighting, [w.value for w in diffusion.LossWeighting],
          "training.loss_weighting")
  for key in ("min_snr_gamma", "p2_gamma"):
    if not training[key] > 0:
      raise errors.ConfigError(f"training.{key} must be > 0, got {training[key]!r}.")
  if not 0 <= training.vlb_weight < float("inf"):
    raise errors.ConfigError(f"training.vlb_weight must be >= 0, got {training.vlb_weight!r}.")
  _choice(training.objective, [o.value for o in diffusion.Objective], "training.objective")
  _choice(training.timestep_sampling, [s.value for s in diffusion.TimestepSampling],
          "training.timestep_sampling")
  vlb = training.objective == diffusion.Objective.VLB
  if vlb and not config.model.learn_sigma:
    raise errors.ConfigError("training.objective='vlb' trains the bound's learned variance: set "
                             "model.learn_sigma=True.")
  if vlb and training.loss_weighting != diffusion.LossWeighting.UNIFORM:
    raise errors.ConfigError(f"training.objective='vlb' is the bound itself; "
                             f"training.loss_weighting={training.loss_weighting!r} would change "
                             "it: use 'uniform'.")
  truncated = (training.max_timestep is not None
               and training.max_timestep < config.diffusion.num_timesteps - 1)
  if truncated and (vlb or config.model.learn_sigma):
    raise errors.ConfigError(f"training.max_timestep={training.max_timestep} leaves the bound's "
                             "terms above it untrained, and L_vlb (training.objective='vlb', or "
                             "L_hybrid with model.learn_sigma) sums all T of them: unset it (or "
                             "set T - 1).")
  if training.timestep_sampling == diffusion.TimestepSampling.IMPORTANCE and not vlb:
    raise errors.ConfigError("training.timestep_sampling='importance' balances the terms of "
                             "L_vlb (Improved DDPM Sec. 3.3): set training.objective='vlb'.")
  if not training.p2_k >= 0:
    raise errors.ConfigError(f"training.p2_k must be >= 0, got {training.p2_k!r}.")


def _validate_optimizer(optim) -> None:
  """optim: Adam's step and its schedule, clipping and the EMA decay."""
  if not optim.learning_rate > 0:
    raise errors.ConfigError(f"optim.learning_rate must be > 0, got {optim.learning_rate!r}.")
  if optim.warmup_steps < 0 or optim.grad_clip_norm < 0:
    raise errors.ConfigError("optim.warmup_steps and optim.grad_clip_norm must be >= 0.")
  if optim.lr_decay not in ("constant", "cosine", "wsd"):
    raise errors.ConfigError(f"optim.lr_decay must be 'constant', 'cosine' or 'wsd', got "
                             f"{optim.lr_decay!r}.")
  if not 0.0 < optim.decay_fraction <= 1.0:
    raise errors.ConfigError(f"optim.decay_fraction must be in (0, 1], got "
                             f"{optim.decay_fraction!r}.")
  if not 0.0 <= optim.ema_decay < 1.0:
    raise errors.ConfigError(f"optim.ema_decay must be in [0, 1), got {optim.ema_decay!r}.")
