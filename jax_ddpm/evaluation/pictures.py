"""Pictures of the process (--mode=visualize and the notebook): the schedules, the forward process
and the reverse process.

`write` puts them under <workdir>/visualize/ and into TensorBoard image summaries:
  schedules.png        beta_t and alpha-bar_t of the linear, cosine and quadratic schedules
  forward_process.png  one training image noised by q(x_t | x_0) (DDPM eq. 4) at increasing t
  reverse_process.png  one sampling run: x_t (top row) and the predicted x_0 (bottom row)
  reverse_process.gif  a grid of samples emerging from noise, one frame per recorded step
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from jax_ddpm.diffusion import process, schedules
from jax_ddpm.io import images as image_io
from jax_ddpm.io import paths as files
from jax_ddpm.io import summaries
from jax_ddpm.samplers import program

if TYPE_CHECKING:
  from jax_ddpm.config.builders import Run

NUM_STRIP_FRAMES = 10
NUM_GIF_FRAMES = 40
GIF_GRID = 16


def schedule_plot(num_timesteps: int) -> np.ndarray:
  """beta_t and alpha-bar_t against t for three schedules, as a uint8 RGB image."""
  import matplotlib  # noqa: PLC0415 (slow to import; only this picture needs it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
  t = np.arange(1, num_timesteps + 1)
  for name in ("linear", "cosine", "quadratic"):
    schedule = schedules.get_schedule(name, num_timesteps)
    left.plot(t, np.asarray(schedule.betas), label=name)
    right.plot(t, np.asarray(schedule.alphas_cumprod), label=name)
  left.set(title=r"$\beta_t$", xlabel="t", yscale="log")
  right.set(title=r"$\bar\alpha_t$", xlabel="t")
  for axis in (left, right):
    axis.grid(alpha=0.3)
    axis.legend()
  figure.tight_layout()
  figure.canvas.draw()
  image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
  plt.close(figure)
  return image


def forward_strip(
  schedule: schedules.DiffusionSchedule, image: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """x_t of one image at NUM_STRIP_FRAMES timesteps from 0 to T-1, as a uint8 row."""
  t = np.linspace(0, schedule.num_timesteps - 1, NUM_STRIP_FRAMES).round().astype(np.int32)
  x0 = jnp.broadcast_to(jnp.asarray(image_io.to_model_range(image)), (len(t),) + image.shape)
  eps = jnp.broadcast_to(jax.random.normal(jax.random.key(seed), image.shape), x0.shape)
  x_t = process.q_sample(schedule, x0, jnp.asarray(t), eps)
  return image_io.image_grid(image_io.to_uint8(jnp.clip(x_t, -1, 1)), columns=len(t)), t


def _gif(frames: list[np.ndarray]) -> bytes:
  """uint8 [H, W, C] frames as an animated GIF, scaled up to ~256 px, the last frame held."""
  scale = max(1, 256 // frames[0].shape[0])
  images = [
    Image.fromarray(
      np.repeat(np.repeat(f, scale, 0), scale, 1).squeeze(-1)
      if f.shape[-1] == 1
      else np.repeat(np.repeat(f, scale, 0), scale, 1)
    )
    for f in frames
  ]
  buffer = io.BytesIO()
  durations = [80] * (len(images) - 1) + [1500]  # hold the finished samples
  images[0].save(
    buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0
  )
  return buffer.getvalue()


def draw(
  run: Run, eval_graphdef: nnx.GraphDef, params, image: np.ndarray, mesh: jax.sharding.Mesh
) -> tuple[dict[str, np.ndarray], bytes]:
  """The four pictures of a model (`write` names them): the schedules, `image` (a uint8 training
  image) noised at increasing t, and one recorded sampling run (strip and GIF)."""
  schedule = run.schedule
  drawn = {
    "schedules": schedule_plot(schedule.num_timesteps),
    "forward_process": forward_strip(schedule, image, run.config.seed)[0],
  }
  drawn["reverse_process"], gif = reverse_pictures(run, eval_graphdef, params, mesh)
  return drawn, gif


def reverse_pictures(
  run: Run, eval_graphdef: nnx.GraphDef, params, mesh: jax.sharding.Mesh
) -> tuple[np.ndarray, bytes]:
  """One sampling run of GIF_GRID images with the run's sampler, every step recorded: the strip
  of x_t (top) and predicted x_0 (bottom) of its first image, and the GIF of the grid."""
  count = program.padded_count(GIF_GRID, mesh)
  num_steps = len(run.sampler.timesteps(run.schedule))
  sample_fn = program.make_sample_fn(
    eval_graphdef,
    run.schedule,
    (count, *run.image_shape),
    mesh,
    run.sampler,
    run.sampling_options,
    num_frames=min(NUM_GIF_FRAMES, num_steps),
  )
  samples = sample_fn(params, jax.random.key(run.config.sampling.seed))
  x_t = image_io.to_uint8(jnp.clip(samples.trajectory.x_t, -1, 1))  # [K, N, H, W, C]
  x0 = image_io.to_uint8(samples.trajectory.x0)
  chosen = np.linspace(0, len(x_t) - 1, NUM_STRIP_FRAMES).round().astype(int)
  strip = image_io.image_grid(np.concatenate([x_t[chosen, 0], x0[chosen, 0]]), columns=len(chosen))
  frames = [image_io.image_grid(frame[:GIF_GRID], columns=4) for frame in x_t]
  frames.append(image_io.image_grid(image_io.to_uint8(samples.images)[:GIF_GRID], columns=4))
  return strip, _gif(frames)


def write(workdir: str, step: int, pictures: dict[str, np.ndarray], gif: bytes) -> list[str]:
  """<workdir>/visualize/<name>.png and reverse_process.gif by process 0, and the pictures as
  TensorBoard images at `step`; returns the paths written."""
  paths = []
  directory = files.join(workdir, "visualize")
  if jax.process_index() == 0:
    for name, picture in pictures.items():
      paths.append(files.join(directory, f"{name}.png"))
      files.save_png(paths[-1], picture)
    paths.append(files.join(directory, "reverse_process.gif"))
    files.save_bytes(paths[-1], gif)
  writer = summaries.create_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_images(
    step, {f"visualize/{name}": picture[None] for name, picture in pictures.items()}
  )
  writer.flush()
  return paths
