"""The TrainState: what a run consists of, how it is created, saved and read back.

Shared by training (train.py), sampling (sample_mode.py, evaluate.py, visualize.py) and weight
import (main.py --mode=import).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jax_ddpm.config import builders
from jax_ddpm.training import checkpointing
from jax_ddpm.config import checks as config_checks
from jax_ddpm.io import errors
from jax_ddpm.io import paths as files
from jax_ddpm.runtime import mesh as parallel
from jax_ddpm.diffusion import timesteps as timestep_sampling
from jax_ddpm.models.unet import RUNTIME_FIELDS, UNet, UNetConfig


@flax.struct.dataclass
class TrainState:
  """Everything needed to continue a run exactly."""
  step: jax.Array  # int32 scalar: steps taken
  params: nnx.State
  ema_params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array  # uint32 key data of the run's base key; per-step keys fold in the step
  nonfinite_steps: jax.Array  # int32: steps whose update was withheld for a non-finite loss/grad
  # Runs with importance-sampled t only (training.timestep_sampling); None otherwise, and then
  # absent from the checkpoint (checkpointing.py restores states saved with or without it).
  timestep_history: Optional[timestep_sampling.TimestepHistory] = None


def run_metadata(config) -> dict:
  """The JSON saved beside each checkpoint: architecture, diffusion process and whole config."""
  model = dataclasses.asdict(builders.unet_config(config))
  for runtime_choice in RUNTIME_FIELDS:
    model.pop(runtime_choice)
  return {"model": model, "diffusion": config.diffusion.to_dict(),
          "config": config.to_dict()}


def _graphdefs_and_init(unet: UNetConfig, seed: int, mesh: jax.sharding.Mesh,
                        optimizer: optax.GradientTransformation, history_timesteps: int):
  abstract = nnx.eval_shape(lambda: UNet(unet, rngs=nnx.Rngs(params=seed)))
  abstract.train()
  train_graphdef = nnx.graphdef(abstract)
  abstract.eval()
  eval_graphdef = nnx.graphdef(abstract)

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
  def init():
    params = nnx.state(UNet(unet, rngs=nnx.Rngs(params=seed)), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      nonfinite_steps=jnp.zeros((), jnp.int32),
                      timestep_history=(timestep_sampling.empty_history(history_timesteps)
                                        if history_timesteps else None))

  return train_graphdef, eval_graphdef, init


def create_train_state(unet: UNetConfig, seed: int, mesh: jax.sharding.Mesh,
                       optimizer: optax.GradientTransformation, history_timesteps: int = 0):
  """(train-mode graphdef, eval-mode graphdef, fresh TrainState replicated over the mesh).

  The weights are initialised from `seed`, which is also the run's base key (TrainState.rng).
  history_timesteps = T gives the state an empty loss history for importance-sampled t
  (builders.history_timesteps).
  """
  train_graphdef, eval_graphdef, init = _graphdefs_and_init(unet, seed, mesh, optimizer,
                                                            history_timesteps)
  return train_graphdef, eval_graphdef, init()


def abstract_train_state(unet: UNetConfig, seed: int, mesh: jax.sharding.Mesh,
                         optimizer: optax.GradientTransformation):
  """As create_train_state, but the state is shapes and shardings only: a restore target."""
  train_graphdef, eval_graphdef, init = _graphdefs_and_init(unet, seed, mesh, optimizer, 0)
  replicated = parallel.replicated(mesh)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(init))
  return train_graphdef, eval_graphdef, abstract


def load_checkpoint(config, workdir: str, step: Optional[int] = None):
  """(eval-mode graphdef, TrainState, step) of a workdir's checkpoint, latest unless `step`.

  Fails, before anything is compiled or written, when the workdir has no checkpoint, lacks
  `step`, or holds another model.
  """
  directory = files.join(files.as_path(workdir), "checkpoints")
  checkpointer = (checkpointing.Checkpointer(workdir, create=False)
                  if files.is_dir(directory) else None)
  steps = checkpointer.all_steps() if checkpointer else []
  if not steps:
    raise errors.MissingInputError(f"No checkpoint in {directory}: train first (--mode=train) or "
                                   "import weights (--mode=import).")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise errors.ConfigError(f"No checkpoint of step {step} (--step) in {directory}; available: {sorted(steps)}.")
  checkpointer.check_compatible(step, run_metadata(config))
  mesh = parallel.data_mesh()
  _, eval_graphdef, abstract = abstract_train_state(builders.unet_config(config), config.seed,
                                                    mesh, builders.optimizer(config))
  try:
    restored = checkpointer.restore(step, abstract)
  except Exception as error:  # orbax and tensorstore raise many types for damaged files
    earlier = sorted(s for s in steps if s < step)
    raise checkpointing.UnreadableCheckpointError(
        f"The checkpoint of step {step} in {directory} cannot be read: {type(error).__name__}: "
        f"{str(error)[:500]}\nEarlier checkpoints (choose one with --step): {earlier}.") from error
  finally:
    checkpointer.close()
  return eval_graphdef, restored, step


def import_diffusers_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                                diffusers_dir: str) -> int:
  """Writes a diffusers UNet2DModel folder's weights as the step-0 checkpoint of `workdir`.

  Params and EMA params both take the imported weights, so sampling and fine-tuning start from
  them. Refuses a workdir that already holds checkpoints. Returns the step written (0).
  """
  from jax_ddpm.models import diffusers_weights as convert  # pylint: disable=g-import-not-at-top

  config_checks.validate_model_and_diffusion(config)
  unet = builders.unet_config(config)
  _, params = convert.load_diffusers_unet(diffusers_dir, unet)
  existing = files.join(workdir, "checkpoints")
  if files.list_names(existing):
    raise errors.ConfigError(f"{existing} already holds checkpoints; import into an empty "
                          "--workdir. Nothing was written.")
  mesh = parallel.data_mesh()
  optimizer = builders.optimizer(config)
  _, _, state = create_train_state(unet, config.seed, mesh, optimizer)
  params = jax.device_put(params, parallel.replicated(mesh))
  state = state.replace(params=params, ema_params=params,
                        opt_state=jax.jit(optimizer.init)(params))
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.training.keep_checkpoints)
  checkpointer.save(0, state, run_metadata(config))
  checkpointer.close()  # waits for the save
  return 0
