"""The first stage of latent diffusion (Rombach et al. 2022, LDM, Sec. 3.1): a KL-regularised
convolutional autoencoder that maps an image x [H, W, C] to a latent z [H/f, W/f, z_channels]
and back, f = 2^(len(ch_mult) - 1).

The encoder outputs the mean and log-variance of a diagonal Gaussian q(z | x); training samples
z = mu + sigma n by reparameterisation (Kingma & Welling 2014, eq. 10) and minimises the
reconstruction error plus kl_weight times KL(q(z | x) || N(0, I)) (LDM Sec. 3.1 and Appendix G:
a small weight, so the latent keeps the detail and is only kept from growing without bound).
The diffusion model then runs on z / scale_factor, where scale_factor is the standard deviation of
the training latents (LDM Sec. 4.3.2: unit variance, as the noise schedule assumes of its data).

Layers follow the U-Net's (models/unet.py): residual blocks of GroupNorm, swish and 3x3 convs
without the time embedding, stride-2 convs down, nearest-neighbour upsampling and a conv up.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ddpm.io.errors import ConfigError
from jax_ddpm.models.group_norm import GroupNorm


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """image_size, channels: the images; ch, ch_mult, num_res_blocks: the widths and depth of each
  resolution (f = 2^(len(ch_mult) - 1)); z_channels: the latent's channels; num_groups: the
  GroupNorm's; kl_weight: the KL term's weight in the loss."""

  image_size: int = 28
  channels: int = 1
  ch: int = 32
  ch_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 1
  z_channels: int = 2
  num_groups: int = 8
  kl_weight: float = 1e-6

  def validate(self) -> None:
    factor = self.downsampling_factor
    if self.image_size % factor:
      raise ConfigError(
        f"data.image_size={self.image_size} must be divisible by its downsampling factor "
        f"{factor} (2^(len(autoencoder.ch_mult) - 1), ch_mult={self.ch_mult})."
      )
    for width in {self.ch * m for m in self.ch_mult}:
      if width % self.num_groups:
        raise ConfigError(
          f"autoencoder width {width} (ch * ch_mult) is not divisible by "
          f"autoencoder.num_groups={self.num_groups}."
        )
    if not self.kl_weight >= 0:
      raise ConfigError(f"autoencoder.kl_weight must be >= 0, got {self.kl_weight!r}.")

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    side = self.image_size // self.downsampling_factor
    return side, side, self.z_channels


def _norm(channels, config, rngs):
  return GroupNorm(
    channels, num_groups=config.num_groups, epsilon=1e-6, use_fast_variance=False, rngs=rngs
  )


def _conv(in_ch, out_ch, rngs, strides=1, padding="SAME"):
  return nnx.Conv(in_ch, out_ch, (3, 3), strides=strides, padding=padding, rngs=rngs)


class Block(nnx.Module):
  """x + conv(swish(GN(conv(swish(GN(x)))))), with a 1x1 projection when the width changes."""

  def __init__(self, in_ch: int, out_ch: int, config: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.norm1, self.conv1 = _norm(in_ch, config, rngs), _conv(in_ch, out_ch, rngs)
    self.norm2, self.conv2 = _norm(out_ch, config, rngs), _conv(out_ch, out_ch, rngs)
    self.shortcut = nnx.Linear(in_ch, out_ch, rngs=rngs) if in_ch != out_ch else None

  def __call__(self, x):
    h = self.conv1(self.norm1(x, swish=True))
    h = self.conv2(self.norm2(h, swish=True))
    return (x if self.shortcut is None else self.shortcut(x)) + h


class Encoder(nnx.Module):
  """x [B, H, W, C] -> (mean, log-variance) of q(z | x), each [B, H/f, W/f, z_channels]."""

  def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.conv_in = _conv(config.channels, config.ch, rngs)
    layers, width = [], config.ch
    for level, mult in enumerate(config.ch_mult):
      for _ in range(config.num_res_blocks):
        layers.append(Block(width, config.ch * mult, config, rngs=rngs))
        width = config.ch * mult
      if level != len(config.ch_mult) - 1:
        layers.append(_conv(width, width, rngs, strides=2, padding=((0, 1), (0, 1))))
    self.layers = nnx.List(layers)
    self.mid = Block(width, width, config, rngs=rngs)
    self.norm_out = _norm(width, config, rngs)
    self.conv_out = _conv(width, 2 * config.z_channels, rngs)

  def __call__(self, x):
    h = self.conv_in(x)
    for layer in self.layers:
      h = layer(h)
    h = self.conv_out(self.norm_out(self.mid(h), swish=True))
    mean, log_variance = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(log_variance, -30.0, 20.0)


class Decoder(nnx.Module):
  """z [B, H/f, W/f, z_channels] -> the reconstruction [B, H, W, C]."""

  def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
    width = config.ch * config.ch_mult[-1]
    self.conv_in = _conv(config.z_channels, width, rngs)
    self.mid = Block(width, width, config, rngs=rngs)
    layers = []
    for level in reversed(range(len(config.ch_mult))):
      for _ in range(config.num_res_blocks):
        layers.append(Block(width, config.ch * config.ch_mult[level], config, rngs=rngs))
        width = config.ch * config.ch_mult[level]
      if level != 0:
        layers.append(Upsample(width, rngs=rngs))
    self.layers = nnx.List(layers)
    self.norm_out = _norm(width, config, rngs)
    self.conv_out = _conv(width, config.channels, rngs)

  def __call__(self, z):
    h = self.mid(self.conv_in(z))
    for layer in self.layers:
      h = layer(h)
    return self.conv_out(self.norm_out(h, swish=True))


class Upsample(nnx.Module):
  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Autoencoder(nnx.Module):
  """encode: x -> (mean, log-variance); decode: z -> x; images in [-1, 1]."""

  def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)

  def encode(self, x):
    expected = (self.config.image_size, self.config.image_size, self.config.channels)
    if x.shape[1:] != expected:
      raise ValueError(
        f"Autoencoder expects images [B, {', '.join(map(str, expected))}], got {x.shape}."
      )
    return self.encoder(x)

  def decode(self, z):
    if z.shape[1:] != self.config.latent_shape:
      raise ValueError(
        f"Autoencoder expects latents [B, {', '.join(map(str, self.config.latent_shape))}], "
        f"got {z.shape}."
      )
    return self.decoder(z)


def kl_to_standard_normal(mean, log_variance):
  """KL(N(mean, exp(log_variance)) || N(0, I)) per example, summed over the latent:
  0.5 sum(mean^2 + sigma^2 - 1 - log sigma^2) (Kingma & Welling 2014, Appendix B)."""
  terms = mean**2 + jnp.exp(log_variance) - 1.0 - log_variance
  return 0.5 * jnp.sum(terms, axis=tuple(range(1, mean.ndim)))


def loss(model: Autoencoder, x, rng):
  """(mean squared reconstruction error + kl_weight * KL per pixel, its two terms), for a
  batch of images x in [-1, 1], with z = mean + sigma n (Kingma & Welling 2014, eq. 10)."""
  mean, log_variance = model.encode(x)
  z = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(rng, mean.shape)
  reconstruction = jnp.mean((model.decode(z) - x) ** 2)
  kl = jnp.mean(kl_to_standard_normal(mean, log_variance)) / x[0].size
  return reconstruction + model.config.kl_weight * kl, (reconstruction, kl)


@dataclasses.dataclass(frozen=True, eq=False)
class Codec:
  """A trained autoencoder as the diffusion stage sees it: images in [-1, 1] to latents scaled
  to unit variance (z * scale_factor, LDM Sec. 4.3.2) and back. Its weights are constants of the
  programs that call it: the first stage is frozen while the diffusion model trains."""

  config: AutoencoderConfig
  graphdef: nnx.GraphDef
  params: nnx.State
  scale_factor: float

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    return self.config.latent_shape

  def encode(self, x, key):
    """z ~ q(z | x) by z = mu + sigma n (Kingma & Welling 2014, eq. 10), scaled: the diffusion
    model's x_0 (a fresh draw each step, as LDM)."""
    mean, log_variance = nnx.merge(self.graphdef, self.params).encode(x)
    z = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(key, mean.shape, mean.dtype)
    return z * self.scale_factor

  def decode(self, z):
    """The image of a scaled latent, clipped to [-1, 1]."""
    x = nnx.merge(self.graphdef, self.params).decode(z / self.scale_factor)
    return jnp.clip(x, -1.0, 1.0)
