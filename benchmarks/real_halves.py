"""Every eval measure of real images against real images: the floor a model's numbers stand on.

  python benchmarks/real_halves.py --images=../shared/data/cifar10_test_jpeg/cifar10_test_jpg.npz
      [--inception_weights=~/.cache/jax_ddpm/fid_inception_2015-12-05.npz] [--features=F.npz]

Splits the images (an .npz of uint8 NHWC under 'x' or 'arr_0') into two halves in a seeded
random order and scores the second half against the first with the measures of --mode=eval,
on Inception pool3 features: FID, precision and recall (k = 3), density and coverage (k = 5),
KID (100 subsets of 1000), and, when the weights hold the 2015-12-05 graph's softmax layer,
the Inception Score of each half and of all images (10 splits). Two halves of one set are as
alike as two samples can be, so these are the best values a model can reach at this sample
size: FID and KID near 0 (not exactly: both halves are finite samples), P, R, coverage near 1,
density near 1. --features caches the pool3 features and probabilities (float32 npz), so a
second run skips the network.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from benchmarks.common import machine_description, print_table
from jax_ddpm.evaluation import features as feature_nets
from jax_ddpm.evaluation import inception_weights as fid_weights
from jax_ddpm.evaluation import manifold, metrics
from jax_ddpm.io import paths as files
from jax_ddpm.runtime import mesh as parallel


def read_images(path: str) -> np.ndarray:
  arrays = files.read_npz(path, "--images")
  key = "x" if "x" in arrays else "arr_0"
  if key not in arrays:
    raise SystemExit(f"--images={path!r} has neither 'x' nor 'arr_0' (it has {sorted(arrays)}).")
  return arrays[key]


def features_and_probabilities(images: np.ndarray, weights: str, cache: str | None):
  """pool3 features [n, 2048] and 1008-way probabilities (None without the softmax layer)."""
  if cache and os.path.exists(cache):
    arrays = files.read_npz(cache, "--features")
    return arrays["features"], arrays.get("probabilities")
  from configs import default

  config = default.get_config()
  config.eval.feature_net, config.eval.inception_weights = "inception", weights
  config.eval.batch_size = 50 * len(parallel.data_mesh().devices.flat)
  try:
    fid_weights.load_logits(weights)
    config.eval.inception_score = True
  except FileNotFoundError as error:
    print(f"No Inception Score: {error}\n")
  typed = common.build(config).config
  extractor = feature_nets.create_extractor(typed.eval, typed.data, "unused", parallel.data_mesh())
  started = time.perf_counter()
  features, probabilities = extractor(images)
  print(f"pool3 features of {len(images)} images: {time.perf_counter() - started:.0f} s")
  if cache:
    extra = {} if probabilities is None else {"probabilities": probabilities}
    files.save_npz(cache, features=features, **extra)
  return features, probabilities


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", required=True)
  parser.add_argument("--inception_weights", default=fid_weights.default_path())
  parser.add_argument("--features", default=None)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  images = read_images(args.images)
  features, probabilities = features_and_probabilities(
    images, args.inception_weights, args.features
  )
  order = np.random.default_rng(args.seed).permutation(len(images))
  first, second = np.array_split(order, 2)
  moments = []
  for half in (first, second):
    running = metrics.RunningMoments(features.shape[1])
    running.update(features[half])
    moments.append(running.statistics())
  rows = [["FID", f"{metrics.frechet_distance(*moments):.3f}"]]
  scores = manifold.manifold_scores(features[first], features[second], parallel.data_mesh())
  rows += [[name, f"{value:.4f}"] for name, value in scores._asdict().items()]
  kid, kid_std = metrics.kernel_inception_distance(features[first], features[second])
  rows.append(["KID (100 subsets of 1000)", f"{kid:.5f} +- {kid_std:.5f}"])
  if probabilities is not None:
    for name, part in (("first half", first), ("second half", second), ("all", order)):
      score, spread = metrics.inception_score(probabilities[part])
      rows.append(
        [f"Inception Score, {name} ({len(part)}, 10 splits)", f"{score:.3f} +- {spread:.3f}"]
      )
  print(f"{len(second)} images against {len(first)} of {args.images}; {machine_description()}")
  print_table(["measure", "second half against the first"], rows)


if __name__ == "__main__":
  main()
