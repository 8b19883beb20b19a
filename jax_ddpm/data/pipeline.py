"""Training batches: a deterministic order over a data source, read ahead and sharded.

The example at global position p of the run (step * global_batch + j) is
`permutation_e[p mod N]`, where e = p // N is the epoch and the permutation is drawn from
(seed, e). So the data order is a pure function of (seed, step): a run resumed at step s sees
exactly the batches an uninterrupted run would, on any number of processes. Each process reads
only its slice of each global batch (from a sources.ImageSource) and the slices are
assembled into one array of {"image", "label"} sharded over the mesh's 'data' axis. grain
(Google's data loader for JAX) reads ahead: its threads (and, optionally, worker processes) each
read a whole step's slice, and it keeps the order, so resuming needs no iterator state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from jax_ddpm.data.sources import ImageSource
from jax_ddpm.io.images import to_model_range


def global_indices(step: int, global_batch: int, num_examples: int, seed: int) -> np.ndarray:
  """Dataset indices of the global batch at `step`: each epoch is a fresh seeded permutation."""
  positions = step * global_batch + np.arange(global_batch, dtype=np.int64)
  epochs = positions // num_examples
  indices = np.empty(global_batch, dtype=np.int64)
  for epoch in np.unique(epochs):
    permutation = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    chosen = epochs == epoch
    indices[chosen] = permutation[positions[chosen] % num_examples]
  return indices


def global_flips(step: int, global_batch: int, seed: int) -> np.ndarray:
  """Horizontal-flip decisions of the global batch at `step`."""
  return np.random.default_rng([seed, step, 1]).random(global_batch) < 0.5


def _local_indices(
  source: ImageSource,
  step: int,
  global_batch: int,
  seed: int,
  process_index: int,
  process_count: int,
) -> tuple[np.ndarray, int]:
  per_process = global_batch // process_count
  start = process_index * per_process
  return global_indices(step, global_batch, len(source), seed)[start : start + per_process], start


def local_batch(
  source: ImageSource,
  step: int,
  global_batch: int,
  seed: int,
  random_flip: bool,
  process_index: int,
  process_count: int,
) -> np.ndarray:
  """This process's slice of the global batch at `step`, as float32 [-1, 1] NHWC."""
  return local_examples(
    source, step, global_batch, seed, random_flip, process_index, process_count
  )["image"]


def local_examples(
  source: ImageSource,
  step: int,
  global_batch: int,
  seed: int,
  random_flip: bool,
  process_index: int,
  process_count: int,
  labels: bool = False,
) -> dict[str, np.ndarray]:
  """local_batch's images as {"image": ...} and, with `labels`, their int32 "label"."""
  per_process = global_batch // process_count
  indices, start = _local_indices(source, step, global_batch, seed, process_index, process_count)
  if labels:
    images, classes = source.read_labelled(indices)
  else:
    images, classes = source.read(indices), None
  if random_flip:
    flips = global_flips(step, global_batch, seed)[start : start + per_process]
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  batch = {"image": to_model_range(images)}
  if labels:
    batch["label"] = classes
  return batch


@dataclasses.dataclass(frozen=True)
class _StepReader:
  """This process's slice of the global batch at a step, `local_examples` as a grain transform."""

  source: ImageSource
  global_batch: int
  seed: int
  random_flip: bool
  process_index: int
  process_count: int
  labels: bool = False

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return local_examples(
      self.source,
      int(step),
      self.global_batch,
      self.seed,
      self.random_flip,
      self.process_index,
      self.process_count,
      self.labels,
    )


def grain_batches(
  source: ImageSource,
  *,
  first_step: int,
  global_batch: int,
  seed: int,
  random_flip: bool,
  process_index: int,
  process_count: int,
  steps_per_dispatch: int = 1,
  num_threads: int = 2,
  worker_processes: int = 0,
  labels: bool = False,
):
  """This process's batches from `first_step` on, as a grain IterDataset of {"image": float32
  NHWC} dicts, with "label" (int32) too if `labels`.

  The unit of work is one step's slice (one vectorised read of the source): `num_threads` of
  grain's threads (image decoders release the GIL) and, with worker_processes > 0, that many
  processes each read whole steps ahead of training. grain keeps the order, so the batch of a
  step is `local_batch` of that step on any setting.
  """
  import grain  # noqa: PLC0415 (its worker processes start only where batches are read)

  reader = _StepReader(
    source, global_batch, seed, random_flip, process_index, process_count, labels
  )
  dataset = grain.MapDataset.range(first_step, 2**62).map(reader)
  if steps_per_dispatch > 1:
    dataset = dataset.batch(
      steps_per_dispatch, batch_fn=lambda items: jax.tree.map(lambda *x: np.stack(x), *items)
    )
  dataset = dataset.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  )
  if worker_processes > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_processes))
  return dataset


class BatchIterator:
  """Global batches for steps first_step, first_step + k, ..., read ahead by grain.

  Items are {"image": [B, H, W, C]} dicts, with "label" [B] if `labels`; with
  steps_per_dispatch = k > 1 each stacks k consecutive batches: [k, B, ...]. Their values are
  jax.Arrays sharded over the mesh's data axis (batch axis); each process reads only its slice.
  """

  def __init__(
    self,
    source: ImageSource,
    *,
    first_step: int,
    global_batch: int,
    seed: int,
    random_flip: bool,
    sharding: jax.sharding.NamedSharding,
    steps_per_dispatch: int = 1,
    num_threads: int = 2,
    worker_processes: int = 0,
    labels: bool = False,
  ):
    self._global_batch, self._sharding, self._k = global_batch, sharding, steps_per_dispatch
    self._iterator = iter(
      grain_batches(
        source,
        first_step=first_step,
        global_batch=global_batch,
        seed=seed,
        random_flip=random_flip,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        steps_per_dispatch=steps_per_dispatch,
        num_threads=num_threads,
        worker_processes=worker_processes,
        labels=labels,
      )
    )

  def __iter__(self) -> Iterator[dict[str, jax.Array]]:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    return {name: self._global(value) for name, value in next(self._iterator).items()}

  def _global(self, local: np.ndarray) -> jax.Array:
    global_shape = list(local.shape)
    global_shape[0 if self._k == 1 else 1] = self._global_batch
    return jax.make_array_from_process_local_data(self._sharding, local, tuple(global_shape))

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()
