"""The TrainState: what a run consists of, how it is created, saved and read back.

Shared by training (train.py), sampling (sampling.py) and weight import (main.py --mode=import).
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

from jax_ddpm import checkpointing, config_checks, errors, files, parallel
from jax_ddpm.models.unet import RUNTIME_FIELDS, UNet
from jax_ddpm.schedules import DiffusionSchedule, get_schedule


@flax.struct.dataclass
class TrainState:
  """Everything needed to continue a run exactly."""
  step: jax.Array  # int32 scalar: steps taken
  params: nnx.State
  ema_params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array  # uint32 key data of the run's base key; per-step keys fold in the step
  nonfinite_steps: jax.Array  # int32: steps whose update was withheld for a non-finite loss/grad


def schedule_from_config(config) -> DiffusionSchedule:
  d = config.diffusion
  return get_schedule(d.schedule, d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)


def learning_rate_schedule(optim_config) -> optax.Schedule:
  """Linear warm-up from 0 to the learning rate, then constant (DDPM Appendix B)."""
  if optim_config.warmup_steps == 0:
    return optax.constant_schedule(optim_config.learning_rate)
  return optax.linear_schedule(0.0, optim_config.learning_rate, optim_config.warmup_steps)


def create_optimizer(optim_config) -> optax.GradientTransformation:
  """Adam with global-norm gradient clipping."""
  adam = optax.adam(learning_rate_schedule(optim_config), b1=optim_config.adam_b1,
                    b2=optim_config.adam_b2, eps=optim_config.adam_eps)
  if optim_config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), adam)
  return adam


def ema_decay_at(step: jax.Array, optim_config) -> jax.Array:
  """The EMA decay at `step`; with warm-up min(decay, (1 + step)/(10 + step))."""
  decay = jnp.asarray(optim_config.ema_decay, jnp.float32)
  if optim_config.ema_warmup:
    step = step.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def run_metadata(config) -> dict:
  """The JSON saved beside each checkpoint: architecture, diffusion process and whole config."""
  model = dataclasses.asdict(config_checks.unet_config(config))
  for runtime_choice in RUNTIME_FIELDS:
    model.pop(runtime_choice)
  return {"model": model, "diffusion": config.diffusion.to_dict(),
          "config": config.to_dict()}


def create_model(config, seed: int) -> UNet:
  return UNet(config_checks.unet_config(config), rngs=nnx.Rngs(params=seed))


def _graphdefs_and_init(config, mesh: jax.sharding.Mesh, optimizer: optax.GradientTransformation):
  abstract = nnx.eval_shape(lambda: create_model(config, config.seed))
  abstract.train()
  train_graphdef = nnx.graphdef(abstract)
  abstract.eval()
  eval_graphdef = nnx.graphdef(abstract)

  @functools.partial(jax.jit, out_shardings=parallel.replicated(mesh))
  def init():
    params = nnx.state(create_model(config, config.seed), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(config.seed)),
                      nonfinite_steps=jnp.zeros((), jnp.int32))

  return train_graphdef, eval_graphdef, init


def create_train_state(config, mesh: jax.sharding.Mesh, optimizer: optax.GradientTransformation):
  """(train-mode graphdef, eval-mode graphdef, fresh TrainState replicated over the mesh)."""
  train_graphdef, eval_graphdef, init = _graphdefs_and_init(config, mesh, optimizer)
  return train_graphdef, eval_graphdef, init()


def abstract_train_state(config, mesh: jax.sharding.Mesh, optimizer: optax.GradientTransformation):
  """As create_train_state, but the state is shapes and shardings only: a restore target."""
  train_graphdef, eval_graphdef, init = _graphdefs_and_init(config, mesh, optimizer)
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
  _, eval_graphdef, abstract = abstract_train_state(config, mesh,
                                                    create_optimizer(config.optim))
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
  from jax_ddpm import convert  # pylint: disable=g-import-not-at-top

  config_checks.validate_model_and_diffusion(config)
  _, params = convert.load_diffusers_unet(diffusers_dir, config_checks.unet_config(config))
  existing = files.join(workdir, "checkpoints")
  if files.list_names(existing):
    raise errors.ConfigError(f"{existing} already holds checkpoints; import into an empty "
                          "--workdir. Nothing was written.")
  mesh = parallel.data_mesh()
  optimizer = create_optimizer(config.optim)
  _, _, state = create_train_state(config, mesh, optimizer)
  params = jax.device_put(params, parallel.replicated(mesh))
  state = state.replace(params=params, ema_params=params,
                        opt_state=jax.jit(optimizer.init)(params))
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.training.keep_checkpoints)
  checkpointer.save(0, state, run_metadata(config))
  checkpointer.close()  # waits for the save
  return 0
