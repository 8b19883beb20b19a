"""jax_ddpm: denoising diffusion models (DDPM, DDIM and their successors) in JAX and Flax NNX.

The Python API, in three lines:

  >>> import jax_ddpm
  >>> model = jax_ddpm.load("runs/mnist")                     # a trained run's newest checkpoint
  >>> images = model.sample(16, sampler="dpmpp_2m", steps=20)  # uint8 [16, 28, 28, 1]
  >>> jax_ddpm.save_grid(images, "grid.png")

A text model (configs/mnist_text.py) takes prompts: `model.sample(prompts=["a thick seven"] * 8)`.

`train` trains (or resumes) a run from a config; `load` reads a run's checkpoint (any step, EMA or
trained weights); `load_diffusers` reads a diffusers UNet2DModel folder; `Model.sample` draws with
any registered sampler (`SAMPLERS`), any number of network calls, seed, labels or prompts and
guidance scale, the same images `--mode=sample` writes for the same settings; `save_grid` writes
a PNG.
Nothing is imported until it is used, so `import jax_ddpm` is cheap.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import numpy as np

if TYPE_CHECKING:
  import ml_collections

  from jax_ddpm.config.builders import Run
  from jax_ddpm.config.run_config import RunConfig
  from jax_ddpm.diffusion.schedules import DiffusionSchedule

# A shipped config's name or a config file, a ConfigDict, nested dicts of keys, or a RunConfig.
ConfigLike = Union[str, "ml_collections.ConfigDict", dict, "RunConfig"]


class Trajectory(NamedTuple):
  """A recorded sampling run (`Model.trajectory`): the timesteps of the recorded steps [K],
  x_t entering each and the predicted x_0 there (uint8 [K, N, H, W, C]), and the samples."""

  timesteps: np.ndarray
  x_t: np.ndarray
  x0: np.ndarray
  images: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """A diffusion model ready to sample: a run (its config and what it builds) and weights.

  config: the typed run config (`model.config.sampling`, ...). step: the checkpoint's step.
  """

  run: Run
  eval_graphdef: Any
  params: Any
  step: int
  state: Any = None  # the whole TrainState of a checkpoint (None for imported weights)
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def config(self) -> RunConfig:
    return self.run.config

  @property
  def schedule(self) -> DiffusionSchedule:
    """The noise schedule the model was trained with (betas, alphas_cumprod, ...)."""
    return self.run.schedule

  def sample(
    self,
    num_images: int | None = None,
    *,
    prompts: Sequence[str] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    labels: str | Sequence[int] | None = None,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
    **sampling: Any,
  ) -> np.ndarray:
    """`num_images` uint8 images [N, H, W, C] drawn with the run's sampling settings, changed by
    the arguments given: prompts (a text model: image n follows prompts[n], and num_images
    defaults to their number), sampler (one of SAMPLERS), steps (sampling.num_steps: the
    network calls, but heun's 2 steps - 1), seed, labels ("grid", "random" or classes, for a
    conditional model), guidance_scale (1: conditional, 0: unconditional), batch_size (images
    per compiled call), and any other sampling key (eta, spacing, s_churn, ...). Batch i is
    drawn from fold_in(key(seed), i): the images --mode=sample writes for the same settings and
    batch size, on any number of devices.

    >>> model.sample(10, labels=[3] * 10, guidance_scale=2.0).shape  # a conditional model
    (10, 28, 28, 1)
    >>> model.sample(prompts=["a thick slanted seven", "a thin two"]).shape  # a text model
    (2, 28, 28, 1)
    """
    import jax  # noqa: PLC0415

    from jax_ddpm.samplers import program  # noqa: PLC0415

    keys = dict(
      sampling,
      sampler=sampler,
      num_steps=steps,
      seed=seed,
      guidance_scale=guidance_scale,
      batch_size=batch_size,
      labels=labels
      if labels is None or isinstance(labels, str)
      else ",".join(str(int(y)) for y in labels),
    )
    if prompts is not None:
      prompts, num_images = _prompt_stream(prompts, num_images)
      # one batch holds each prompt once per block of P images, on any device count
      batch = batch_size or math.lcm(len(prompts), jax.device_count())
      keys.update(prompts="; ".join(prompts), batch_size=batch)
    elif num_images is None:
      raise TypeError("Model.sample needs num_images (or prompts).")
    run = self.run.with_sampling(**{k: v for k, v in keys.items() if v is not None})
    sampling = run.config.sampling
    return program.draw_images(
      self._sample_fn(run),
      self.params,
      jax.random.key(sampling.seed),
      num_images,
      sampling.batch_size,
    )[0]

  def _sample_fn(self, run: Run):
    """The compiled program of `run`'s sampling settings: one per sampler, options and batch."""
    from jax_ddpm.runtime import mesh  # noqa: PLC0415
    from jax_ddpm.samplers import program  # noqa: PLC0415

    sampling = run.config.sampling
    cache_key = (run.sampler, run.sampling_options, sampling.batch_size)
    if cache_key not in self._compiled:
      devices = mesh.data_mesh()
      mesh.check_divisible(sampling.batch_size, "sampling.batch_size", devices.size)
      self._compiled[cache_key] = program.make_sample_fn(
        self.eval_graphdef,
        run.schedule,
        (sampling.batch_size, *run.sample_shape),
        devices,
        run.sampler,
        run.sampling_options,
        decode=run.decode,
      )
    return self._compiled[cache_key]

  def trajectory(
    self, num_images: int = 8, *, frames: int | None = None, **sampling: Any
  ) -> Trajectory:
    """One sampling run of `num_images` that records `frames` of its steps (default: all):
    x_t entering each recorded step and the network's x_0 there, as uint8 (sampling keys as in
    `sample`).

    >>> path = model.trajectory(4, frames=10)
    >>> path.x_t.shape, path.timesteps[0]  # ((10, 4, 28, 28, 1), 800)
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from jax_ddpm.io import images as image_io  # noqa: PLC0415
    from jax_ddpm.runtime import mesh  # noqa: PLC0415
    from jax_ddpm.samplers import program  # noqa: PLC0415

    run = self.run.with_sampling(**sampling) if sampling else self.run
    if run.codec is not None:
      raise ValueError(
        "Model.trajectory records x_t, which a latent model (autoencoder.checkpoint) keeps in "
        "latents, not images; sample it with Model.sample."
      )
    devices = mesh.data_mesh()
    count = program.padded_count(num_images, devices)
    steps = len(run.sampler.timesteps(run.schedule))
    sample_fn = program.make_sample_fn(
      self.eval_graphdef,
      run.schedule,
      (count, *run.image_shape),
      devices,
      run.sampler,
      run.sampling_options,
      num_frames=frames or steps,
    )
    samples = sample_fn(self.params, jax.random.key(run.config.sampling.seed))
    path = samples.trajectory
    return Trajectory(
      np.asarray(path.timesteps),
      image_io.to_uint8(jnp.clip(path.x_t, -1, 1))[:, :num_images],
      image_io.to_uint8(path.x0)[:, :num_images],
      image_io.to_uint8(samples.images)[:num_images],
    )


def load(
  workdir: str, *, step: int | None = None, config: ConfigLike | None = None, ema: bool = True
) -> Model:
  """The model of a training run's checkpoint: the newest unless `step`, its EMA weights unless
  `ema=False`, built from the config saved beside it unless `config` is given.

  >>> model = jax_ddpm.load("runs/mnist", step=3000)
  """
  from jax_ddpm.training import checkpointing  # noqa: PLC0415

  if config is None:
    saved, step = checkpointing.read_saved_config(workdir, step)
    run = _build(_from_saved(saved))
  else:
    run = _build(config)
  eval_graphdef, state, step = checkpointing.load_checkpoint(run, workdir, step)
  return Model(run, eval_graphdef, state.ema_params if ema else state.params, step, state)


def load_diffusers(folder: str, config: ConfigLike) -> Model:
  """A diffusers UNet2DModel folder's weights (config.json and diffusion_pytorch_model
  .safetensors) as a model of `config`'s run (its schedule and sampler), e.g. Google's DDPM
  CIFAR-10 weights with configs/cifar10.py.

  >>> model = jax_ddpm.load_diffusers("ddpm-cifar10-32", "cifar10")
  """
  from flax import nnx  # noqa: PLC0415

  from jax_ddpm.models import diffusers_weights  # noqa: PLC0415
  from jax_ddpm.models.unet import UNet  # noqa: PLC0415

  run = _build(config)
  _, params = diffusers_weights.load_diffusers_unet(folder, run.unet)
  abstract = nnx.eval_shape(lambda: UNet(run.unet, rngs=nnx.Rngs(0)))
  abstract.eval()
  return Model(run, nnx.graphdef(abstract), params, step=0)


def train(config: ConfigLike, workdir: str) -> Model:
  """Trains the run `config` describes (a config file, a shipped config's name, a ConfigDict or
  a RunConfig), or resumes it from workdir's newest checkpoint; returns the trained model.

  >>> model = jax_ddpm.train("mnist", "runs/mnist")
  """
  from flax import nnx  # noqa: PLC0415

  from jax_ddpm.training import loop  # noqa: PLC0415
  from jax_ddpm.training import state as state_lib  # noqa: PLC0415

  run = _build(config)
  state = loop.train_and_evaluate(run, workdir)
  abstract = nnx.eval_shape(lambda: state_lib.network(run.network, nnx.Rngs(0)))
  abstract.eval()
  return Model(run, nnx.graphdef(abstract), state.ema_params, int(state.step), state)


def grid(
  images: np.ndarray, *, labels: np.ndarray | None = None, columns: int | None = None
) -> np.ndarray:
  """uint8 images [N, H, W, C] tiled into one uint8 image on white: `columns` wide (default:
  square), or one row per class with `labels`.

  >>> plt.imshow(jax_ddpm.grid(model.sample(16))[..., 0], cmap="gray")
  """
  from jax_ddpm.io import images as image_io  # noqa: PLC0415

  if labels is None:
    return image_io.image_grid(np.asarray(images), columns)
  return image_io.class_grid(np.asarray(images), np.asarray(labels))


def save_grid(
  images: np.ndarray,
  path: str,
  *,
  labels: np.ndarray | None = None,
  columns: int | None = None,
) -> str:
  """Writes `grid(images, labels=..., columns=...)` as a PNG, local or gs://; returns the path.

  >>> jax_ddpm.save_grid(model.sample(64), "grid.png")
  """
  from jax_ddpm.io import paths  # noqa: PLC0415

  paths.save_png(path, grid(images, labels=labels, columns=columns))
  return path


def load_config(name_or_path: str, **overrides: Any) -> RunConfig:
  """The typed run config of a shipped config's name ("mnist") or a config file, with keys
  changed by section: load_config("mnist", training={"num_train_steps": 100}).

  >>> jax_ddpm.load_config("mnist").model.ch
  16
  """
  return _typed(name_or_path).replace(**overrides)


def schedule(config_like: ConfigLike) -> DiffusionSchedule:
  """The noise schedule of a config (beta_t, alpha-bar_t and the rest, DDPM eq. 4).

  >>> jax_ddpm.schedule("mnist").alphas_cumprod[-1]  # about 4e-5: x_T is almost pure noise
  """
  from jax_ddpm.config import builders  # noqa: PLC0415

  return builders.build_schedule(_typed(config_like))


def training_images(config_like: ConfigLike, count: int) -> np.ndarray:
  """The first `count` uint8 images [N, H, W, C] of a config's training data.

  >>> jax_ddpm.training_images("mnist", 4).shape
  (4, 28, 28, 1)
  """
  from jax_ddpm.data import sources  # noqa: PLC0415

  data = _typed(config_like).data
  source = sources.create_source(data)
  sources.check_source_shape(source, data)
  return source.read(np.arange(min(count, len(source))))


def noised(
  images: np.ndarray, t: int | Sequence[int], schedule: DiffusionSchedule, seed: int = 0
) -> np.ndarray:
  """x_t ~ q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I) (DDPM eq. 4) of uint8
  images at timestep indices t (one, or one per image), clipped to uint8; one noise draw
  (`seed`) for all.

  >>> jax_ddpm.noised(images, 250, jax_ddpm.schedule("mnist"))
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from jax_ddpm.diffusion import process  # noqa: PLC0415
  from jax_ddpm.io import images as image_io  # noqa: PLC0415

  x0 = jnp.asarray(image_io.to_model_range(np.asarray(images)))
  t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (len(x0),))
  eps = jax.random.normal(jax.random.key(seed), x0.shape[1:])
  return image_io.to_uint8(jnp.clip(process.q_sample(schedule, x0, t, eps[None]), -1, 1))


def _prompt_stream(prompts: Sequence[str], num_images: int | None) -> tuple[list[str], int]:
  """The prompts of a sample call, one per image: image n follows prompts[n]."""
  if isinstance(prompts, str):
    prompts = [prompts]
  prompts = [" ".join(str(p).split()) for p in prompts]
  if not prompts:
    raise ValueError("prompts is empty: give at least one prompt (or leave it out).")
  if num_images is not None and num_images != len(prompts):
    raise ValueError(
      f"num_images={num_images} with {len(prompts)} prompts: each image follows its own prompt; "
      "leave num_images out, or repeat the prompts."
    )
  return prompts, len(prompts)


def _typed(config_like: ConfigLike) -> RunConfig:
  from jax_ddpm.config import run_config, shipped  # noqa: PLC0415

  if isinstance(config_like, str):
    config_like = shipped.load(config_like)
  if isinstance(config_like, dict):
    return run_config.from_dict(config_like)
  if isinstance(config_like, run_config.RunConfig):
    return config_like
  return run_config.from_config_dict(config_like)


def _build(config_like: ConfigLike) -> Run:
  from jax_ddpm.config import builders  # noqa: PLC0415

  return builders.build(_typed(config_like))


def _from_saved(saved: dict) -> RunConfig:
  """The RunConfig a checkpoint recorded; keys added since keep their defaults."""
  from jax_ddpm.config import run_config  # noqa: PLC0415

  return run_config.from_dict(saved, origin="saved config")


def __getattr__(name: str):
  if name == "SAMPLERS":  # the registry's names, read when asked for
    from jax_ddpm.samplers import registry  # noqa: PLC0415

    return tuple(registry.REGISTRY)
  if name == "SCHEDULES":  # diffusion.schedule's choices
    from jax_ddpm.diffusion import schedules  # noqa: PLC0415

    return tuple(schedules.BETA_SCHEDULES)
  raise AttributeError(f"module 'jax_ddpm' has no attribute {name!r}")


__all__ = [
  "Model",
  "SAMPLERS",
  "SCHEDULES",
  "Trajectory",
  "grid",
  "load",
  "load_config",
  "load_diffusers",
  "noised",
  "save_grid",
  "schedule",
  "train",
  "training_images",
]
