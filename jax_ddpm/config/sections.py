"""The sections of a run config as typed, frozen dataclasses: every key, its default, its
meaning and the checks on its own value (a name among the allowed ones, a range).

config/run_config.py assembles them into a RunConfig and checks the keys that constrain each other;
modules that need only one section (the data sources, the feature networks, the sampling program)
take it from here. Every error names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math

from jax_ddpm.data import sources
from jax_ddpm.diffusion import guidance, losses, schedules, timesteps
from jax_ddpm.diffusion.process import Prediction, Variance
from jax_ddpm.io.errors import ConfigError
from jax_ddpm.samplers import base as sampler_base
from jax_ddpm.samplers import karras

NONFINITE_POLICIES = ("halt", "skip")
LR_DECAYS = ("constant", "cosine", "wsd")
FEATURE_NETS = ("inception", "classifier")


def choice(value, allowed, key: str) -> None:
  """ConfigError unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ConfigError(f"Unknown {key} {value!r}; allowed values: {list(allowed)}.")


def positive_int(value, key: str) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f"{key} must be a positive integer, got {value!r}.")


def nonnegative_int(value, key: str) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ConfigError(f"{key} must be an integer >= 0, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """data: where training and reference images come from (jax_ddpm/data/sources.py).

  source: a name in data.sources.SOURCES; tfds_name, split, data_dir: a prepared TFDS dataset
  (source tfds); path: a directory of IDX files or images (source idx or folder); image_size,
  channels: the shape the source must yield (H = W); random_flip: horizontal flips (DDPM Sec. 4,
  CIFAR-10); fake_size: the number of random images of source fake.
  """

  source: str = "mnist_embedded"
  tfds_name: str = ""
  split: str = "train"
  data_dir: str = ""
  path: str = ""
  image_size: int = 28
  channels: int = 1
  random_flip: bool = False
  fake_size: int = 1024

  def __post_init__(self):
    choice(self.source, sources.SOURCES, "data.source")
    if self.channels not in (1, 3):
      raise ConfigError(f"data.channels must be 1 or 3, got {self.channels!r}.")
    positive_int(self.image_size, "data.image_size")
    if sources.SOURCES[self.source].needs_path and not self.path:
      raise ConfigError(f"data.source={self.source!r} needs data.path (a directory).")
    if self.source == "tfds" and not self.tfds_name:
      raise ConfigError("data.source='tfds' needs data.tfds_name (e.g. 'cifar10').")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """diffusion: the forward process. schedule: a name in schedules.BETA_SCHEDULES; num_timesteps:
  T; beta_start, beta_end: the ends of the linear, quadratic and sigmoid schedules; prediction:
  what the network predicts, eps (the paper), x0 or v."""

  schedule: str = "linear"
  num_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02
  prediction: str = "eps"

  def __post_init__(self):
    choice(self.schedule, sorted(schedules.BETA_SCHEDULES), "diffusion.schedule")
    choice(self.prediction, [p.value for p in Prediction], "diffusion.prediction")
    positive_int(self.num_timesteps, "diffusion.num_timesteps")
    if self.num_timesteps < 2:
      raise ConfigError("diffusion.num_timesteps must be at least 2.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """model: the U-Net (models/unet.py; image size and channels follow data).

  ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_groups, attention_head_dim (None:
  one head, as the paper): the network; num_classes: C for a class-conditional model on the
  data's labels 0..C-1 (None: unconditional); learn_sigma: also output the reverse variance
  (Improved DDPM eq. 15), trained by L_hybrid; compute_dtype: float32 | bfloat16 | auto (bfloat16
  where the hardware computes it natively); remat: recompute each block in the backward pass.
  prompts: a text-to-image model conditioned on the digits' captions (data/captions.py) through a
  text encoder of text_width, text_depth layers, text_heads heads and max_tokens tokens (the
  start token included), cross-attended by the U-Net (Rombach et al. 2022, Sec. 3.3).
  """

  ch: int = 32
  ch_mult: tuple[int, ...] = (1, 2, 2)
  num_res_blocks: int = 1
  attn_resolutions: tuple[int, ...] = (7,)
  dropout: float = 0.0
  num_groups: int = 8
  attention_head_dim: int | None = None
  num_classes: int | None = None
  learn_sigma: bool = False
  compute_dtype: str = "float32"
  remat: bool = False
  prompts: bool = False
  text_width: int = 64
  text_depth: int = 2
  text_heads: int = 4
  max_tokens: int = 6

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
    if self.num_classes is not None:
      positive_int(self.num_classes, "model.num_classes")
    for key in ("text_width", "text_depth", "text_heads", "max_tokens"):
      positive_int(getattr(self, key), f"model.{key}")
    if self.prompts and self.num_classes is not None:
      raise ConfigError(
        "model.prompts=True conditions on captions, which name the class already: "
        f"unset model.num_classes (now {self.num_classes})."
      )
    if self.text_width % self.text_heads:
      raise ConfigError(
        f"model.text_width={self.text_width} must be divisible by "
        f"model.text_heads={self.text_heads}."
      )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """optim: Adam with a linear warm-up from 0 to learning_rate over warmup_steps, then lr_decay:
  constant (DDPM) | cosine (to 0 at the last step) | wsd (held, then linearly to 0 over the last
  decay_fraction of the steps); grad_clip_norm (0: off); the weights' EMA (ema_decay; ema_warmup:
  min(decay, (1 + step) / (10 + step)), the original code's warm-up)."""

  learning_rate: float = 2e-4
  warmup_steps: int = 5000
  lr_decay: str = "constant"
  decay_fraction: float = 0.2
  grad_clip_norm: float = 1.0
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  ema_decay: float = 0.9999
  ema_warmup: bool = True

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ConfigError(f"optim.learning_rate must be > 0, got {self.learning_rate!r}.")
    if self.warmup_steps < 0 or self.grad_clip_norm < 0:
      raise ConfigError("optim.warmup_steps and optim.grad_clip_norm must be >= 0.")
    if self.lr_decay not in LR_DECAYS:
      raise ConfigError(
        f"optim.lr_decay must be 'constant', 'cosine' or 'wsd', got {self.lr_decay!r}."
      )
    if not 0.0 < self.decay_fraction <= 1.0:
      raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction!r}.")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ConfigError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay!r}.")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """training: the run and its loss.

  batch_size (global, over every device and process), num_train_steps, steps_per_dispatch (train
  steps per compiled call; 1 on CPU), log/checkpoint/sample_every_steps, keep_checkpoints;
  num_sample_images, sample_ddim_steps: the training grids (deterministic DDIM on
  sampling.spacing); eval_every_steps (0: off), eval_num_samples, eval_num_steps (0: the
  sampler's own), eval_classifier_steps: the in-training measurement of sample quality;
  label_dropout: a conditional model's labels replaced by the null label (Ho & Salimans 2022);
  loss_weighting (uniform | min_snr with min_snr_gamma | p2 with p2_gamma, p2_k), objective
  (simple | vlb), vlb_weight (lambda of L_hybrid), timestep_sampling (uniform | importance),
  max_timestep (train on t <= it only; None: every t); nonfinite_policy (halt | skip);
  restore_fallback: set an unreadable newest checkpoint aside and resume from the one before.
  """

  batch_size: int = 128
  num_train_steps: int = 800_000
  steps_per_dispatch: int = 1
  log_every_steps: int = 100
  checkpoint_every_steps: int = 5000
  keep_checkpoints: int = 3
  sample_every_steps: int = 10_000
  num_sample_images: int = 64
  sample_ddim_steps: int = 50
  eval_every_steps: int = 0
  eval_num_samples: int = 2048 + 256
  eval_num_steps: int = 0
  eval_classifier_steps: int = 300
  label_dropout: float = 0.1
  loss_weighting: str = "uniform"
  min_snr_gamma: float = 5.0
  p2_gamma: float = 1.0
  p2_k: float = 1.0
  vlb_weight: float = 0.001
  objective: str = "simple"
  timestep_sampling: str = "uniform"
  max_timestep: int | None = None
  nonfinite_policy: str = "halt"
  restore_fallback: bool = False

  def __post_init__(self):
    for key in (
      "batch_size",
      "num_train_steps",
      "steps_per_dispatch",
      "log_every_steps",
      "checkpoint_every_steps",
      "keep_checkpoints",
      "sample_every_steps",
      "num_sample_images",
      "sample_ddim_steps",
    ):
      positive_int(getattr(self, key), f"training.{key}")
    for key in ("eval_every_steps", "eval_num_steps", "eval_num_samples", "eval_classifier_steps"):
      nonnegative_int(getattr(self, key), f"training.{key}")
    k = self.steps_per_dispatch
    for key in (
      "num_train_steps",
      "log_every_steps",
      "checkpoint_every_steps",
      "sample_every_steps",
      "eval_every_steps",
    ):
      if getattr(self, key) % k:
        raise ConfigError(
          f"training.{key}={getattr(self, key)} must be a multiple of "
          f"training.steps_per_dispatch={k}."
        )
    choice(self.nonfinite_policy, NONFINITE_POLICIES, "training.nonfinite_policy")
    choice(self.loss_weighting, [w.value for w in losses.LossWeighting], "training.loss_weighting")
    for key in ("min_snr_gamma", "p2_gamma"):
      if not getattr(self, key) > 0:
        raise ConfigError(f"training.{key} must be > 0, got {getattr(self, key)!r}.")
    if not self.p2_k >= 0:
      raise ConfigError(f"training.p2_k must be >= 0, got {self.p2_k!r}.")
    if not 0 <= self.vlb_weight < float("inf"):
      raise ConfigError(f"training.vlb_weight must be >= 0, got {self.vlb_weight!r}.")
    choice(self.objective, [o.value for o in losses.Objective], "training.objective")
    choice(
      self.timestep_sampling,
      [s.value for s in timesteps.TimestepSampling],
      "training.timestep_sampling",
    )
    if not 0.0 <= self.label_dropout < 1.0:
      raise ConfigError(f"training.label_dropout must be in [0, 1), got {self.label_dropout!r}.")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """sampling: how images are drawn (samplers/).

  sampler: a name in samplers.registry; num_steps: S, the steps of the few-step samplers (ddpm
  visits all T), one network call each but heun's (2 S - 1 calls); eta: ddim's noise in [0, 1];
  spacing: uniform | quadratic | logsnr (ddim, dpmpp_2m, sde_dpmpp_2m, unipc); rho: the sigma
  grid's (EDM eq. 5) and sigma_to_t: interpolate | nearest (euler, heun, euler_ancestral);
  s_churn, s_tmin, s_tmax, s_noise: EDM Algorithm 2's stochasticity (euler, heun; s_churn = 0 is
  deterministic); variance: ddpm's sigma_t^2, fixed_large | fixed_small | learned; thresholding:
  none | static | dynamic (threshold_percentile); labels: grid | random | "3,3,7" (conditional
  models); prompts: "a thick seven; a thin slanted two" (a text model's prompts, separated by
  semicolons; empty: "a zero" to "a nine"); guidance_scale: classifier-free guidance w (1
  conditional, 0 unconditional, the empty prompt for a text model); use_ema,
  num_samples, batch_size (global, per compiled call), seed: what --mode=sample draws.
  """

  sampler: str = "ddim"
  num_steps: int = 50
  eta: float = 0.0
  spacing: str = "uniform"
  rho: float = 7.0
  sigma_to_t: str = "interpolate"
  s_churn: float = 0.0
  s_tmin: float = 0.0
  s_tmax: float = math.inf
  s_noise: float = 1.0
  variance: str = "fixed_large"
  thresholding: str = "static"
  threshold_percentile: float = 0.995
  labels: str = "grid"
  prompts: str = ""
  guidance_scale: float = 1.0
  use_ema: bool = True
  num_samples: int = 64
  batch_size: int = 64
  seed: int = 0

  def __post_init__(self):
    choice(self.variance, [v.value for v in Variance], "sampling.variance")
    choice(self.thresholding, [t.value for t in sampler_base.Thresholding], "sampling.thresholding")
    choice(self.spacing, [s.value for s in sampler_base.Spacing], "sampling.spacing")
    sampler_base.check_eta(self.eta, "sampling.eta")
    choice(self.sigma_to_t, [m.value for m in karras.SigmaToT], "sampling.sigma_to_t")
    if not isinstance(self.rho, (int, float)) or not self.rho > 0:
      raise ConfigError(
        f"sampling.rho must be > 0 (EDM eq. 5; 7 is the paper's), got {self.rho!r}."
      )
    karras.check_churn(self.s_churn, self.s_tmin, self.s_tmax, self.s_noise, "sampling.")
    if not 0.0 < self.threshold_percentile <= 1.0:
      raise ConfigError(
        f"sampling.threshold_percentile must be in (0, 1], got {self.threshold_percentile!r}."
      )
    positive_int(self.num_samples, "sampling.num_samples")
    positive_int(self.batch_size, "sampling.batch_size")
    guidance.check_guidance_scale(self.guidance_scale, "sampling.guidance_scale")

  def prompt_list(self) -> tuple[str, ...]:
    """prompts as a tuple ("a thick seven; a two" -> ("a thick seven", "a two")); empty: ()."""
    text = str(self.prompts).strip()
    if not text:
      return ()
    prompts = tuple(" ".join(p.split()) for p in text.split(";"))
    if any(not p for p in prompts):
      raise ConfigError(
        f"sampling.prompts={self.prompts!r} has an empty prompt between semicolons; write "
        "guidance_scale=0 for unconditional samples."
      )
    return prompts

  def class_labels(self) -> str | tuple[int, ...]:
    """labels as "grid", "random" or a tuple of classes ("3,3,7" -> (3, 3, 7))."""
    labels = str(self.labels).strip()
    if labels in guidance.LABEL_CHOICES:
      return labels
    try:
      return tuple(int(y) for y in labels.split(","))
    except ValueError:
      raise ConfigError(
        f"sampling.labels={self.labels!r} is not 'grid', 'random' or a "
        "comma-separated list of classes such as '3,3,7'."
      ) from None


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """eval: --mode=eval and the in-training measurement (evaluation/).

  feature_net: inception (FID) | classifier (feature distance in a digit classifier's
  features); num_samples (0 only with bits_per_dim), batch_size: images scored and the feature
  network's global batch; reference_split or reference_stats (an .npz of mu, sigma): the
  reference; samples: an .npz of images to score instead of drawing them; inception_weights,
  inception_score: the converted FID Inception and the Inception Score; classifier,
  classifier_steps, classifier_batch_size: the feature classifier; manifold_reference: reference
  images of precision, recall, density, coverage and KID (0: off), kid_subsets, kid_subset_size;
  bits_per_dim, bpd_split, bpd_images (0: all), bpd_timesteps (0: all T): the likelihood bound.
  """

  feature_net: str = "inception"
  num_samples: int = 10_000
  batch_size: int = 64
  reference_split: str = "train"
  reference_stats: str = ""
  samples: str = ""
  inception_weights: str = ""
  inception_score: bool = False
  classifier: str = ""
  manifold_reference: int = 10_000
  kid_subsets: int = 100
  kid_subset_size: int = 1000
  classifier_steps: int = 2000
  classifier_batch_size: int = 128
  bits_per_dim: bool = False
  bpd_split: str = "test"
  bpd_images: int = 0
  bpd_timesteps: int = 0

  def __post_init__(self):
    choice(self.feature_net, FEATURE_NETS, "eval.feature_net")
    if (
      not isinstance(self.num_samples, int)
      or self.num_samples < 0
      or (self.num_samples == 0 and not self.bits_per_dim)
    ):
      raise ConfigError(
        f"eval.num_samples must be a positive integer (or 0 with "
        f"eval.bits_per_dim=True), got {self.num_samples!r}."
      )
    positive_int(self.batch_size, "eval.batch_size")
    if not isinstance(self.bpd_images, int) or self.bpd_images < 0:
      raise ConfigError(
        f"eval.bpd_images must be an integer >= 0 (0: the whole split), got {self.bpd_images!r}."
      )


@dataclasses.dataclass(frozen=True)
class AutoencoderSection:
  """autoencoder: latent diffusion's first stage (Rombach et al. 2022, Sec. 3.1), trained by
  --mode=train_autoencoder in its own workdir (models/autoencoder.py, training/autoencoder.py).

  checkpoint: that workdir; when set, --mode=train trains the diffusion model on the latents of
  its newest checkpoint, and samples are decoded by it ("": the diffusion runs on pixels). ch,
  ch_mult (f = 2^(len - 1)), num_res_blocks, z_channels, num_groups, kl_weight: the network and
  the KL term's weight; num_train_steps, batch_size, learning_rate (Adam), log_every_steps,
  checkpoint_every_steps: its training; heldout_images: images kept out of its training
  (every k-th of the source) to measure reconstructions on; scale_images: training images the
  latent scale factor (1 / std of the latents, LDM Sec. 4.3.2) is measured on.
  """

  checkpoint: str = ""
  ch: int = 32
  ch_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 1
  z_channels: int = 2
  num_groups: int = 8
  kl_weight: float = 1e-6
  num_train_steps: int = 600
  batch_size: int = 64
  learning_rate: float = 1e-3
  log_every_steps: int = 50
  checkpoint_every_steps: int = 200
  heldout_images: int = 500
  scale_images: int = 1000

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
    for key in (
      "ch",
      "num_res_blocks",
      "z_channels",
      "num_groups",
      "num_train_steps",
      "batch_size",
      "log_every_steps",
      "checkpoint_every_steps",
      "heldout_images",
      "scale_images",
    ):
      positive_int(getattr(self, key), f"autoencoder.{key}")
    if not self.ch_mult:
      raise ConfigError("autoencoder.ch_mult must name at least one level, e.g. (1, 2).")
    if not self.learning_rate > 0 or not self.kl_weight >= 0:
      raise ConfigError(
        f"autoencoder.learning_rate must be > 0 and autoencoder.kl_weight >= 0, got "
        f"{self.learning_rate!r} and {self.kl_weight!r}."
      )

  @property
  def latent(self) -> bool:
    return bool(self.checkpoint)


@dataclasses.dataclass(frozen=True)
class DebugConfig:
  """debug: inject_nonfinite_at_steps makes these steps' loss NaN (fault injection, tests)."""

  inject_nonfinite_at_steps: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(
      self, "inject_nonfinite_at_steps", tuple(int(s) for s in self.inject_nonfinite_at_steps)
    )


SECTIONS = {
  "data": DataConfig,
  "diffusion": DiffusionConfig,
  "model": ModelConfig,
  "optim": OptimConfig,
  "training": TrainingConfig,
  "sampling": SamplingConfig,
  "eval": EvalConfig,
  "autoencoder": AutoencoderSection,
  "debug": DebugConfig,
}
