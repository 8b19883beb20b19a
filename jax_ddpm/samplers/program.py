"""The compiled sampling program of a network, and drawing images with it.

`make_sample_fn` compiles one program per (shape, sampler, options): the network's weights are an
argument, so another checkpoint of the same network reuses it. `draw_batch` is the one way images
are drawn: batch i from fold_in(key, i), gathered from every process as uint8, so --mode=sample
(which writes them), --mode=eval and the in-training measurement (which score them in memory),
the Python API and the benchmarks see the same images for the same seed, whatever the device
count. A conditional model is guided by classifier-free guidance (diffusion/guidance.py), a text
model by the same guidance with the empty prompt; a latent model's samples are decoded by its
autoencoder inside the program.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ddpm.diffusion import guidance
from jax_ddpm.diffusion.schedules import DiffusionSchedule
from jax_ddpm.io import images as image_io
from jax_ddpm.runtime import mesh as mesh_lib
from jax_ddpm.samplers import base

if TYPE_CHECKING:
  from jax_ddpm.config.builders import Run

LABEL_STREAM = 0x1ABE1  # the labels of a batch are drawn from fold_in(its key, LABEL_STREAM)


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How a network's outputs are read while sampling: what it predicts (eps | x0 | v), whether it
  also outputs its variance (learn_sigma), the thresholding of each predicted x_0, and for a
  conditional model the labels and guidance scale, for a text model its prompts (None:
  unconditional)."""

  prediction: str = "eps"
  learn_sigma: bool = False
  thresholding: str = "static"
  threshold_percentile: float = 0.995
  conditioning: guidance.Conditioning | guidance.PromptConditioning | None = None

  @property
  def prompts(self) -> tuple[str, ...] | None:
    """A text model's prompts (the labels of its samples index them), else None."""
    if isinstance(self.conditioning, guidance.PromptConditioning):
      return self.conditioning.prompts
    return None


class Samples(NamedTuple):
  """One batch drawn by a sample function."""

  images: jax.Array  # float32 [B, H, W, C] in [-1, 1]
  # int32 [B], the classes asked of a conditional model (a text model: the prompts' indices)
  labels: jax.Array | None = None
  trajectory: base.Trajectory | None = None  # with num_frames > 0


def make_sample_fn(
  eval_graphdef: nnx.GraphDef,
  schedule: DiffusionSchedule,
  shape: tuple[int, ...],
  mesh: jax.sharding.Mesh,
  sampler: base.Sampler,
  options: SamplingOptions = SamplingOptions(),
  *,
  num_frames: int = 0,
  decode: Callable | None = None,
) -> Callable:
  """A jitted fn(params, rng) -> Samples of `shape`, the batch sharded over the mesh.

  A conditional model (options.conditioning) is asked for its batch_labels (a text model: its
  prompts) and guided with its guidance_scale. decode: a latent model's first stage, applied to
  the samples (the trajectory stays in latents). Every argument is checked here, before the
  first (long) compile.
  """
  sharding = mesh_lib.batch_sharding(mesh)
  run_options = dict(
    prediction=options.prediction,
    learn_sigma=options.learn_sigma,
    thresholding=options.thresholding,
    threshold_percentile=options.threshold_percentile,
    num_frames=num_frames,
    sharding=sharding,
  )

  def sample(params, rng):
    model = nnx.merge(eval_graphdef, params)
    labels, denoise = conditioned(model, options, rng, shape[0])
    output = base.run(sampler, denoise, schedule, shape, rng, **run_options)
    images, trajectory = output if num_frames else (output, None)
    if decode is not None:
      images = decode(images)
    return Samples(images, labels, trajectory)

  def stand_in(x_t, t):
    return jnp.concatenate([x_t] * (2 if options.learn_sigma else 1), axis=-1)

  jax.eval_shape(
    lambda: base.run(sampler, stand_in, schedule, shape, jax.random.key(0), **run_options)
  )
  return jax.jit(sample, out_shardings=None)


def conditioned(model, options: SamplingOptions, rng: jax.Array, batch: int):
  """(the labels or prompt indices asked of a batch, or None; the denoiser the sampler calls):
  the network itself, or guided towards its labels (the null label the unconditional input) or
  its prompts (the empty prompt the unconditional input)."""
  conditioning, conditional = options.conditioning, lambda x_t, t, y: model(x_t, t, y)
  if conditioning is None:
    return None, lambda x_t, t: model(x_t, t)
  w = conditioning.guidance_scale
  if isinstance(conditioning, guidance.PromptConditioning):
    labels = conditioning.batch_labels(rng, batch)
    prompt, empty = conditioning.tokens(labels)
    return labels, guidance.guide_condition(conditional, prompt, empty, w, options.learn_sigma)
  labels = conditioning.batch_labels(jax.random.fold_in(rng, LABEL_STREAM), batch)
  return labels, guidance.guide(
    conditional, labels, w, conditioning.num_classes, options.learn_sigma
  )


def draw_batch(
  sample_fn: Callable, params, base_key: jax.Array, index: int
) -> tuple[np.ndarray, np.ndarray | None]:
  """Batch `index` of the stream seeded by base_key, whole on every process: uint8 NHWC images
  and, for a conditional model, their int32 labels (else None)."""
  samples = sample_fn(params, jax.random.fold_in(base_key, index))
  return image_io.to_uint8(mesh_lib.gather(samples.images)), mesh_lib.gather(samples.labels)


def draw_images(
  sample_fn: Callable, params, base_key: jax.Array, count: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
  """The first `count` images (and labels) of the stream, batches 0, 1, ..., in memory."""
  batches = [
    draw_batch(sample_fn, params, base_key, index) for index in range(-(-count // batch_size))
  ]
  images = np.concatenate([b[0] for b in batches])[:count]
  labels = None if batches[0][1] is None else np.concatenate([b[1] for b in batches])[:count]
  return images, labels


def padded_count(count: int, mesh: jax.sharding.Mesh) -> int:
  """The smallest multiple of the mesh size that holds `count` images."""
  return -(-count // mesh.size) * mesh.size


@dataclasses.dataclass(frozen=True)
class Program:
  """A checkpoint's weights and the compiled program that draws batches from them.

  name: <step>_<sampler>_<network calls>, then the sampler's non-default options
    (`Sampler.tags`: eta1, logsnr, learned, ...), a non-static thresholding, "online" for the
    trained rather than the EMA weights, seed<n> for a seed other than 0, and _w<guidance
    scale> for a conditional model: the samples' directory and eval's result names.
  settings: everything that determines the images (the sampling section but num_samples, and
    the step); a resumed sample run must match it, and eval writes it into its results.
  """

  sample_fn: Callable
  params: Any
  base_key: jax.Array
  step: int
  name: str
  settings: dict
  batch_size: int
  prompts: tuple[str, ...] | None = None  # a text model's: labels index them

  def draw(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The first `count` images and their labels (None if unconditional), in memory: those
    --mode=sample writes for the same settings."""
    return draw_images(self.sample_fn, self.params, self.base_key, count, self.batch_size)

  def draw_batch(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    return draw_batch(self.sample_fn, self.params, self.base_key, index)


def program_name(
  step: int, sampler: base.Sampler, schedule: DiffusionSchedule, sampling, conditional: bool
) -> str:
  """`Program.name` of a typed sampling section's settings (see Program)."""
  thresholding = () if sampling.thresholding == "static" else (str(sampling.thresholding),)
  weights = () if sampling.use_ema else ("online",)
  seed = () if sampling.seed == 0 else (f"seed{sampling.seed}",)
  name = "_".join(
    [
      str(step),
      sampler.name,
      str(len(sampler.timesteps(schedule))),
      *sampler.tags,
      *thresholding,
      *weights,
      *seed,
    ]
  )
  if conditional:
    name += f"_w{sampling.guidance_scale:g}"
  if sampling.prompt_list():  # other prompts, other images: a directory of their own
    name += "_p" + hashlib.sha1(";".join(sampling.prompt_list()).encode()).hexdigest()[:8]
  return name


def create_program(
  eval_graphdef: nnx.GraphDef,
  params,
  step: int,
  schedule: DiffusionSchedule,
  sampler: base.Sampler,
  options: SamplingOptions,
  sampling,
  sample_shape,
  mesh: jax.sharding.Mesh,
  decode: Callable | None = None,
) -> Program:
  """The Program of a checkpoint's weights (`params`, EMA or not as sampling.use_ema chose) for
  a typed sampling section (config.sections.SamplingConfig): batches of sampling.batch_size
  samples of sample_shape [H, W, C] (decoded by `decode` for a latent model), seeded by
  sampling.seed."""
  mesh_lib.check_divisible(sampling.batch_size, "sampling.batch_size", mesh.size)
  shape = (sampling.batch_size, *sample_shape)
  sample_fn = make_sample_fn(eval_graphdef, schedule, shape, mesh, sampler, options, decode=decode)
  settings = dataclasses.asdict(sampling)
  settings.pop("num_samples")  # asking for more (or fewer) images extends the same stream
  settings["step"] = step
  name = program_name(step, sampler, schedule, sampling, options.conditioning is not None)
  return Program(
    sample_fn=sample_fn,
    params=params,
    base_key=jax.random.key(sampling.seed),
    step=step,
    name=name,
    settings=settings,
    batch_size=sampling.batch_size,
    prompts=options.prompts,
  )


def from_run(
  run: Run, eval_graphdef: nnx.GraphDef, state, step: int, mesh: jax.sharding.Mesh
) -> Program:
  """The Program of a run's sampling section for a restored TrainState: its EMA weights unless
  sampling.use_ema is off, the run's sampler, batches of sampling.batch_size."""
  sampling = run.config.sampling
  params = state.ema_params if sampling.use_ema else state.params
  return create_program(
    eval_graphdef,
    params,
    step,
    run.schedule,
    run.sampler,
    run.sampling_options,
    sampling,
    run.sample_shape,
    mesh,
    decode=run.decode,
  )
