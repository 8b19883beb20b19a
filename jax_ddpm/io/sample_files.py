"""Sample files of --mode=sample: batches written as they finish, resumable, with their settings.

A directory workdir/samples/<name> holds batch_<i>.npz (a full batch of uint8 NHWC under
'arr_0', and for a conditional model the int32 classes asked for under 'labels'; for a text
model the prompt indices under 'labels' and each image's prompt, a string array, under
'prompts') and grid_<i>.png (one row per class or prompt), written by process 0 as each batch
finishes; settings.json, which a resumed run must match; and at the end
samples_<N>x<H>x<W>x<C>.npz with the first N images (and labels, prompts), the file FID tools
read. A later run that asks for fewer images draws nothing new; one that asks for more draws
only the missing batches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jax_ddpm.io import errors
from jax_ddpm.io import images as image_io
from jax_ddpm.io import paths as files

# index -> (uint8 images [B, H, W, C], int32 labels [B] or None) of batch `index`.
DrawBatch = Callable[[int], tuple[np.ndarray, np.ndarray | None]]


def write_samples(
  directory: str,
  settings: dict,
  num_samples: int,
  batch_size: int,
  draw_batch: DrawBatch,
  prompts: tuple[str, ...] | None = None,
) -> str:
  """Draws and writes the batches of `num_samples` images that `directory` lacks (refusing one
  whose samples were drawn with other `settings`), then the all-samples file; returns
  `directory`. Batch i is draw_batch(i), the same on every process; a text model's labels index
  its `prompts`."""
  claim_directory(directory, settings)
  num_batches = -(-num_samples // batch_size)
  todo = batches_to_draw(directory, num_batches, batch_size)
  started = time.perf_counter()
  for done, index in enumerate(todo, start=1):
    images, labels = draw_batch(index)
    write_batch(directory, index, images, labels, prompts)
    rate = done * batch_size / (time.perf_counter() - started)
    logging.info(
      "Batch %d/%d: %.2f images/s, ETA %.0f s.",
      index + 1,
      num_batches,
      rate,
      (len(todo) - done) * batch_size / rate,
    )
  if jax.process_index() == 0:
    write_all_samples(directory, num_samples, num_batches)
  return directory


def all_samples_path(directory: str, shape: tuple[int, ...]) -> str:
  """The file of every sample of a directory: samples_<N>x<H>x<W>x<C>.npz."""
  return files.join(directory, "samples_" + "x".join(str(d) for d in shape) + ".npz")


def batch_path(directory: str, index: int) -> str:
  return files.join(directory, f"batch_{index:05d}.npz")


def claim_directory(directory: str, settings: dict) -> None:
  """Refuses a directory whose samples were drawn with other settings; else records ours."""
  settings_path = files.join(directory, "settings.json")
  if files.exists(settings_path):
    saved = files.load_json(settings_path)
    differences = [
      f"sampling.{key}: now {settings.get(key)!r}, before {saved.get(key)!r}"
      for key in sorted(set(settings) | set(saved))
      if json.dumps(settings.get(key)) != json.dumps(saved.get(key))
    ]
    if differences:
      raise errors.ConfigError(
        f"{directory} holds samples drawn with other settings:\n  "
        + "\n  ".join(differences)
        + "\nUse those settings to continue, or move the directory away. Nothing was written."
      )
  if jax.process_index() == 0:
    files.save_json(settings_path, settings)


def batches_to_draw(directory: str, num_batches: int, batch_size: int) -> list[int]:
  """Indices of the batches not yet on disk whole, agreed on by every process.

  A batch file always holds a full batch; one with fewer images (written by an older version
  for a short last batch) is drawn again.
  """

  def complete(index):
    path = batch_path(directory, index)
    return (
      files.exists(path)
      and len(files.read_npz(path, "sample batch", ["arr_0"])["arr_0"]) == batch_size
    )

  todo = [i for i in range(num_batches) if not complete(i)]
  todo = [
    int(i)
    for i in multihost_utils.broadcast_one_to_all(
      np.array(todo + [-1] * (num_batches - len(todo)), np.int32)
    )
    if i >= 0
  ]
  if len(todo) < num_batches:
    logging.info(
      "Resuming: %d of %d batches already in %s.", num_batches - len(todo), num_batches, directory
    )
  return todo


def write_batch(
  directory: str,
  index: int,
  images: np.ndarray,
  labels: np.ndarray | None,
  prompts: tuple[str, ...] | None = None,
) -> None:
  """batch_<index>.npz and grid_<index>.png, by process 0."""
  if jax.process_index() != 0:
    return
  if labels is None:
    files.save_npz(batch_path(directory, index), arr_0=images)
    grid = image_io.image_grid(images)
  else:
    arrays = {"arr_0": images, "labels": labels}
    if prompts is not None:  # a fixed-width unicode array: read back without pickle
      arrays["prompts"] = np.asarray(prompts, dtype=np.str_)[labels]
    files.save_npz(batch_path(directory, index), **arrays)
    grid = image_io.class_grid(images, labels)
  files.save_png(files.join(directory, f"grid_{index:05d}.png"), grid)


def write_all_samples(directory: str, num_samples: int, num_batches: int) -> str:
  """samples_<N>x...npz: the first N images of the directory's batches, in order."""
  batches = [files.read_npz(batch_path(directory, i), "sample batch") for i in range(num_batches)]
  arrays = {
    name: np.concatenate([batch[name] for batch in batches])[:num_samples] for name in batches[0]
  }
  everything = arrays["arr_0"]
  path = all_samples_path(directory, everything.shape)
  files.save_npz(path, **arrays)
  logging.info("Wrote %d samples to %s.", len(everything), path)
  return path
