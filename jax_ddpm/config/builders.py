"""A run config becomes objects here, and only here.

configs/*.py -> the U-Net's `UNetConfig`, the noise schedule, the optimizer and its learning
rate, the EMA rule, the train step's options, the sampler and the sampler's options. The modules
below the drivers (train_step, make_sample_fn, samplers, state.create_train_state) take these
typed objects, never the ConfigDict; the drivers (train.py, sample_mode.py, evaluate.py,
visualize.py, state.load_checkpoint) call the builders. config_checks.py calls them too, so a
config that builds is a config that runs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_ddpm.diffusion import process as diffusion
from jax_ddpm.diffusion import guidance
from jax_ddpm.runtime import devices as host_devices
from jax_ddpm import samplers
from jax_ddpm.diffusion import schedules
from jax_ddpm.models.unet import UNetConfig
from jax_ddpm.diffusion.schedules import DiffusionSchedule, get_schedule


def unet_config(config) -> UNetConfig:
  """The U-Net of a run config; image size and channels come from config.data.

  A conditional model (model.num_classes = C) embeds C + 1 labels: the last is the null label
  of classifier-free guidance (guidance.null_label). A learned-variance model
  (model.learn_sigma) outputs 2C channels (diffusion.split_output).
  """
  model = config.model
  channels = int(config.data.channels)
  return UNetConfig(
      image_size=int(config.data.image_size),
      in_channels=channels,
      out_channels=2 * channels if model.learn_sigma else channels,
      ch=int(model.ch),
      ch_mult=tuple(int(m) for m in model.ch_mult),
      num_res_blocks=int(model.num_res_blocks),
      attn_resolutions=tuple(int(r) for r in model.attn_resolutions),
      dropout=float(model.dropout),
      num_groups=int(model.num_groups),
      attention_head_dim=model.attention_head_dim,
      num_classes=None if model.num_classes is None else int(model.num_classes) + 1,
      compute_dtype=compute_dtype(str(model.compute_dtype)),
      remat=bool(model.remat),
  )


def compute_dtype(name: str, platform: Optional[str] = None,
                  cpu_bfloat16: Optional[bool] = None) -> str:
  """model.compute_dtype with "auto" resolved for the devices this process runs on.

  "auto" is bfloat16 where the hardware multiplies it natively: TPUs, GPUs of compute
  capability 8.0 or newer, and CPUs with AMX or AVX512-BF16 (host_devices.native_bfloat16;
  measured 0-12% faster there depending on the run, 14-22% slower on an AVX2 CPU,
  benchmarks/NOTES.md 2 and 11); float32 elsewhere. Other names pass through
  (UNetConfig.validate checks them).
  """
  if name != "auto":
    return name
  device = jax.devices()[0]
  platform = platform or device.platform
  if platform == "tpu":
    return "bfloat16"
  if platform == "gpu":
    capability = getattr(device, "compute_capability", "0")
    return "bfloat16" if float(capability) >= 8.0 else "float32"
  if cpu_bfloat16 is None:
    cpu_bfloat16 = host_devices.native_bfloat16()
  return "bfloat16" if cpu_bfloat16 else "float32"


def schedule(config) -> DiffusionSchedule:
  """The forward process's beta_1..beta_T (config.diffusion); ValueError names a bad one."""
  d = config.diffusion
  return get_schedule(d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)


def learning_rate(config) -> optax.Schedule:
  """Linear warm-up from 0 to optim.learning_rate (DDPM Appendix B), then by optim.lr_decay.

  constant: the DDPM paper's. cosine: eta_t = eta/2 (1 + cos(pi (t - W) / (N - W))) from the end
  of warm-up W to training.num_train_steps N, reaching 0 at N (Loshchilov & Hutter 2017, eq. 5,
  one period without restarts; a run of N <= W steps ends in its warm-up). wsd
  (warmup-stable-decay: Hu et al. 2024, MiniCPM; Haegele et al. 2024): eta until the last
  D = round(optim.decay_fraction N) steps, then linearly to 0 at N. The rate is a function of
  the step alone, so a resumed run follows the same curve; changing num_train_steps on resume
  bends it from there on.
  """
  optim = config.optim
  warmup = optim.warmup_steps
  if optim.lr_decay == "cosine":
    after = optax.cosine_decay_schedule(optim.learning_rate,
                                        max(config.training.num_train_steps - warmup, 1))
  elif optim.lr_decay == "wsd":
    total = config.training.num_train_steps
    decay = round(optim.decay_fraction * total)
    after = optax.join_schedules(
        [optax.constant_schedule(optim.learning_rate),
         optax.linear_schedule(optim.learning_rate, 0.0, decay)], [max(total - decay - warmup, 0)])
  else:
    after = optax.constant_schedule(optim.learning_rate)
  if warmup == 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, optim.learning_rate, warmup), after], [warmup])


def optimizer(config) -> optax.GradientTransformation:
  """Adam with global-norm gradient clipping (optim.grad_clip_norm; 0 turns it off)."""
  optim = config.optim
  adam = optax.adam(learning_rate(config), b1=optim.adam_b1, b2=optim.adam_b2, eps=optim.adam_eps)
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adam)
  return adam


@dataclasses.dataclass(frozen=True)
class EMARule:
  """The weights' exponential moving average: ema <- d_t ema + (1 - d_t) params.

  d_t = decay, or with warmup min(decay, (1 + t) / (10 + t)) at step t (the original DDPM code's
  tf.train.ExponentialMovingAverage with num_updates), so early averages forget the random init.
  """
  decay: float
  warmup: bool

  def decay_at(self, step: jax.Array) -> jax.Array:
    decay = jnp.asarray(self.decay, jnp.float32)
    if self.warmup:
      step = jnp.asarray(step).astype(jnp.float32)
      decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


def ema_rule(config) -> EMARule:
  return EMARule(decay=float(config.optim.ema_decay), warmup=bool(config.optim.ema_warmup))


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What one train step reads besides the schedule and the optimizer.

  prediction: what the network predicts (eps | x0 | v, diffusion.Prediction).
  learning_rate: the optimizer's schedule, reported in the step's metrics.
  num_classes: classes of a conditional model (None: unconditional).
  label_dropout: probability that a label is replaced by the null label (Ho & Salimans 2022).
  loss_weights: per-timestep weights of the squared error (diffusion.loss_weights), or None for
    the unweighted loss.
  learn_sigma: the network also outputs its variance, trained by L_hybrid with lambda =
    vlb_weight (diffusion.training_losses).
  objective: simple (L_simple or L_hybrid) | vlb (L_vlb alone), diffusion.Objective.
  importance_sampling: t drawn by importance from the state's loss history
    (timestep_sampling.py), each example's loss weighted by 1 / (T p_t).
  max_timestep: t drawn uniformly from {0..max_timestep} instead of {0..T-1} (None: all T).
  inject_nonfinite_at_steps: fault injection for the tests (a NaN loss at these steps).
  """
  prediction: str
  ema: EMARule
  learning_rate: optax.Schedule
  num_classes: Optional[int] = None
  label_dropout: float = 0.0
  loss_weights: Optional[tuple[float, ...]] = None
  learn_sigma: bool = False
  vlb_weight: float = 0.0
  objective: str = "simple"
  importance_sampling: bool = False
  max_timestep: Optional[int] = None
  inject_nonfinite_at_steps: tuple[int, ...] = ()


def loss_weights(config) -> Optional[tuple[float, ...]]:
  """training.loss_weighting's weight per timestep, from the float64 betas; None if uniform."""
  training, d = config.training, config.diffusion
  if training.loss_weighting == diffusion.LossWeighting.UNIFORM:
    return None
  betas = schedules.BETA_SCHEDULES[d.schedule](d.num_timesteps, d.beta_start, d.beta_end)
  weights = diffusion.loss_weights(
      np.cumprod(1.0 - np.asarray(betas, np.float64)), training.loss_weighting,
      d.prediction, min_snr_gamma=float(training.min_snr_gamma),
      p2_gamma=float(training.p2_gamma), p2_k=float(training.p2_k))
  return tuple(float(w) for w in weights)


def history_timesteps(config) -> int:
  """T when the state carries a per-timestep loss history (importance-sampled t), else 0."""
  sampling = config.training.timestep_sampling
  return (int(config.diffusion.num_timesteps)
          if sampling == diffusion.TimestepSampling.IMPORTANCE else 0)


def step_options(config) -> StepOptions:
  return StepOptions(prediction=str(config.diffusion.prediction), ema=ema_rule(config),
                     learning_rate=learning_rate(config), num_classes=config.model.num_classes,
                     label_dropout=float(config.training.label_dropout),
                     loss_weights=loss_weights(config),
                     learn_sigma=bool(config.model.learn_sigma),
                     vlb_weight=float(config.training.vlb_weight),
                     objective=str(config.training.objective),
                     importance_sampling=history_timesteps(config) > 0,
                     max_timestep=config.training.max_timestep,
                     inject_nonfinite_at_steps=tuple(config.debug.inject_nonfinite_at_steps))


def sampler(config) -> samplers.Sampler:
  """The sampler config.sampling names (the one place the name is read: samplers.from_config)."""
  return samplers.from_config(config.sampling)


def measurement_sampler(config) -> samplers.Sampler:
  """The sampler of the in-training measurement: config.sampling's, with
  training.eval_num_steps network calls where that is > 0."""
  sampling = config.sampling
  if config.training.eval_num_steps:
    sampling = sampling.copy_and_resolve_references()
    sampling.num_steps = config.training.eval_num_steps
  return samplers.from_config(sampling)


def grid_sampler(config) -> samplers.Sampler:
  """The training run's own sample grids: deterministic DDIM in training.sample_ddim_steps steps
  on sampling.spacing, so that they visit the timesteps the config's sampler starts from."""
  return samplers.DDIM(num_steps=config.training.sample_ddim_steps,
                       spacing=config.sampling.spacing)


def conditioning(config) -> Optional[guidance.Conditioning]:
  """The labels and guidance scale of a conditional model's samples; None if unconditional.

  sampling.labels is "grid", "random" or a comma-separated list of classes ("3,3,7").
  ValueError names a bad sampling.labels or sampling.guidance_scale.
  """
  if config.model.num_classes is None:
    return None
  labels = str(config.sampling.labels).strip()
  if labels not in guidance.LABEL_CHOICES:
    try:
      labels = tuple(int(y) for y in labels.split(","))
    except ValueError:
      raise ValueError(f"sampling.labels={config.sampling.labels!r} is not 'grid', 'random' or "
                       "a comma-separated list of classes such as '3,3,7'.") from None
  return guidance.Conditioning(num_classes=int(config.model.num_classes), labels=labels,
                               guidance_scale=float(config.sampling.guidance_scale))


def sampling_options(config) -> dict:
  """sampling.make_sample_fn's keyword arguments: how each predicted x_0 is treated, and the
  labels and guidance of a conditional model."""
  return dict(prediction=str(config.diffusion.prediction),
              learn_sigma=bool(config.model.learn_sigma),
              thresholding=str(config.sampling.thresholding),
              threshold_percentile=float(config.sampling.threshold_percentile),
              conditioning=conditioning(config))
