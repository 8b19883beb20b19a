"""The first-stage autoencoder of latent diffusion: its shapes, its KL term, its latent scale, and
its round trip on real digits after a short training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_ddpm
from jax_ddpm.data import sources
from jax_ddpm.io.errors import ConfigError
from jax_ddpm.models import autoencoder
from jax_ddpm.models.autoencoder import Autoencoder, AutoencoderConfig
from jax_ddpm.training import autoencoder as training

SMALL = AutoencoderConfig(ch=16, z_channels=2)
# Held-out mean squared error on [-1, 1] pixels after 150 steps of batch 32 on 1000 digits:
# 0.016 measured (2-core AMD EPYC, 2026-12-05); the pixels' own variance is 0.39.
ROUND_TRIP_MSE = 0.03


@pytest.fixture(scope="module")
def digits():
  images = sources.create_source(jax_ddpm.load_config("mnist").data).read(np.arange(5000))
  order = np.random.default_rng(0).permutation(len(images))
  return images[order[:1000]], images[order[4500:4756]]


@pytest.fixture(scope="module")
def trained(digits):
  return training.fit(SMALL, digits[0], steps=150, batch_size=32)


def test_the_latent_is_the_image_downsampled_by_two_per_extra_level():
  model = Autoencoder(AutoencoderConfig(ch=16, ch_mult=(1, 2, 2), z_channels=3), rngs=nnx.Rngs(0))
  mean, log_variance = model.encode(jnp.zeros((2, 28, 28, 1)))
  assert mean.shape == log_variance.shape == (2, 7, 7, 3)
  assert model.decode(mean).shape == (2, 28, 28, 1)
  with pytest.raises(ValueError, match=r"expects latents \[B, 7, 7, 3\]"):
    model.decode(jnp.zeros((2, 14, 14, 3)))
  with pytest.raises(
    ConfigError, match=r"image_size=30 must be divisible by its downsampling factor 4"
  ):
    AutoencoderConfig(image_size=30, ch_mult=(1, 2, 2)).validate()


def test_the_kl_term_is_the_gaussians_closed_form():
  mean = jnp.array([[0.5, -1.0]])
  log_variance = jnp.log(jnp.array([[2.0, 0.25]]))
  expected = sum(np.log(1 / s2) / 2 + (s2 + m**2) / 2 - 0.5 for m, s2 in ((0.5, 2.0), (-1.0, 0.25)))
  assert float(autoencoder.kl_to_standard_normal(mean, log_variance)[0]) == pytest.approx(expected)
  assert float(autoencoder.kl_to_standard_normal(jnp.zeros((1, 3)), jnp.zeros((1, 3)))[0]) == 0.0


def test_a_short_training_reconstructs_held_out_digits(trained, digits):
  held_out = training.to_float(digits[1])
  mean, _ = trained.model.encode(held_out)
  error = float(jnp.mean((trained.model.decode(mean) - held_out) ** 2))
  print(f"held-out MSE {error:.4f}, pixel variance {float(jnp.var(held_out)):.3f}")
  assert error < ROUND_TRIP_MSE
  assert trained.losses[-10:, 1].mean() < trained.losses[:10, 1].mean() / 5


def test_the_scale_factor_gives_the_training_latents_unit_variance(trained, digits):
  mean, log_variance = trained.model.encode(training.to_float(digits[0][:1000]))
  z = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(jax.random.key(0), mean.shape)
  assert float(jnp.std(z * trained.scale_factor)) == pytest.approx(1.0, abs=1e-5)
