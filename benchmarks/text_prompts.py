"""A text model's prompt following, its prompt grid, and its speed against the same network on
pixels.

  python benchmarks/text_prompts.py --workdir=runs/mnist_text [--per_prompt=8]
      [--guidance=1,3,5] [--grid=docs/text_prompts.png] [--speed]

Loads the workdir's newest checkpoint (its saved config: the autoencoder it names decodes),
draws --per_prompt images for every one of the 90 digit captions at each guidance scale, and
prints per scale the label accuracy (the digit classifier WORKDIR/feature_classifier.npz that
--mode=train_classifier writes, or --classifier), and for thickness and slant the
Pearson correlation of the measured value (data/captions.py's measures) with the requested
level, the mean per level and how often the measured tercile is the requested one. --grid writes
one image per caption at the config's guidance scale: a row per digit, columns the nine
(thickness, slant) words in caption order (thin upright, thin, thin slanted, upright, none, ...).
--speed times the train step and the guided 20-step sampler of the latent model and of the same
text model on pixels (the U-Net given one more level, so that its attention also runs at 7x7).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_ddpm.runtime import devices  # noqa: E402 (imports no JAX)

# One XLA CPU device per core, as the command line runs (set before JAX starts).
os.environ["XLA_FLAGS"] = devices.with_cpu_devices(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jax_ddpm
from benchmarks.common import machine_description, print_table, time_call
from jax_ddpm.config import builders
from jax_ddpm.data import captions
from jax_ddpm.evaluation import classifier, prompt_following
from jax_ddpm.io import paths
from jax_ddpm.runtime import mesh as mesh_lib
from jax_ddpm.samplers import program
from jax_ddpm.training import state as state_lib
from jax_ddpm.training.step import make_train_fn


def prompt_rows(model, per_prompt: int, guidance: float, predict, bins):
  """One row: per_prompt images of each caption (seeds 0..per_prompt-1, one compile)."""
  every = list(captions.all_captions())
  started = time.perf_counter()
  images = np.concatenate(
    [model.sample(prompts=every, guidance_scale=guidance, seed=seed) for seed in range(per_prompt)]
  )
  seconds = time.perf_counter() - started
  prompts = every * per_prompt
  found = prompt_following.measure(images, prompts, predict(images), bins)
  cells = []
  for name, unit in (("thickness", "px"), ("slant", "deg")):
    prop = getattr(found, name)
    means = " / ".join(f"{m:.2f}" for m in prop.mean_by_level)
    cells += [f"{prop.correlation:.3f}", f"{means} {unit}", f"{prop.level_accuracy:.3f}"]
  return [f"{guidance:g}", found.count, f"{found.label_accuracy:.3f}", *cells, f"{seconds:.0f}"]


FOLLOWING_HEADER = [
  "w",
  "images",
  "label acc.",
  "thickness r",
  "thickness by level",
  "tercile hit",
  "slant r",
  "slant by level",
  "tercile hit",
  "s (with compile)",
]


def following_rows(model, args, scales) -> list[list]:
  """A prompt_rows row per guidance scale, with the run's caption terciles and a classifier."""
  bins = captions.CaptionBins(
    **json.loads(paths.as_path(paths.join(args.workdir, "caption_bins.json")).read_text())
  )
  digits = classifier.load(args.classifier or paths.join(args.workdir, "feature_classifier.npz"))
  predict = nnx.jit(lambda network, x: network(x)[1].argmax(-1))
  label = lambda x: np.asarray(predict(digits, x))
  return [prompt_rows(model, args.per_prompt, w, label, bins) for w in scales]


def write_grid(model, path: str) -> None:
  images = model.sample(prompts=list(captions.all_captions()))
  labels = np.repeat(np.arange(10), captions.LEVELS * captions.LEVELS)
  jax_ddpm.save_grid(images, path, labels=labels)
  print(f"wrote {path}", file=sys.stderr)


def speed_rows(config) -> list[list]:
  """Train step and sampling seconds of the latent model and of the same model on pixels."""
  mesh = mesh_lib.data_mesh()
  pixel = config.replace(
    autoencoder={"checkpoint": ""},
    model={"ch_mult": (*config.model.ch_mult, config.model.ch_mult[-1])},
  )
  rows = []
  for name, run_config in (("latent 14x14x2", config), ("pixel 28x28x1", pixel)):
    run = builders.build(run_config)
    batch = run.config.training.batch_size
    graphdef, eval_graphdef, state = state_lib.create_train_state(
      run.network, 0, mesh, run.optimizer
    )
    train = make_train_fn(
      graphdef, run.schedule, run.optimizer, run.step_options, mesh, donate=False, encode=run.encode
    )
    rng = np.random.default_rng(0)
    sharding = mesh_lib.batch_sharding(mesh)
    data = {
      "image": jax.device_put(
        rng.uniform(-1, 1, (batch, *run.image_shape)).astype(np.float32), sharding
      ),
      "label": jax.device_put(rng.integers(0, 90, batch).astype(np.int32), sharding),
    }
    step_s = time_call(lambda: jax.block_until_ready(train(state, data)), repeats=5)[0]
    count = run.config.sampling.batch_size
    sample_fn = program.make_sample_fn(
      eval_graphdef,
      run.schedule,
      (count, *run.sample_shape),
      mesh,
      run.sampler,
      run.sampling_options,
      decode=run.decode,
    )
    key = jax.random.key(0)
    sample_s = time_call(lambda: jax.block_until_ready(sample_fn(state.params, key)), repeats=3)[0]
    parameters = sum(x.size for x in jax.tree.leaves(state.params))
    rows.append(
      [
        name,
        f"{parameters / 1e6:.2f}M",
        batch,
        f"{step_s:.3f}",
        f"{batch / step_s:.0f}",
        count,
        f"{sample_s:.2f}",
        f"{count / sample_s:.0f}",
      ]
    )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--per_prompt", type=int, default=8)
  parser.add_argument("--guidance", default="1,3,5", help="guidance scales ('': none)")
  parser.add_argument("--grid", default="")
  parser.add_argument("--speed", action="store_true")
  parser.add_argument(
    "--classifier", default="", help="digit classifier (default: WORKDIR/feature_classifier.npz)"
  )
  args = parser.parse_args()
  model = jax_ddpm.load(args.workdir)
  print(f"machine: {machine_description()}; checkpoint step {model.step}")
  if args.grid:
    write_grid(model, args.grid)
  scales = [float(w) for w in args.guidance.split(",") if w]
  if scales:
    print_table(FOLLOWING_HEADER, following_rows(model, args, scales))
  if args.speed:
    print_table(
      [
        "model",
        "params",
        "batch",
        "train step s",
        "images/s",
        "sample batch",
        "sample s (20 DDIM, guided)",
        "images/s",
      ],
      speed_rows(model.config),
    )


if __name__ == "__main__":
  main()
