"""--mode=eval: a checkpoint's sample quality and likelihood, written as JSON and summaries.

Protocol (written into every result file, so that a number never travels without it):
  1. Samples: eval.num_samples images drawn in memory with the run's sampling section (EMA
     weights, sampler, steps, seed) by the program --mode=sample uses, so they are the images it
     writes; or read from the .npz that eval.samples names ('arr_0', uint8 NHWC, as written by
     --mode=sample and by OpenAI's guided-diffusion tools).
  2. Features and scores: scoring.py's Scorer in eval.feature_net's features (FID in the
     Inception's), against the statistics of split eval.reference_split of the data.
  3. With eval.bits_per_dim: the bound in bits/dim of split eval.bpd_split (likelihood.py; DDPM
     Table 2's "NLL Test").
Process 0 writes workdir/eval/<samples>_<net>_<N>.json (<samples>: the name of --mode=sample's
directory for the same settings, or the given file's name) and <step>_bits_per_dim_<split>.json,
and the headline numbers as eval/ scalars. The DDPM paper reports FID of 50,000 samples against
the CIFAR-10 training set.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np
from absl import logging
from etils import epath

from jax_ddpm.data import captions, sources
from jax_ddpm.evaluation import features, likelihood, metrics, scoring
from jax_ddpm.io import errors, summaries
from jax_ddpm.io import paths as files
from jax_ddpm.runtime import mesh as mesh_lib
from jax_ddpm.samplers import program as program_lib

if TYPE_CHECKING:
  from jax_ddpm.config.builders import Run

# () -> (eval-mode graphdef, TrainState, step) of the checkpoint evaluated.
ModelLoader = Callable[[], tuple]


def evaluate(
  run: Run, workdir: str, load_model: ModelLoader, mesh: jax.sharding.Mesh | None = None
) -> dict:
  """--mode=eval; returns the results written to workdir/eval/: sample quality (eval.num_samples
  > 0) and the bound in bits/dim (eval.bits_per_dim). Every file the config names is read, and
  the checkpoint found, before anything is drawn or compiled."""
  mesh = mesh or mesh_lib.data_mesh()
  evaluation = run.config.eval
  if evaluation.num_samples:
    metrics.check_full_rank_possible(
      evaluation.num_samples,
      features.FEATURE_DIMS[evaluation.feature_net],
      f"eval.num_samples={evaluation.num_samples}",
    )
  bpd_source = None
  if evaluation.bits_per_dim:
    bpd_source = sources.create_split_source(
      run.config.data, evaluation.bpd_split, labels=run.config.model.num_classes is not None
    )
    sources.check_source_shape(bpd_source, run.config.data)
  load_model = functools.cache(load_model)
  results = {}
  if evaluation.num_samples:
    results.update(sample_quality(run, workdir, mesh, load_model))
  if evaluation.bits_per_dim:
    results.update(bits_per_dim(run, workdir, mesh, bpd_source, load_model))
  return results


def sample_quality(
  run: Run, workdir: str, mesh: jax.sharding.Mesh, load_model: ModelLoader
) -> dict:
  """The Scorer's numbers of eval.num_samples images, written as <samples>_<net>_<N>.json."""
  evaluation = run.config.eval
  extractor = features.create_extractor(evaluation, run.config.data, workdir, mesh)
  if evaluation.samples:
    images, labels = given_samples(run)
    protocol, program = {"samples": evaluation.samples}, None
  else:
    program = program_lib.from_run(run, *load_model(), mesh)
    protocol = {"samples": program.name, **program.settings}
  scorer = scoring.Scorer.create(extractor, evaluation, run.config.data, workdir)
  if program is not None:
    images, labels = program.draw(evaluation.num_samples)
    if program.prompts is not None:  # a text model: scored on the digit each prompt asks for
      labels = captions.requested_digits(program.prompts)[labels]
  count = evaluation.num_samples
  started = time.perf_counter()
  results = scorer.score(images[:count], None if labels is None else labels[:count])
  results.update(
    {
      "feature_net": extractor.name,
      "num_samples": count,
      "reference": scorer.reference_file,
      "reference_count": scorer.reference.count,
      "reference_split": evaluation.reference_split,
      **{f"protocol.{k}": v for k, v in protocol.items()},
      "feature_seconds": time.perf_counter() - started,
    }
  )
  name = epath.Path(evaluation.samples).stem if evaluation.samples else program.name
  write_results(workdir, results, f"{name}_{extractor.name}_{count}")
  return results


def bits_per_dim(
  run: Run, workdir: str, mesh: jax.sharding.Mesh, source, load_model: ModelLoader
) -> dict:
  """The bound in bits/dim of eval.bpd_images images of `source`, with eval.bpd_timesteps KL
  terms per image, written as <step>_bits_per_dim_<split>.json."""
  evaluation, sampling = run.config.eval, run.config.sampling
  eval_graphdef, state, step = load_model()
  params = state.ema_params if sampling.use_ema else state.params
  started = time.perf_counter()
  terms_fn = likelihood.make_terms_fn(eval_graphdef, run.schedule, mesh, run.bound)
  results = likelihood.bits_per_dim(
    terms_fn,
    params,
    run.schedule,
    source,
    mesh,
    batch_size=evaluation.batch_size,
    num_images=evaluation.bpd_images,
    num_terms=evaluation.bpd_timesteps,
    seed=run.config.seed,
    conditional=run.config.model.num_classes is not None,
  )
  results.update(
    {
      "bpd_seconds": time.perf_counter() - started,
      "protocol.step": step,
      "protocol.use_ema": bool(sampling.use_ema),
      "protocol.variance": run.bound.variance.value,
      "bpd_split": evaluation.bpd_split,
      "data.source": run.config.data.source,
    }
  )
  write_results(workdir, results, f"{step}_bits_per_dim_{evaluation.bpd_split}")
  return results


def given_samples(run: Run) -> tuple[np.ndarray, np.ndarray | None]:
  """eval.samples (and its 'labels', or the digits its 'prompts' ask for), checked against the
  configured image shape and eval.num_samples."""
  path, data = run.config.eval.samples, run.config.data
  arrays = files.read_npz(path, "eval.samples")
  if "arr_0" not in arrays:
    raise errors.InputFileError(
      f"eval.samples={path!r} has no ['arr_0'] array (it has {sorted(arrays)})."
    )
  images = arrays["arr_0"]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise errors.InputFileError(
      f"eval.samples={path!r}: expected uint8 images [N, H, W, 1 or "
      f"3] under 'arr_0', got {images.dtype} {images.shape}."
    )
  labels = arrays.get("labels")
  if "prompts" in arrays:  # a text model's samples: scored on the digit each prompt asks for
    labels = captions.requested_digits(arrays["prompts"])
  if labels is not None and labels.shape != images.shape[:1]:
    raise errors.InputFileError(
      f"eval.samples={path!r}: 'labels' has shape {labels.shape}, but "
      f"there are {len(images)} images."
    )
  size, channels = data.image_size, data.channels
  if images.shape[1:] != (size, size, channels):
    raise errors.InputFileError(
      f"eval.samples={path!r} holds images of shape "
      f"{images.shape[1:]}, but config.data gives "
      f"{size}x{size}x{channels}."
    )
  if len(images) < run.config.eval.num_samples:
    raise errors.InputFileError(
      f"eval.samples={path!r} holds {len(images)} images; "
      f"eval.num_samples={run.config.eval.num_samples}."
    )
  return images, labels


def write_results(workdir: str, results: dict, name: str) -> None:
  """workdir/eval/<name>.json and the headline numbers as eval/ scalars, by process 0."""
  if jax.process_index() != 0:
    return
  step = int(results.get("protocol.step", 0))
  path = files.join(workdir, "eval", name + ".json")
  files.save_json(path, results)
  writer = summaries.create_writer(workdir)
  scalars = {f"eval/{k}": v for k, v in results.items() if k in scoring.SUMMARY_SCALARS}
  writer.write_scalars(step, scalars)
  writer.flush()
  logging.info("Wrote %s: %s", path, scalars)
