"""The run config: the sections of config/sections.py assembled into one RunConfig, the checks
between sections, and the conversions from and to ConfigDicts and plain dicts.

configs/*.py are ml_collections ConfigDicts, so that any key can be overridden on the command line
(`--config.training.batch_size=64`). `from_config_dict` turns one into a `RunConfig` here, and no
module below config/ reads a ConfigDict. Each section checks its own keys when it is built;
`RunConfig` checks the keys that constrain each other; what depends on built objects (the
sampler's timesteps, the network's shapes) is checked where config/builders.py builds them, and
what depends on the machine (device counts, files) where the run starts. Every error names the
key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import ml_collections

from jax_ddpm.config.sections import (
  SECTIONS,
  AutoencoderSection,
  DataConfig,
  DebugConfig,
  DiffusionConfig,
  EvalConfig,
  ModelConfig,
  OptimConfig,
  SamplingConfig,
  TrainingConfig,
)
from jax_ddpm.data import sources
from jax_ddpm.diffusion import guidance, likelihood, losses, timesteps
from jax_ddpm.diffusion.process import Variance
from jax_ddpm.io.errors import ConfigError
from jax_ddpm.samplers import base as sampler_base


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run config: seed (data order, noise and dropout derive from it and the step) and
  the sections above; its checks are those between sections."""

  seed: int = 0
  data: DataConfig = DataConfig()
  diffusion: DiffusionConfig = DiffusionConfig()
  model: ModelConfig = ModelConfig()
  optim: OptimConfig = OptimConfig()
  training: TrainingConfig = TrainingConfig()
  sampling: SamplingConfig = SamplingConfig()
  eval: EvalConfig = EvalConfig()
  autoencoder: AutoencoderSection = AutoencoderSection()
  debug: DebugConfig = DebugConfig()

  def __post_init__(self):
    self._check_conditioning()
    self._check_prompts()
    self._check_latent()
    self._check_objective()
    T = self.diffusion.num_timesteps  # noqa: N806 (the paper's symbol)
    max_timestep = self.training.max_timestep
    if max_timestep is not None and (
      not isinstance(max_timestep, int) or not 1 <= max_timestep < T
    ):
      raise ConfigError(
        f"training.max_timestep must be None (every t) or an integer in "
        f"1..{T - 1} (T - 1), got {max_timestep!r}."
      )
    if self.sampling.variance == Variance.LEARNED and not self.model.learn_sigma:
      raise ConfigError(
        "sampling.variance='learned' needs a model that learns it: set "
        "model.learn_sigma=True (and train it), or choose fixed_large or "
        "fixed_small."
      )
    if self.sampling.sampler != "ddpm":
      sampler_base.check_num_steps(self.sampling.num_steps, T, "sampling.num_steps")
    if self.training.sample_ddim_steps > T:
      raise ConfigError(
        f"training.sample_ddim_steps={self.training.sample_ddim_steps} exceeds "
        f"diffusion.num_timesteps={T}."
      )
    self._check_measurement()
    if self.eval.bits_per_dim:
      likelihood.check_strata(T, self.eval.bpd_timesteps, "eval.bpd_timesteps")

  def _check_conditioning(self) -> None:
    """model.num_classes (or model.prompts), and the labels and guidance asked of samples."""
    sampling = self.sampling
    conditional = self.model.prompts or self.model.num_classes is not None
    if conditional and sampling.guidance_scale != 1.0 and self.training.label_dropout == 0:
      raise ConfigError(
        f"sampling.guidance_scale={sampling.guidance_scale!r} mixes in the unconditional "
        "model (the null label, or the empty prompt), which a model trained with "
        "training.label_dropout=0 never learnt."
      )
    if self.model.prompts:
      return
    if self.model.num_classes is None:
      if str(sampling.labels) != "grid" or sampling.guidance_scale != 1.0:
        raise ConfigError(
          f"sampling.labels={sampling.labels!r} and sampling.guidance_scale="
          f"{sampling.guidance_scale!r} ask for labels, but the model is unconditional "
          "(model.num_classes is unset): set model.num_classes and train on labelled data."
        )
      return
    guidance.check_labels(sampling.class_labels(), self.model.num_classes, "sampling.labels")

  def _check_prompts(self) -> None:
    """A text model's data (labelled digits, unflipped) and the prompts asked of it."""
    model, sampling, data = self.model, self.sampling, self.data
    if not model.prompts:
      if sampling.prompt_list():
        raise ConfigError(
          f"sampling.prompts={sampling.prompts!r} asks for prompts, but the model has no text "
          "encoder: set model.prompts=True (and train it on captioned digits)."
        )
      return
    if not sources.SOURCES[data.source].labelled or data.channels != 1:
      labelled = [name for name, info in sources.SOURCES.items() if info.labelled]
      raise ConfigError(
        f"model.prompts=True trains on captions written from one-channel labelled digits; "
        f"data.source={data.source!r} with data.channels={data.channels} is not (labelled "
        f"sources: {labelled})."
      )
    if data.random_flip:
      raise ConfigError(
        "model.prompts=True with data.random_flip=True: a mirrored digit leans the other way "
        "than its caption says. Set data.random_flip=False."
      )

  def _check_latent(self) -> None:
    """What a latent diffusion run (autoencoder.checkpoint set) cannot do on latents."""
    if not self.autoencoder.latent:
      return
    if self.eval.bits_per_dim:
      raise ConfigError(
        "eval.bits_per_dim=True bounds the likelihood of the diffusion's data, here the "
        f"latents of autoencoder.checkpoint={self.autoencoder.checkpoint!r}, not of the "
        "images: unset one of them."
      )
    if self.sampling.thresholding != "none":
      raise ConfigError(
        f"sampling.thresholding={self.sampling.thresholding!r} clips each predicted x_0 to the "
        "pixels' [-1, 1], but a latent run's x_0 is a latent of unit variance that goes beyond "
        "it: set sampling.thresholding='none'."
      )
    if self.model.learn_sigma:
      raise ConfigError(
        "model.learn_sigma=True is trained by the bound on pixels (L_hybrid); latent "
        "diffusion (autoencoder.checkpoint) trains L_simple: unset model.learn_sigma."
      )

  def _check_objective(self) -> None:
    """training's objective, weighting and timestep draw against the model."""
    training = self.training
    vlb = training.objective == losses.Objective.VLB
    if vlb and not self.model.learn_sigma:
      raise ConfigError(
        "training.objective='vlb' trains the bound's learned variance: set model.learn_sigma=True."
      )
    if vlb and training.loss_weighting != losses.LossWeighting.UNIFORM:
      raise ConfigError(
        f"training.objective='vlb' is the bound itself; "
        f"training.loss_weighting={training.loss_weighting!r} would change it: "
        "use 'uniform'."
      )
    truncated = (
      training.max_timestep is not None and training.max_timestep < self.diffusion.num_timesteps - 1
    )
    if truncated and (vlb or self.model.learn_sigma):
      raise ConfigError(
        f"training.max_timestep={training.max_timestep} leaves the bound's terms "
        "above it untrained, and L_vlb (training.objective='vlb', or L_hybrid "
        "with model.learn_sigma) sums all T of them: unset it (or set T - 1)."
      )
    if training.timestep_sampling == timesteps.TimestepSampling.IMPORTANCE and not vlb:
      raise ConfigError(
        "training.timestep_sampling='importance' balances the terms of L_vlb "
        "(Improved DDPM Sec. 3.3): set training.objective='vlb'."
      )

  def _check_measurement(self) -> None:
    """The in-training measurement's feature network against the data."""
    training = self.training
    if not training.eval_every_steps or self.eval.feature_net != "classifier":
      return
    if not training.eval_classifier_steps:
      raise ConfigError(
        "training.eval_classifier_steps must be > 0: the in-training "
        "measurement trains its classifier for that many steps."
      )
    if not sources.SOURCES[self.data.source].labelled:
      labelled = [name for name, info in sources.SOURCES.items() if info.labelled]
      raise ConfigError(
        f"training.eval_every_steps with eval.feature_net='classifier' trains a classifier on "
        f"labelled data; data.source={self.data.source!r} has no labels this project reads "
        f"(labelled: {labelled}). Use eval.feature_net='inception'."
      )

  def to_dict(self) -> dict[str, Any]:
    """The nested dict of every key (JSON-ready but for tuples): checkpoints store it."""
    return dataclasses.asdict(self)

  def replace(self, **sections: dict[str, Any]) -> RunConfig:
    """A copy with some keys of some sections changed: replace(sampling={"num_steps": 20})."""
    changed = {
      name: dataclasses.replace(getattr(self, name), **keys) for name, keys in sections.items()
    }
    return dataclasses.replace(self, **changed)


def from_dict(values: dict[str, Any], origin: str = "config") -> RunConfig:
  """A RunConfig from nested dicts of keys; keys left out keep their defaults, unknown keys are
  refused by name. `origin` names where the values come from in messages."""
  unknown = sorted(set(values) - set(SECTIONS) - {"seed"})
  if unknown:
    raise ConfigError(f"Unknown {origin} section(s) {unknown}; allowed: {['seed', *SECTIONS]}.")
  sections = {}
  for name, section in SECTIONS.items():
    keys = dict(values.get(name) or {})
    fields = {f.name: f for f in dataclasses.fields(section)}
    strangers = sorted(set(keys) - set(fields))
    if strangers:
      raise ConfigError(
        f"Unknown {origin} key(s) {[f'{name}.{k}' for k in strangers]}; the "
        f"keys of {name}: {sorted(fields)}."
      )
    hints = typing.get_type_hints(section)
    sections[name] = section(**{k: _typed(v, hints[k]) for k, v in keys.items()})
  return RunConfig(seed=int(values.get("seed", 0)), **sections)


def _typed(value, hint):
  """JSON and ConfigDict values in the field's type: lists become tuples."""
  if isinstance(value, list):
    return tuple(value)
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def from_config_dict(config: ml_collections.ConfigDict) -> RunConfig:
  """The typed RunConfig of a ConfigDict (configs/*.py with command-line overrides)."""
  return from_dict(config.to_dict())


def default_config_dict() -> ml_collections.ConfigDict:
  """Every key with its default, as the ConfigDict that configs/default.py starts from.

  Keys that default to None are placeholders of their type, so the command line can set them
  (--config.model.num_classes=10).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  for name, section in SECTIONS.items():
    hints = typing.get_type_hints(section)
    values = ml_collections.ConfigDict()
    for field in dataclasses.fields(section):
      default = getattr(section(), field.name)
      if default is None:
        default = ml_collections.config_dict.placeholder(typing.get_args(hints[field.name])[0])
      values[field.name] = default
    config[name] = values
  return config
