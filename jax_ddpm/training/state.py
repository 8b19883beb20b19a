"""The training state: what a run consists of, and how a fresh one is created.

Everything needed to continue a run exactly: the step, the weights and their EMA, the
optimizer's moments, the run's base key, the count of withheld updates, and the per-timestep
loss history of importance-sampled runs; for latent diffusion's first stage, the autoencoder's
step, weights and moments (AutoencoderState). checkpointing.py saves and restores both.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_ddpm.diffusion import timesteps
from jax_ddpm.models import autoencoder as autoencoder_lib
from jax_ddpm.runtime import mesh as mesh_lib

if TYPE_CHECKING:
  from jax_ddpm.models.prompted_unet import PromptedUNetConfig
  from jax_ddpm.models.unet import UNetConfig


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
  timestep_history: timesteps.TimestepHistory | None = None


def network(config: UNetConfig | PromptedUNetConfig, rngs: nnx.Rngs) -> nnx.Module:
  """The denoiser a config describes: the U-Net, or a text model's encoder and U-Net."""
  return config.build(rngs)


def _graphdefs_and_init(
  unet: UNetConfig | PromptedUNetConfig,
  seed: int,
  mesh: jax.sharding.Mesh,
  optimizer: optax.GradientTransformation,
  history_timesteps: int,
):
  abstract = nnx.eval_shape(lambda: network(unet, nnx.Rngs(params=seed)))
  abstract.train()
  train_graphdef = nnx.graphdef(abstract)
  abstract.eval()
  eval_graphdef = nnx.graphdef(abstract)

  @functools.partial(jax.jit, out_shardings=mesh_lib.replicated(mesh))
  def init():
    params = nnx.state(network(unet, nnx.Rngs(params=seed)), nnx.Param)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=optimizer.init(params),
      rng=jax.random.key_data(jax.random.key(seed)),
      nonfinite_steps=jnp.zeros((), jnp.int32),
      timestep_history=(timesteps.empty_history(history_timesteps) if history_timesteps else None),
    )

  return train_graphdef, eval_graphdef, init


def create_train_state(
  unet: UNetConfig | PromptedUNetConfig,
  seed: int,
  mesh: jax.sharding.Mesh,
  optimizer: optax.GradientTransformation,
  history_timesteps: int = 0,
):
  """(train-mode graphdef, eval-mode graphdef, fresh TrainState replicated over the mesh).

  The weights are initialised from `seed`, which is also the run's base key (TrainState.rng).
  history_timesteps = T gives the state an empty loss history for importance-sampled t
  (config/builders.py's history_timesteps).
  """
  train_graphdef, eval_graphdef, init = _graphdefs_and_init(
    unet, seed, mesh, optimizer, history_timesteps
  )
  return train_graphdef, eval_graphdef, init()


def abstract_train_state(
  unet: UNetConfig | PromptedUNetConfig,
  seed: int,
  mesh: jax.sharding.Mesh,
  optimizer: optax.GradientTransformation,
):
  """As create_train_state, but the state is shapes and shardings only: a restore target."""
  train_graphdef, eval_graphdef, init = _graphdefs_and_init(unet, seed, mesh, optimizer, 0)
  replicated = mesh_lib.replicated(mesh)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(init)
  )
  return train_graphdef, eval_graphdef, abstract


@flax.struct.dataclass
class AutoencoderState:
  """What the first stage's run continues from: the step, the weights, Adam's moments."""

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


def create_autoencoder_state(
  network: autoencoder_lib.AutoencoderConfig,
  seed: int,
  optimizer: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
) -> tuple[nnx.GraphDef, AutoencoderState]:
  """(graphdef, a fresh AutoencoderState replicated over the mesh), weights from `seed`."""
  model = autoencoder_lib.Autoencoder(network, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  state = AutoencoderState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  return graphdef, jax.device_put(state, mesh_lib.replicated(mesh))
