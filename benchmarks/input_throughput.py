"""Input throughput per process: grain's reader against the plain per-step loop it replaced.

  python benchmarks/input_throughput.py [--steps=40] [--batch=128]

Both produce this process's float32 slice of each global batch for steps 0, 1, ...; the script
first checks they give equal batches, then prints images/s for CIFAR-10-shaped data (32x32x3)
held in memory and as a TFDS ArrayRecord dataset of PNG-encoded images (decoded on read). The
plain loop is what the pipeline ran before grain, on one background thread; grain's threads
and worker processes each read whole steps.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_description
from jax_ddpm.data import pipeline as input_pipeline
from jax_ddpm.data import sources as data_sources


def cifar_shaped_tfds(directory: str, count: int) -> data_sources.TfdsSource:
  import tensorflow as tf
  import tensorflow_datasets as tfds

  images = data_sources.fake_images(count, 32, 3, seed=0)
  features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(32, 32, 3))})
  tfds.dataset_builders.store_as_tfds_dataset(
    name="cifar_shaped",
    version="1.0.0",
    features=features,
    data_dir=directory,
    split_datasets={"train": tf.data.Dataset.from_tensor_slices({"image": images})},
    file_format="array_record",
  )
  return data_sources.TfdsSource("cifar_shaped", "train", directory)


def plain_loop(source, steps, batch):
  return (input_pipeline.local_batch(source, s, batch, 0, True, 0, 1) for s in range(steps))


def grain_loop(source, steps, batch, **options):
  iterator = iter(
    input_pipeline.grain_batches(
      source,
      first_step=0,
      global_batch=batch,
      seed=0,
      random_flip=True,
      process_index=0,
      process_count=1,
      **options,
    )
  )
  return (next(iterator)["image"] for _ in range(steps))


def images_per_second(batches, steps, batch) -> float:
  started = time.perf_counter()
  for _ in batches:
    pass
  return steps * batch / (time.perf_counter() - started)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read its absl flags
  with tempfile.TemporaryDirectory() as directory:
    sources = {
      "in memory": data_sources.ArraySource(data_sources.fake_images(50_000, 32, 3, seed=0)),
      "TFDS ArrayRecord (PNG)": cifar_shaped_tfds(directory, 10_000),
    }
    loaders = {"plain loop (before)": lambda s: plain_loop(s, args.steps, args.batch)}
    for threads in (1, 2, 4):
      loaders[f"grain, {threads} thread(s)"] = functools.partial(
        lambda s, t: grain_loop(s, args.steps, args.batch, num_threads=t), t=threads
      )
    loaders["grain, 2 threads + 2 processes"] = lambda s: grain_loop(
      s, args.steps, args.batch, worker_processes=2
    )
    print(
      f"{machine_description()}; {args.steps} steps of batch {args.batch}, images/s for one process"
    )
    print(f"| loader | {' | '.join(sources)} |")
    print("|---|" + "---|" * len(sources))
    for name, loader in loaders.items():
      cells = []
      for source in sources.values():
        for ours, theirs in zip(loader(source), plain_loop(source, 3, args.batch)):
          assert np.array_equal(ours, theirs), name  # the same batches for the same steps
        cells.append(f"{images_per_second(loader(source), args.steps, args.batch):,.0f}")
      print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
  main()
