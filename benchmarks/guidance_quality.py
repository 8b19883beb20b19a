"""Classifier-free guidance on a conditional model: class accuracy and feature distance per w.

  python benchmarks/guidance_quality.py --workdir=runs/mnist_cond [--config=configs/mnist_cond.py]
      [--scales=0,1,2,4] [--num_samples=500] [--figure=docs/mnist_cond_guidance.png]

Loads the workdir's latest checkpoint (EMA weights) and its digit feature classifier, draws
`num_samples` images at each guidance scale w from the same seeds with the config's sampler and
labels ("grid": every class equally often), and prints the classifier's accuracy on the
requested labels (how often the digit drawn is the digit asked for), the feature distance to
the training digits, the classifier score and the sampling time. With --figure it also draws
8 samples of each class (one row per class) at each w, side by side.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_description, print_table
from benchmarks.sampler_quality import draw
from jax_ddpm.config import builders, run_config
from jax_ddpm.data import sources as data_sources
from jax_ddpm.evaluation import features, metrics, scoring
from jax_ddpm.io import images as image_io
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.training import checkpointing


def per_class_rows(images: np.ndarray, labels: np.ndarray, per_class: int = 8) -> np.ndarray:
  """The first `per_class` images of each class, one row per class, as one grid."""
  chosen = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
  return image_io.class_grid(images[chosen], labels[chosen])


def figure(grids: dict[float, np.ndarray], path: str, subtitle: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(grids), figsize=(3 * len(grids), 3.6))
  for axis, (scale, grid) in zip(np.atleast_1d(axes), grids.items()):
    axis.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray")
    axis.set_title(f"w = {scale:g}")
    axis.axis("off")
  fig.suptitle(subtitle, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f"Wrote {path}")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="configs/mnist_cond.py")
  parser.add_argument("--scales", default="0,1,2,4")
  parser.add_argument("--num_samples", type=int, default=500)
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--figure", default="")
  args = parser.parse_args()
  run = builders.build(run_config.from_config_dict(runpy.run_path(args.config)["get_config"]()))
  config, schedule, sampler = run.config, run.schedule, run.sampler
  if config.model.num_classes is None:
    raise SystemExit(f"{args.config} is an unconditional model (model.num_classes unset).")

  mesh = parallel.data_mesh()
  eval_graphdef, train_state, step = checkpointing.load_checkpoint(run, args.workdir)
  extractor = features.create_extractor(config.eval, config.data, args.workdir, mesh)
  path = scoring.reference_path(config.eval, config.data, args.workdir)
  reference = scoring.saved_reference(config.eval, path, extractor) or scoring.compute_reference(
    config.eval, config.data, path, extractor
  )
  rows, grids = [], {}
  for scale in (float(w) for w in args.scales.split(",")):
    guided = run.with_sampling(guidance_scale=scale)
    images, labels, seconds = draw(
      guided, eval_graphdef, train_state.ema_params, mesh, sampler, args.num_samples, args.batch
    )
    stats, probabilities = extractor.statistics(data_sources.ArraySource(images))
    verdict = scoring.classifier_results(probabilities, labels)
    rows.append(
      [
        f"{scale:g}",
        f"{verdict['class_accuracy']:.3f}",
        f"{metrics.frechet_distance(stats, reference):.2f}",
        f"{verdict['classifier_score']:.2f}",
        f"{seconds:.1f}",
      ]
    )
    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    grids[scale] = per_class_rows(images, labels)
  calls = len(sampler.timesteps(schedule))
  print(f"Machine: {machine_description()}")
  print(
    f"Checkpoint: {args.workdir}, step {step}, EMA weights; {sampler.name}, {calls} steps "
    f"({2 * calls} network evaluations per image when w is not 0 or 1); "
    f"{args.num_samples} samples per row, labels {config.sampling.labels!r}"
  )
  print_table(
    ["guidance w", "class accuracy", "feature distance", "classifier score", "sampling s"], rows
  )
  if args.figure:
    figure(
      grids, args.figure, f"{args.workdir}, step {step}: {sampler.name}-{calls}, one row per class"
    )


if __name__ == "__main__":
  main()
