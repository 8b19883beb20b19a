"""Sample quality per network call: every registered sampler at a few budgets of network calls.

  python benchmarks/sampler_quality.py --workdir=runs/mnist [--config=configs/mnist.py]
      [--calls=5,10,20,50] [--only=heun,unipc] [--num_samples=256] [--ddpm]
      [--plot=docs/sampler_quality.png]

Loads the workdir's latest checkpoint (EMA weights) and its digit feature classifier
(`--mode=train_classifier`), draws `num_samples` images per row from the same seeds (in memory,
through the program sample mode compiles), and prints, per sampler and budget, the network
calls spent (Heun's steps cost two calls but the last, so it gets (calls + 1) / 2 steps), the
feature distance to the training digits (lower is better), the classifier score, for a
conditional model (guided at its config's guidance_scale) the class accuracy of the requested
labels, and the sampling time. Every row uses the config's thresholding. The samplers on
timesteps (DDIM at eta 0 and 1, DPM-Solver++(2M) and its SDE form, UniPC) use log-SNR spacing
(DPM-Solver's and UniPC's papers') where it starts at or below training.max_timestep, else the
config's spacing; the samplers on Karras et al.'s sigma grid (Euler, Heun, Heun on the nearest
trained sigmas, Heun with EDM Algorithm 2's churn, Euler ancestral) start at the largest
trained sigma.
With --plot it also draws the table as a figure (feature distance and time per network call).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_description, print_table
from jax_ddpm.config import builders, run_config
from jax_ddpm.data import sources as data_sources
from jax_ddpm.evaluation import features, metrics, scoring
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.samplers import program as sampling
from jax_ddpm.samplers.ddim import DDIM
from jax_ddpm.samplers.ddpm import DDPM
from jax_ddpm.samplers.dpm_solver import DPMSolverPP2M, SDEDPMSolverPP2M
from jax_ddpm.samplers.karras import Euler, EulerAncestral, Heun
from jax_ddpm.samplers.unipc import UniPC
from jax_ddpm.training import checkpointing

# EDM Algorithm 2's stochasticity as the paper set it for ImageNet-64 (its Table 5).
CHURN = dict(s_churn=80.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)


def draw(run, eval_graphdef, params, mesh, sampler, num_samples, batch):
  """num_samples uint8 images drawn with `sampler` (the run's thresholding, labels and
  guidance), their labels (None if unconditional), and the seconds it took after compiling."""
  sample_fn = sampling.make_sample_fn(
    eval_graphdef, run.schedule, (batch, *run.image_shape), mesh, sampler, run.sampling_options
  )
  key = jax.random.key(run.config.sampling.seed)
  jax.block_until_ready(sample_fn(params, key))  # compile
  started = time.perf_counter()
  images, labels = sampling.draw_images(sample_fn, params, key, num_samples, batch)
  return images, labels, time.perf_counter() - started


def at_budget(calls: int, run) -> list:
  """Every sampler at `calls` network calls (Heun at the most that fit: 2 steps - 1 calls)."""
  config, schedule = run.config, run.schedule
  trained = config.training.max_timestep
  logsnr = DPMSolverPP2M(num_steps=calls, spacing="logsnr")
  fits = trained is None or logsnr.timesteps(schedule).max() <= trained
  spacing = "logsnr" if fits else config.sampling.spacing
  heun_steps = (calls + 1) // 2
  chosen = [
    DDIM(num_steps=calls, spacing=spacing),
    DDIM(num_steps=calls, eta=1.0, spacing=spacing),
    DPMSolverPP2M(num_steps=calls, spacing=spacing),
    SDEDPMSolverPP2M(num_steps=calls, spacing=spacing),
    UniPC(num_steps=calls, spacing=spacing),
    Euler(num_steps=calls),
    Heun(num_steps=heun_steps),
    Heun(num_steps=heun_steps, sigma_to_t="nearest"),
    Heun(num_steps=heun_steps, **CHURN),
    EulerAncestral(num_steps=calls),
  ]
  return [sampler.trained_up_to(trained) for sampler in chosen]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="configs/mnist.py")
  parser.add_argument("--calls", default="5,10,20,50", help="network-call budgets")
  parser.add_argument("--only", default="", help="comma-separated sampler names (default: all)")
  parser.add_argument("--num_samples", type=int, default=256)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--ddpm", action="store_true", help="also DDPM with all T steps")
  parser.add_argument("--plot", default="", help="PNG path for the table as a figure")
  args = parser.parse_args()
  run = builders.build(run_config.from_config_dict(runpy.run_path(args.config)["get_config"]()))
  config, schedule = run.config, run.schedule

  mesh = parallel.data_mesh()
  eval_graphdef, train_state, step = checkpointing.load_checkpoint(run, args.workdir)
  extractor = features.create_extractor(config.eval, config.data, args.workdir, mesh)
  path = scoring.reference_path(config.eval, config.data, args.workdir)
  reference = scoring.saved_reference(config.eval, path, extractor) or scoring.compute_reference(
    config.eval, config.data, path, extractor
  )
  only = set(filter(None, args.only.split(",")))
  runs = [
    sampler
    for calls in args.calls.split(",")
    if calls
    for sampler in at_budget(int(calls), run)
    if not only or sampler.name in only
  ]
  if args.ddpm and config.training.max_timestep not in (None, schedule.num_timesteps - 1):
    print("--ddpm: DDPM visits every t, above training.max_timestep; not drawn.", file=sys.stderr)
  elif args.ddpm:
    runs.append(DDPM(variance=config.sampling.variance))

  rows = []
  conditional = config.model.num_classes is not None
  for sampler in runs:
    images, labels, seconds = draw(
      run, eval_graphdef, train_state.ema_params, mesh, sampler, args.num_samples, args.batch
    )
    stats, probabilities = extractor.statistics(data_sources.ArraySource(images))
    verdict = scoring.classifier_results(probabilities, labels)
    accuracy = [f"{verdict['class_accuracy']:.3f}"] if conditional else []
    rows.append(
      [
        " ".join((sampler.name,) + sampler.tags),
        len(sampler.timesteps(schedule)),
        f"{metrics.frechet_distance(stats, reference):.2f}",
        f"{verdict['classifier_score']:.2f}",
        *accuracy,
        f"{seconds:.1f}",
      ]
    )
    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
  print(f"Machine: {machine_description()}")
  guided = f", guidance w = {config.sampling.guidance_scale:g}" if conditional else ""
  print(
    f"Checkpoint: {args.workdir}, step {step}, EMA weights; {args.num_samples} samples per "
    f"row, thresholding {config.sampling.thresholding!r}{guided}"
  )
  accuracy = ["class accuracy"] if conditional else []
  print_table(
    ["sampler", "network calls", "feature distance", "classifier score", *accuracy, "sampling s"],
    rows,
  )
  if args.plot:
    plot(rows, args.plot, f"{args.num_samples} samples, step {step}; {machine_description()}")


def plot(rows: list[list], path: str, subtitle: str) -> None:
  """Feature distance and sampling time against network calls, one line per sampler."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  styles = ("o-", "s--", "^-.", "v:", "D-", "P--", "X-.", "*:", "h-", "<--")
  for style, name in zip(styles * 2, dict.fromkeys(row[0] for row in rows)):
    mine = [row for row in rows if row[0] == name]
    calls = [row[1] for row in mine]
    for axis, column in zip(axes, (2, -1)):
      axis.plot(calls, [float(row[column]) for row in mine], style, label=name, alpha=0.85)
  for axis, label in zip(axes, ("feature distance (lower is better)", "sampling seconds")):
    axis.set_xscale("log")
    axis.set_yscale("log")
    calls = sorted({row[1] for row in rows})
    budgets = [c for c in calls if c + 1 not in calls]  # Heun's 2N - 1 beside its budget
    axis.set_xticks(budgets, [str(c) for c in budgets])
    axis.xaxis.set_minor_locator(ticker.NullLocator())
    axis.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(ticker.ScalarFormatter())
    axis.yaxis.set_minor_locator(ticker.NullLocator())
    axis.set_xlabel("network calls")
    axis.set_ylabel(label)
    axis.grid(True, alpha=0.3)
  axes[0].legend(fontsize=7, loc="upper right")
  figure.suptitle(subtitle, fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  print(f"Wrote {path}")


if __name__ == "__main__":
  main()
