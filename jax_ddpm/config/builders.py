"""A typed run config becomes the objects a run is made of, here and only here.

`build(run_config)` gives a `Run`: the U-Net's `UNetConfig`, the noise schedule, the optimizer and
its learning rate, the train step's options, the three samplers of a run (the config's, the
in-training measurement's and the training grids'), how samples are read and guided, and the
record saved beside every checkpoint. The checks that need these objects (the network's shapes,
the timesteps a sampler visits) run as they are built, so a config that builds is a config that
runs. Training, evaluation and sampling take the `Run`; none of them reads a config.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import optax

from jax_ddpm.data import captions
from jax_ddpm.diffusion import guidance, losses, schedules
from jax_ddpm.diffusion.likelihood import BoundOptions
from jax_ddpm.diffusion.process import Prediction, Variance
from jax_ddpm.diffusion.timesteps import TimestepSampling
from jax_ddpm.io.errors import ConfigError
from jax_ddpm.models.autoencoder import AutoencoderConfig
from jax_ddpm.models.prompted_unet import PromptedUNetConfig
from jax_ddpm.models.text_encoder import TextEncoderConfig, Tokenizer
from jax_ddpm.models.unet import RUNTIME_FIELDS, UNetConfig
from jax_ddpm.runtime import devices
from jax_ddpm.samplers import base, ddim, registry
from jax_ddpm.samplers.program import SamplingOptions
from jax_ddpm.training.step import EMARule, StepOptions

if TYPE_CHECKING:
  from jax_ddpm.config.run_config import RunConfig
  from jax_ddpm.config.sections import SamplingConfig
  from jax_ddpm.models.autoencoder import Codec


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A run config and what it becomes (see the module docstring)."""

  config: RunConfig
  unet: UNetConfig
  text: TextEncoderConfig | None  # a text model's encoder (model.prompts), else None
  schedule: schedules.DiffusionSchedule
  optimizer: optax.GradientTransformation
  step_options: StepOptions
  history_timesteps: int  # T when the state keeps a loss history (importance-sampled t), else 0
  sampler: base.Sampler
  measurement_sampler: base.Sampler
  grid_sampler: base.Sampler
  sampling_options: SamplingOptions
  bound: BoundOptions
  metadata: dict[str, Any]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    data = self.config.data
    return (data.image_size, data.image_size, data.channels)

  @property
  def sample_shape(self) -> tuple[int, int, int]:
    """What the diffusion runs on: the images, or the autoencoder's latents."""
    return (self.unet.image_size, self.unet.image_size, self.unet.in_channels)

  @property
  def network(self) -> UNetConfig | PromptedUNetConfig:
    """The denoiser: the U-Net, or the text encoder and the U-Net of a text model."""
    return self.unet if self.text is None else PromptedUNetConfig(self.unet, self.text)

  @functools.cached_property
  def codec(self) -> Codec | None:
    """The trained autoencoder of a latent run (autoencoder.checkpoint), read once; None for
    a run on pixels."""
    if not self.config.autoencoder.latent:
      return None
    from jax_ddpm.training import checkpointing  # noqa: PLC0415 (orbax: only when asked)

    checkpoint = self.config.autoencoder.checkpoint
    return checkpointing.load_codec(checkpoint, autoencoder_config(self.config))

  @property
  def decode(self):
    """Latents to images for a latent run (inside the sampling program), else None."""
    return None if self.codec is None else self.codec.decode

  @property
  def encode(self):
    """(images, key) to latents for a latent run (inside the train step), else None."""
    return None if self.codec is None else self.codec.encode

  def with_sampling(self, **keys) -> Run:
    """This run with some sampling keys changed (sampler, num_steps, seed, guidance_scale, ...),
    checked and built again."""
    return build(self.config.replace(sampling=keys))


def build(config: RunConfig) -> Run:
  """The Run of a typed run config; ConfigError names the key of anything that cannot be built."""
  if config.autoencoder.latent:
    autoencoder_config(config)  # the latent's shape, checked before the U-Net is sized by it
  schedule = build_schedule(config)
  chosen = sampler(
    config,
    config.sampling,
    schedule,
    f"sampling.sampler={config.sampling.sampler!r} on sampling.spacing={config.sampling.spacing!r}",
  )
  return Run(
    config=config,
    unet=unet_config(config),
    text=text_encoder_config(config),
    schedule=schedule,
    optimizer=optimizer(config),
    step_options=step_options(config),
    history_timesteps=history_timesteps(config),
    sampler=chosen,
    measurement_sampler=measurement_sampler(config, schedule, chosen),
    grid_sampler=grid_sampler(config, schedule),
    sampling_options=sampling_options(config),
    bound=bound_options(config),
    metadata=metadata(config),
  )


def unet_config(config: RunConfig) -> UNetConfig:
  """The U-Net of a run config; image size and channels come from config.data.

  A conditional model (model.num_classes = C) embeds C + 1 labels: the last is the null label of
  classifier-free guidance (guidance.null_label). A learned-variance model (model.learn_sigma)
  outputs 2C channels (process.split_output).
  """
  model, channels, size = config.model, config.data.channels, config.data.image_size
  if config.autoencoder.latent:  # the latent of f = 2^(len(ch_mult) - 1), z_channels deep
    size //= 2 ** (len(config.autoencoder.ch_mult) - 1)
    channels = config.autoencoder.z_channels
  unet = UNetConfig(
    image_size=size,
    in_channels=channels,
    out_channels=2 * channels if model.learn_sigma else channels,
    ch=model.ch,
    ch_mult=model.ch_mult,
    num_res_blocks=model.num_res_blocks,
    attn_resolutions=model.attn_resolutions,
    dropout=float(model.dropout),
    num_groups=model.num_groups,
    attention_head_dim=model.attention_head_dim,
    num_classes=None if model.num_classes is None else model.num_classes + 1,
    compute_dtype=compute_dtype(model.compute_dtype),
    remat=model.remat,
    context_dim=model.text_width if model.prompts else None,
  )
  unet.validate()
  return unet


def autoencoder_config(config: RunConfig) -> AutoencoderConfig:
  """The first-stage network the autoencoder section describes, for the data section's images;
  ConfigError names the key of a shape it cannot take."""
  section, data = config.autoencoder, config.data
  network = AutoencoderConfig(
    image_size=data.image_size,
    channels=data.channels,
    ch=section.ch,
    ch_mult=section.ch_mult,
    num_res_blocks=section.num_res_blocks,
    z_channels=section.z_channels,
    num_groups=section.num_groups,
    kl_weight=section.kl_weight,
  )
  network.validate()
  return network


def tokenizer(config: RunConfig) -> Tokenizer:
  """Word-level tokens over the digit captions' vocabulary (data/captions.py)."""
  return Tokenizer(captions.vocabulary(), config.model.max_tokens)


def text_encoder_config(config: RunConfig) -> TextEncoderConfig | None:
  """The text encoder of a text model (model.prompts), sized by model.text_*; else None."""
  model = config.model
  if not model.prompts:
    return None
  longest = max(len(text.split()) for text in captions.all_captions())
  if model.max_tokens < longest + 1:
    raise ConfigError(
      f"model.max_tokens={model.max_tokens} cannot hold the longest caption ({longest} words "
      "and the start token)."
    )
  return TextEncoderConfig(
    vocabulary_size=tokenizer(config).vocabulary_size,
    max_tokens=model.max_tokens,
    width=model.text_width,
    depth=model.text_depth,
    num_heads=model.text_heads,
  )


def caption_tokens(config: RunConfig) -> tuple[tuple[int, ...], ...] | None:
  """A text model's token ids of every caption by caption index, then of the empty prompt
  (the null label's row, what prompt dropout trains): [NUM_CAPTIONS + 1, max_tokens]."""
  if not config.model.prompts:
    return None
  ids, _ = tokenizer(config).encode([*captions.all_captions(), ""])
  return tuple(tuple(int(i) for i in row) for row in ids)


def compute_dtype(name: str, platform: str | None = None, cpu_bfloat16: bool | None = None) -> str:
  """model.compute_dtype with "auto" resolved for the devices this process runs on.

  "auto" is bfloat16 where the hardware multiplies it natively: TPUs, GPUs of compute
  capability 8.0 or newer, and CPUs with AMX or AVX512-BF16 (devices.native_bfloat16); float32
  elsewhere. Other names pass through (UNetConfig.validate checks them).
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
    cpu_bfloat16 = devices.native_bfloat16()
  return "bfloat16" if cpu_bfloat16 else "float32"


def build_schedule(config: RunConfig) -> schedules.DiffusionSchedule:
  """The forward process's beta_1..beta_T (config.diffusion)."""
  d = config.diffusion
  return schedules.get_schedule(
    d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end
  )


def learning_rate(config: RunConfig) -> optax.Schedule:
  """Linear warm-up from 0 to optim.learning_rate (DDPM Appendix B), then by optim.lr_decay.

  constant: the DDPM paper's. cosine: eta_t = eta/2 (1 + cos(pi (t - W) / (N - W))) from the end
  of warm-up W to training.num_train_steps N, reaching 0 at N (Loshchilov & Hutter 2017, eq. 5,
  one period without restarts; a run of N <= W steps ends in its warm-up). wsd
  (warmup-stable-decay: Hu et al. 2024, MiniCPM; Haegele et al. 2024): eta until the last
  D = round(optim.decay_fraction N) steps, then linearly to 0 at N. The rate is a function of the
  step alone, so a resumed run follows the same curve.
  """
  optim, total = config.optim, config.training.num_train_steps
  warmup = optim.warmup_steps
  if optim.lr_decay == "cosine":
    after = optax.cosine_decay_schedule(optim.learning_rate, max(total - warmup, 1))
  elif optim.lr_decay == "wsd":
    decay = round(optim.decay_fraction * total)
    after = optax.join_schedules(
      [
        optax.constant_schedule(optim.learning_rate),
        optax.linear_schedule(optim.learning_rate, 0.0, decay),
      ],
      [max(total - decay - warmup, 0)],
    )
  else:
    after = optax.constant_schedule(optim.learning_rate)
  if warmup == 0:
    return after
  return optax.join_schedules(
    [optax.linear_schedule(0.0, optim.learning_rate, warmup), after], [warmup]
  )


def optimizer(config: RunConfig) -> optax.GradientTransformation:
  """Adam with global-norm gradient clipping (optim.grad_clip_norm; 0 turns it off)."""
  optim = config.optim
  adam = optax.adam(learning_rate(config), b1=optim.adam_b1, b2=optim.adam_b2, eps=optim.adam_eps)
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adam)
  return adam


def loss_weights(config: RunConfig) -> tuple[float, ...] | None:
  """training.loss_weighting's weight per timestep, from the float64 betas; None if uniform."""
  training, d = config.training, config.diffusion
  if training.loss_weighting == losses.LossWeighting.UNIFORM:
    return None
  betas = schedules.BETA_SCHEDULES[d.schedule](d.num_timesteps, d.beta_start, d.beta_end)
  weights = losses.loss_weights(
    np.cumprod(1.0 - np.asarray(betas, np.float64)),
    training.loss_weighting,
    d.prediction,
    min_snr_gamma=training.min_snr_gamma,
    p2_gamma=training.p2_gamma,
    p2_k=training.p2_k,
  )
  return tuple(float(w) for w in weights)


def history_timesteps(config: RunConfig) -> int:
  """T when the state carries a per-timestep loss history (importance-sampled t), else 0."""
  importance = config.training.timestep_sampling == TimestepSampling.IMPORTANCE
  return config.diffusion.num_timesteps if importance else 0


def step_options(config: RunConfig) -> StepOptions:
  training = config.training
  return StepOptions(
    prediction=config.diffusion.prediction,
    ema=EMARule(decay=config.optim.ema_decay, warmup=config.optim.ema_warmup),
    learning_rate=learning_rate(config),
    num_classes=captions.NUM_CAPTIONS if config.model.prompts else config.model.num_classes,
    caption_tokens=caption_tokens(config),
    label_dropout=training.label_dropout,
    loss_weights=loss_weights(config),
    learn_sigma=config.model.learn_sigma,
    vlb_weight=training.vlb_weight,
    objective=training.objective,
    importance_sampling=history_timesteps(config) > 0,
    max_timestep=training.max_timestep,
    inject_nonfinite_at_steps=config.debug.inject_nonfinite_at_steps,
  )


def sampler(
  config: RunConfig, sampling: SamplingConfig, schedule: schedules.DiffusionSchedule, what: str
) -> base.Sampler:
  """The sampler a sampling section names, checked against the run: it must read what the
  network outputs, start where the schedule is noise and stay where the network was trained.
  `what` names the sampler's settings in messages."""
  chosen = registry.sampler_class(sampling.sampler, "sampling.sampler").from_config(sampling)
  chosen = chosen.trained_up_to(config.training.max_timestep)
  if (
    sampling.variance == Variance.LEARNED and chosen.uses_noise and not chosen.uses_learned_variance
  ):
    raise ConfigError(
      f"sampling.variance='learned': sampling.sampler={sampling.sampler!r} adds its own noise "
      "and does not read the network's variance; choose ddpm or ddim (eta > 0) to sample "
      "with it."
    )
  timesteps = chosen.timesteps(schedule)
  check_trained_timesteps(config, timesteps, what)
  base.check_start(
    schedule, timesteps, f"{what} under diffusion.schedule={config.diffusion.schedule!r}"
  )
  return chosen


def check_trained_timesteps(config: RunConfig, timesteps, what: str) -> None:
  """ConfigError when a sampler (`what`) visits a timestep above training.max_timestep, where
  the network was never trained."""
  max_timestep = config.training.max_timestep
  start = int(np.max(timesteps))
  if max_timestep is not None and start > max_timestep:
    raise ConfigError(
      f"{what} starts at t = {start}, above training.max_timestep={max_timestep}, where the "
      f"network was never trained: choose a spacing that starts at or below it (quadratic "
      f"starts at 0.8 T) or raise training.max_timestep."
    )


def measurement_sampler(
  config: RunConfig, schedule: schedules.DiffusionSchedule, chosen: base.Sampler
) -> base.Sampler:
  """The in-training measurement's sampler: the config's (`chosen`), with
  training.eval_num_steps network calls where that is > 0."""
  calls = config.training.eval_num_steps
  if not calls:
    return chosen
  sampling = dataclasses.replace(config.sampling, num_steps=calls)
  return sampler(
    config,
    sampling,
    schedule,
    f"The in-training measurement's sampler at training.eval_num_steps={calls}",
  )


def grid_sampler(config: RunConfig, schedule: schedules.DiffusionSchedule) -> base.Sampler:
  """The training run's own sample grids: deterministic DDIM in training.sample_ddim_steps steps
  on sampling.spacing, so that they visit the timesteps the config's sampler starts from."""
  steps = config.training.sample_ddim_steps
  grid = ddim.DDIM(num_steps=steps, spacing=config.sampling.spacing)
  timesteps = grid.timesteps(schedule)
  check_trained_timesteps(
    config,
    timesteps,
    f"The sample grid's DDIM-{steps} "
    f"(training.sample_ddim_steps) on sampling.spacing="
    f"{config.sampling.spacing!r}",
  )
  return grid


def conditioning(config: RunConfig) -> guidance.Conditioning | guidance.PromptConditioning | None:
  """The labels (or prompts) and guidance scale of a conditional model's samples; None if
  unconditional."""
  if config.model.prompts:
    return prompt_conditioning(config)
  if config.model.num_classes is None:
    return None
  return guidance.Conditioning(
    num_classes=config.model.num_classes,
    labels=config.sampling.class_labels(),
    guidance_scale=float(config.sampling.guidance_scale),
  )


def prompt_conditioning(config: RunConfig) -> guidance.PromptConditioning:
  """sampling.prompts (default: "a zero" to "a nine") tokenized, each checked against the
  vocabulary here, before anything is compiled."""
  sampling = config.sampling
  prompts = sampling.prompt_list() or captions.DEFAULT_PROMPTS
  if sampling.batch_size % len(prompts):
    raise ConfigError(
      f"sampling.batch_size={sampling.batch_size} must be a multiple of the "
      f"{len(prompts)} prompts of sampling.prompts, so that image n follows prompt n mod "
      f"{len(prompts)} in every batch."
    )
  words = tokenizer(config)
  try:
    ids, _ = words.encode(prompts)
  except ConfigError as error:
    raise ConfigError(f"sampling.prompts: {error}") from None
  empty, _ = words.encode([""])
  return guidance.PromptConditioning(
    prompts=prompts,
    ids=tuple(tuple(int(i) for i in row) for row in ids),
    empty_ids=tuple(int(i) for i in empty[0]),
    guidance_scale=float(sampling.guidance_scale),
  )


def sampling_options(config: RunConfig) -> SamplingOptions:
  """How each predicted x_0 is treated, and the labels and guidance of a conditional model."""
  sampling = config.sampling
  return SamplingOptions(
    prediction=config.diffusion.prediction,
    learn_sigma=config.model.learn_sigma,
    thresholding=sampling.thresholding,
    threshold_percentile=sampling.threshold_percentile,
    conditioning=conditioning(config),
  )


def bound_options(config: RunConfig) -> BoundOptions:
  """The bound's p_theta: the network's prediction, and its learned variance or the fixed one
  sampling.variance names."""
  learn_sigma = config.model.learn_sigma
  variance = Variance.LEARNED if learn_sigma else Variance(config.sampling.variance)
  return BoundOptions(
    prediction=Prediction(config.diffusion.prediction), variance=variance, learn_sigma=learn_sigma
  )


def metadata(config: RunConfig) -> dict[str, Any]:
  """The JSON saved beside each checkpoint: the architecture, the diffusion process and the
  whole config (what a workdir's checkpoints are checked against, and loaded with)."""
  model = dataclasses.asdict(unet_config(config))
  for runtime_choice in RUNTIME_FIELDS:
    model.pop(runtime_choice)
  meta = {
    "model": model,
    "diffusion": dataclasses.asdict(config.diffusion),
    "config": config.to_dict(),
  }
  text = text_encoder_config(config)
  if text is not None:
    meta["text"] = dataclasses.asdict(text)
  if config.autoencoder.latent:  # the first stage's architecture (its weights stay in its workdir)
    first_stage = dataclasses.asdict(config.autoencoder)
    meta["autoencoder"] = {
      k: first_stage[k] for k in ("ch", "ch_mult", "num_res_blocks", "z_channels")
    }
  return meta
