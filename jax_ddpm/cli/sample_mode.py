"""--mode=sample: images from a checkpoint, written batch by batch to workdir/samples/, resumable.

Also `load_program`, the checkpoint plus compiled program that eval (evaluate.py) draws from too.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jax_ddpm.config import builders
from jax_ddpm.config import checks as config_checks
from jax_ddpm.io import errors
from jax_ddpm.io import paths as files
from jax_ddpm.io import images as image_io
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.samplers import program as sampling
from jax_ddpm.training import state


@dataclasses.dataclass(frozen=True)
class Program:
  """A checkpoint's weights and the compiled program that draws batches from them.

  name: <step>_<sampler>_<network calls>, then the sampler's non-default options
    (`Sampler.tags`: eta1, logsnr, learned, ...), a non-static thresholding, "online" for the
    trained rather than the EMA weights, seed<n> for a seed other than 0, and _w<guidance
    scale> for a conditional model: the samples' directory and eval's result names.
  settings: everything that determines the images (config.sampling but num_samples, and the
    step); a resumed sample run must match it, and eval writes it into its results.
  """
  sample_fn: Callable
  params: Any
  base_key: jax.Array
  step: int
  name: str
  settings: dict

  def draw(self, count: int, batch_size: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The first `count` images and their labels (None if unconditional), in memory: those
    sample mode writes for the same settings."""
    return sampling.draw_images(self.sample_fn, self.params, self.base_key, count, batch_size)


def load_program(config, workdir: str, step: Optional[int], mesh: jax.sharding.Mesh) -> Program:
  """The checkpoint of `step` (latest if None) and a program of sampling.batch_size images."""
  sampling_config = config.sampling
  eval_graphdef, train_state, step = state.load_checkpoint(config, workdir, step)
  schedule, sampler = builders.schedule(config), builders.sampler(config)
  shape = (sampling_config.batch_size, config.data.image_size, config.data.image_size,
           config.data.channels)
  sample_fn = sampling.make_sample_fn(eval_graphdef, schedule, shape, mesh, sampler,
                                      **builders.sampling_options(config))
  settings = sampling_config.to_dict()
  settings.pop("num_samples")  # asking for more (or fewer) images extends the same stream
  settings["step"] = step
  # Every choice that changes the images shows in the name, so that results of two settings
  # never share a directory or an eval file.
  thresholding = () if sampling_config.thresholding == "static" else (
      str(sampling_config.thresholding),)
  weights = () if sampling_config.use_ema else ("online",)
  seed = () if sampling_config.seed == 0 else (f"seed{sampling_config.seed}",)
  name = "_".join([str(step), sampler.name, str(len(sampler.timesteps(schedule))),
                   *sampler.tags, *thresholding, *weights, *seed])
  if config.model.num_classes is not None:
    name += f"_w{sampling_config.guidance_scale:g}"
  return Program(sample_fn=sample_fn,
                 params=train_state.ema_params if sampling_config.use_ema else train_state.params,
                 base_key=jax.random.key(sampling_config.seed), step=step, name=name,
                 settings=settings)


def check_sampling_request(sampling_config, mesh: jax.sharding.Mesh) -> None:
  if not isinstance(sampling_config.num_samples, int) or sampling_config.num_samples <= 0:
    raise errors.ConfigError(f"sampling.num_samples must be a positive integer, got "
                             f"{sampling_config.num_samples!r}.")
  if sampling_config.batch_size <= 0 or sampling_config.batch_size % mesh.size:
    raise errors.ConfigError(f"sampling.batch_size={sampling_config.batch_size} must be a "
                             f"positive multiple of the number of devices, {mesh.size}.")


def sample_to_workdir(config, workdir: str, step: Optional[int] = None) -> str:
  """--mode=sample: draws config.sampling.num_samples images from a checkpoint of `workdir`.

  Batch i is drawn from fold_in(key(sampling.seed), i), so the images do not depend on how many
  devices or processes draw them, and an interrupted run resumes at the first batch that was
  not written. Process 0 writes batch_<i>.npz (a full batch of uint8 NHWC under 'arr_0', and
  for a conditional model the int32 classes asked for under 'labels') and grid_<i>.png (one
  row per class if conditional) as each batch finishes, and at the end
  samples_<N>x<H>x<W>x<C>.npz with the first N = num_samples images (and labels), the file FID
  tools read. A later run that asks for fewer images
  draws nothing new; one that asks for more draws only the missing batches. Returns the
  output directory, workdir/samples/<name> (`Program.name`).
  """
  config_checks.validate_model_and_diffusion(config)
  mesh = parallel.data_mesh()
  check_sampling_request(config.sampling, mesh)
  program = load_program(config, workdir, step, mesh)
  directory = files.join(workdir, "samples", program.name)
  _claim_directory(directory, program.settings)
  batch_size = config.sampling.batch_size
  num_batches = -(-config.sampling.num_samples // batch_size)
  todo = _batches_to_draw(directory, num_batches, batch_size)
  started = time.perf_counter()
  for done, index in enumerate(todo, start=1):
    images, labels = sampling.draw_batch(program.sample_fn, program.params, program.base_key,
                                         index)
    _write_batch(directory, index, images, labels)
    rate = done * batch_size / (time.perf_counter() - started)
    logging.info("Batch %d/%d: %.2f images/s, ETA %.0f s.", index + 1, num_batches, rate,
                 (len(todo) - done) * batch_size / rate)
  if jax.process_index() == 0:
    _write_all_samples(directory, config.sampling.num_samples, num_batches)
  return directory


def all_samples_path(directory: str, shape: tuple[int, ...]) -> str:
  """The file of every sample of a directory: samples_<N>x<H>x<W>x<C>.npz."""
  return files.join(directory, "samples_" + "x".join(str(d) for d in shape) + ".npz")


def batch_path(directory: str, index: int) -> str:
  return files.join(directory, f"batch_{index:05d}.npz")


def _claim_directory(directory: str, settings: dict) -> None:
  """Refuses a directory whose samples were drawn with other settings; else records ours."""
  settings_path = files.join(directory, "settings.json")
  if files.exists(settings_path):
    saved = files.load_json(settings_path)
    differences = [f"sampling.{key}: now {settings.get(key)!r}, before {saved.get(key)!r}"
                   for key in sorted(set(settings) | set(saved))
                   if json.dumps(settings.get(key)) != json.dumps(saved.get(key))]
    if differences:
      raise errors.ConfigError(
          f"{directory} holds samples drawn with other settings:\n  " + "\n  ".join(differences)
          + "\nUse those settings to continue, or move the directory away. Nothing was written.")
  if jax.process_index() == 0:
    files.save_json(settings_path, settings)


def _batches_to_draw(directory: str, num_batches: int, batch_size: int) -> list[int]:
  """Indices of the batches not yet on disk whole, agreed on by every process.

  A batch file always holds a full batch; one with fewer images (written by an older version
  for a short last batch) is drawn again.
  """
  def complete(index):
    path = batch_path(directory, index)
    return files.exists(path) and len(files.read_npz(path, "sample batch", ["arr_0"])
                                      ["arr_0"]) == batch_size
  todo = [i for i in range(num_batches) if not complete(i)]
  todo = [int(i) for i in multihost_utils.broadcast_one_to_all(
      np.array(todo + [-1] * (num_batches - len(todo)), np.int32)) if i >= 0]
  if len(todo) < num_batches:
    logging.info("Resuming: %d of %d batches already in %s.", num_batches - len(todo),
                 num_batches, directory)
  return todo


def _write_batch(directory: str, index: int, images: np.ndarray,
                 labels: Optional[np.ndarray]) -> None:
  """batch_<index>.npz and grid_<index>.png, by process 0."""
  if jax.process_index() != 0:
    return
  if labels is None:
    files.save_npz(batch_path(directory, index), arr_0=images)
    grid = image_io.image_grid(images)
  else:
    files.save_npz(batch_path(directory, index), arr_0=images, labels=labels)
    grid = image_io.class_grid(images, labels)
  image_io.save_png(files.join(directory, f"grid_{index:05d}.png"), grid)


def _write_all_samples(directory: str, num_samples: int, num_batches: int) -> str:
  """samples_<N>x...npz: the first N images of the directory's batches, in order."""
  batches = [files.read_npz(batch_path(directory, i), "sample batch")
             for i in range(num_batches)]
  arrays = {name: np.concatenate([batch[name] for batch in batches])[:num_samples]
            for name in batches[0]}
  everything = arrays["arr_0"]
  path = all_samples_path(directory, everything.shape)
  files.save_npz(path, **arrays)
  logging.info("Wrote %d samples to %s.", len(everything), path)
  return path
