"""Sample quality per network call: DDIM and DPM-Solver++(2M) at a few step counts, and DDPM.

  python benchmarks/sampler_quality.py --workdir=runs/mnist [--config=configs/mnist.py]
      [--steps=5,10,20,50] [--num_samples=256] [--ddpm]

Loads the workdir's latest checkpoint (EMA weights) and its digit feature classifier
(`--mode=train_classifier`), draws `num_samples` images per row from the same seeds (in memory,
through the program sample mode compiles), and prints, per sampler and step count, the feature
distance to the training digits (lower is better), the classifier score and the sampling time.
Every row uses the config's thresholding; DPM-Solver++ uses logsnr spacing, DDIM the config's.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_description, print_table  # pylint: disable=g-import-not-at-top
from jax_ddpm import (evaluate, input_pipeline, metrics, parallel, samplers,  # pylint: disable=g-import-not-at-top
                      sampling, state)


def draw(config, eval_graphdef, params, schedule, mesh, sampler, num_samples, batch):
  """num_samples uint8 images drawn with `sampler`, and the seconds it took after compiling."""
  shape = (batch, config.data.image_size, config.data.image_size, config.data.channels)
  sample_fn = sampling.make_sample_fn(eval_graphdef, schedule, shape, mesh, sampler,
                                      **sampling.sampler_options(config))
  key = jax.random.key(config.sampling.seed)
  sample_fn(params, key).block_until_ready()  # compile
  started, images = time.perf_counter(), []
  for index in range(-(-num_samples // batch)):
    images.append(sampling.to_uint8(sample_fn(params, jax.random.fold_in(key, index))))
  return np.concatenate(images)[:num_samples], time.perf_counter() - started


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="configs/mnist.py")
  parser.add_argument("--steps", default="5,10,20,50")
  parser.add_argument("--num_samples", type=int, default=256)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--ddpm", action="store_true", help="also DDPM with all T steps")
  args = parser.parse_args()
  config = runpy.run_path(args.config)["get_config"]()

  mesh = parallel.data_mesh()
  eval_graphdef, train_state, step = state.load_checkpoint(config, args.workdir)
  schedule = state.schedule_from_config(config)
  extractor = evaluate.create_extractor(config, args.workdir, mesh)
  reference = (evaluate.saved_reference(config, args.workdir, extractor)
               or evaluate.compute_reference(config, args.workdir, extractor))
  runs = []
  for steps in (int(s) for s in args.steps.split(",") if s):
    runs.append(samplers.DDIM(num_steps=steps, spacing=config.sampling.spacing))
    runs.append(samplers.DPMSolverPP2M(num_steps=steps, spacing="logsnr"))
  if args.ddpm:
    runs.append(samplers.DDPM(variance=config.sampling.variance))

  rows = []
  for sampler in runs:
    images, seconds = draw(config, eval_graphdef, train_state.ema_params, schedule, mesh,
                           sampler, args.num_samples, args.batch)
    stats, probabilities = extractor.statistics(input_pipeline.ArraySource(images))
    score, _ = metrics.inception_score(probabilities)
    rows.append([sampler.name, len(sampler.timesteps(schedule)),
                 f"{metrics.frechet_distance(stats, reference):.2f}", f"{score:.2f}",
                 f"{seconds:.1f}"])
    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
  print(f"Machine: {machine_description()}")
  print(f"Checkpoint: {args.workdir}, step {step}, EMA weights; {args.num_samples} samples per "
        f"row, thresholding {config.sampling.thresholding!r}")
  print_table(["sampler", "network calls", "feature distance", "classifier score",
               "sampling s"], rows)


if __name__ == "__main__":
  main()
