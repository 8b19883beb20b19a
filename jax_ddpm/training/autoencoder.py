"""Training the first-stage autoencoder (models/autoencoder.py) and the latent scale the diffusion
stage divides its latents by.

`make_train_step` is the pure, jitted Adam step on the autoencoder's loss (reconstruction + a
small KL term); `fit` runs it over in-memory uint8 images; `latent_scale` is 1 / the standard
deviation of the training latents z ~ q(z | x) (LDM Sec. 4.3.2), so that z * scale has unit
variance, as the diffusion schedule assumes of its data.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_ddpm.models import autoencoder as autoencoder_lib


class FitResult(NamedTuple):
  model: autoencoder_lib.Autoencoder
  losses: np.ndarray  # [steps, 3]: total, reconstruction, KL per pixel
  scale_factor: float


def to_float(images: np.ndarray) -> jnp.ndarray:
  """uint8 images -> float32 in [-1, 1]."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
  """A jitted fn(params, opt_state, images float [-1, 1], rng) -> (params, opt_state, (total,
  reconstruction, kl))."""

  def objective(params, images, rng):
    return autoencoder_lib.loss(nnx.merge(graphdef, params), images, rng)

  @jax.jit
  def step(params, opt_state, images, rng):
    (total, (reconstruction, kl)), grads = jax.value_and_grad(objective, has_aux=True)(
      params, images, rng
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jnp.stack([total, reconstruction, kl])

  return step


def latent_scale(model: autoencoder_lib.Autoencoder, images: np.ndarray, seed: int = 0) -> float:
  """1 / std of z ~ q(z | x) over `images` (uint8), LDM's scale factor."""
  mean, log_variance = jax.jit(lambda x: model.encode(x))(to_float(images))
  z = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(jax.random.key(seed), mean.shape)
  return float(1.0 / jnp.std(z))


def fit(
  config: autoencoder_lib.AutoencoderConfig,
  images: np.ndarray,
  *,
  steps: int,
  batch_size: int,
  learning_rate: float = 1e-3,
  seed: int = 0,
) -> FitResult:
  """The autoencoder trained for `steps` Adam steps on batches drawn from uint8 `images`."""
  model = autoencoder_lib.Autoencoder(config, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)
  step = make_train_step(graphdef, optimizer)
  order = np.random.default_rng(seed)
  rng, losses = jax.random.key(seed), []
  for index in range(steps):
    batch = to_float(images[order.choice(len(images), batch_size, replace=False)])
    params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(rng, index))
    losses.append(metrics)
  model = nnx.merge(graphdef, params)
  return FitResult(model, np.asarray(jnp.stack(losses)), latent_scale(model, images[:1000]))
