"""The noise-prediction U-Net of Ho et al. 2020 (Appendix B), in Flax NNX.

Layer for layer the network of the original DDPM code (`diffusion_tf/models/unet.py`), so that
the published DDPM weights load (diffusers_weights.py): a sinusoidal timestep embedding and a
4*ch MLP;
at each resolution `num_res_blocks` residual blocks (GroupNorm -> swish -> conv3x3 -> + time
projection -> GroupNorm -> swish -> dropout -> conv3x3), self-attention at the resolutions in
`attn_resolutions`, a stride-2 conv down; a middle of block, attention, block; the mirror path up
with skip connections from every down-path activation and nearest-neighbour upsampling + conv.

Parameters are float32; `compute_dtype` sets the dtype of convolutions, dense layers and
attention matmuls (GroupNorm statistics and softmax stay float32).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ddpm.io.errors import ConfigError
from jax_ddpm.models.cross_attention import CrossAttentionBlock
from jax_ddpm.models.group_norm import GroupNorm

# The original network's initialiser: variance scaling, fan_avg, uniform (`default_init`);
# its layers with init_scale 0 (last conv of each block, attention output, network output)
# start at zero so that every residual branch is the identity at initialisation.
default_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nnx.initializers.zeros_init()
GROUP_NORM_EPSILON = 1e-6  # tf.contrib.layers.group_norm's default, used by the original


# Fields that choose how the network runs or trains, not what it is: checkpoints and imported
# weights may differ in them.
RUNTIME_FIELDS = ("dropout", "compute_dtype", "remat")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of the U-Net; the defaults are the DDPM CIFAR-10 model (35.7M params)."""

  image_size: int = 32
  in_channels: int = 3
  out_channels: int = 3
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  num_groups: int = 32
  # None: single-head attention over all channels, as the paper. An int: heads of that size.
  attention_head_dim: int | None = None
  num_classes: int | None = None
  # The width of a text encoder's token features: each attention resolution then also
  # cross-attends to them (models/cross_attention.py). None: no text conditioning.
  context_dim: int | None = None
  compute_dtype: str = "float32"
  # Recompute each residual block's activations in the backward pass instead of storing them
  # (jax.checkpoint): less memory for more compute.
  remat: bool = False

  def build(self, rngs: nnx.Rngs) -> UNet:
    """The network (training/state.py builds every denoiser this way)."""
    return UNet(self, rngs=rngs)

  def validate(self) -> None:
    """Raises ConfigError naming the first inconsistent field (by its run-config key)."""
    levels = len(self.ch_mult)
    if levels < 1 or any(m < 1 for m in self.ch_mult):
      raise ConfigError(
        f"model.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}."
      )
    if self.image_size % 2 ** (levels - 1):
      raise ConfigError(
        f"model.image_size={self.image_size} must be divisible by 2^(levels-1) = "
        f"{2 ** (levels - 1)} for ch_mult={self.ch_mult} ({levels} levels)."
      )
    resolutions = [self.image_size // 2**i for i in range(levels)]
    unknown = [r for r in self.attn_resolutions if r not in resolutions]
    if unknown:
      raise ConfigError(
        f"model.attn_resolutions {unknown} are not among the U-Net's resolutions {resolutions}."
      )
    for width in {self.ch * m for m in self.ch_mult}:
      if width % self.num_groups:
        raise ConfigError(
          f"Channel width {width} (ch * ch_mult) is not divisible by "
          f"model.num_groups={self.num_groups}."
        )
      if self.attention_head_dim and width % self.attention_head_dim:
        raise ConfigError(
          f"Channel width {width} is not divisible by "
          f"model.attention_head_dim={self.attention_head_dim}."
        )
    if self.ch % 2:
      raise ConfigError(f"model.ch must be even for the sinusoidal embedding, got {self.ch}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}.")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ConfigError(
        f"model.compute_dtype must be 'float32' or 'bfloat16' (or 'auto' in a "
        f"run config), got {self.compute_dtype!r}."
      )


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding of integer timesteps (the original `get_timestep_embedding`).

  Vaswani et al. 2017, Sec. 3.5, with frequencies 10000^(-i/(dim/2 - 1)), sin then cos.
  """
  half = dim // 2
  frequencies = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  angles = t.astype(jnp.float32)[:, None] * frequencies[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def swish(x):
  return jax.nn.silu(x)


def group_norm(channels: int, num_groups: int, rngs: nnx.Rngs) -> GroupNorm:
  """GroupNorm in float32; `norm(x, swish=True)` is swish(GroupNorm(x)) with one backward."""
  return GroupNorm(
    channels,
    num_groups=num_groups,
    epsilon=GROUP_NORM_EPSILON,
    use_fast_variance=False,
    dtype=jnp.float32,
    rngs=rngs,
  )


def conv3x3(in_ch, out_ch, dtype, rngs, *, init=default_init, strides=1, padding="SAME"):
  return nnx.Conv(
    in_ch,
    out_ch,
    (3, 3),
    strides=strides,
    padding=padding,
    dtype=dtype,
    kernel_init=init,
    rngs=rngs,
  )


def dense(in_features, out_features, dtype, rngs, *, init=default_init):
  """A dense layer over the last axis; on NHWC maps it is the original's 1x1 `nin`."""
  return nnx.Linear(in_features, out_features, dtype=dtype, kernel_init=init, rngs=rngs)


class ResnetBlock(nnx.Module):
  """The original `resnet_block`: two 3x3 convs with the time embedding added between them."""

  def __init__(self, in_ch: int, out_ch: int, temb_ch: int, config: UNetConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.compute_dtype)
    self.norm1 = group_norm(in_ch, config.num_groups, rngs)
    self.conv1 = conv3x3(in_ch, out_ch, dtype, rngs)
    self.temb_proj = dense(temb_ch, out_ch, dtype, rngs)
    self.norm2 = group_norm(out_ch, config.num_groups, rngs)
    self.dropout = nnx.Dropout(config.dropout)
    self.conv2 = conv3x3(out_ch, out_ch, dtype, rngs, init=zero_init)
    # The original's `nin_shortcut`: a 1x1 projection when the width changes.
    self.shortcut = dense(in_ch, out_ch, dtype, rngs) if in_ch != out_ch else None

  def __call__(self, x, temb, rngs=None):
    h = self.conv1(self.norm1(x, swish=True))
    h = h + self.temb_proj(swish(temb))[:, None, None, :]
    h = self.dropout(self.norm2(h, swish=True), rngs=rngs)
    h = self.conv2(h)
    if self.shortcut is not None:
      x = self.shortcut(x)
    return x + h


class AttentionBlock(nnx.Module):
  """The original `attn_block`: self-attention over all positions with 1x1 q, k, v, out."""

  def __init__(self, channels: int, config: UNetConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.compute_dtype)
    self.num_heads = channels // config.attention_head_dim if config.attention_head_dim else 1
    self.norm = group_norm(channels, config.num_groups, rngs)
    self.q = dense(channels, channels, dtype, rngs)
    self.k = dense(channels, channels, dtype, rngs)
    self.v = dense(channels, channels, dtype, rngs)
    self.proj_out = dense(channels, channels, dtype, rngs, init=zero_init)

  def __call__(self, x):
    batch, height, width, channels = x.shape
    head_dim = channels // self.num_heads
    h = self.norm(x)

    def heads(projection):
      return projection(h).reshape(batch, height * width, self.num_heads, head_dim)

    q, k, v = heads(self.q), heads(self.k), heads(self.v)
    # Attention weights softmax(q k^T / sqrt(d)) (Vaswani et al. 2017, eq. 1), in float32.
    # (jax.nn.dot_product_attention computes the same; its backward pass is slower on CPU.)
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * head_dim**-0.5, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(batch, height, width, channels)
    return x + self.proj_out(out)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv. TF 'SAME' padding at stride 2 pads one row and column after only."""

  def __init__(self, channels: int, config: UNetConfig, *, rngs: nnx.Rngs):
    self.conv = conv3x3(
      channels, channels, jnp.dtype(config.compute_dtype), rngs, strides=2, padding=((0, 1), (0, 1))
    )

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2 followed by a 3x3 conv."""

  def __init__(self, channels: int, config: UNetConfig, *, rngs: nnx.Rngs):
    self.conv = conv3x3(channels, channels, jnp.dtype(config.compute_dtype), rngs)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


def cross_attention(channels: int, config: UNetConfig, rngs: nnx.Rngs):
  """The cross-attention that follows a self-attention block when the U-Net reads a prompt."""
  if config.context_dim is None:
    return None
  heads = channels // config.attention_head_dim if config.attention_head_dim else 1
  dtype = jnp.dtype(config.compute_dtype)
  return CrossAttentionBlock(
    channels, config.context_dim, heads, config.num_groups, dtype, rngs=rngs
  )


class Level(nnx.Module):
  """One resolution of the down or up path: residual blocks, optional attention, resampling."""

  def __init__(self, blocks, attentions, resample, cross_attentions=()):
    self.blocks = nnx.List(blocks)
    self.attentions = nnx.List(attentions)
    self.cross_attentions = nnx.List(cross_attentions) if cross_attentions else None
    self.resample = resample

  def attend(self, i: int, h, context):
    """Attention i of this level: self-attention, then cross-attention to the prompt."""
    h = self.attentions[i](h)
    if self.cross_attentions is not None:
      h = self.cross_attentions[i](h, *context)
    return h


class MiddleBlock(nnx.Module):
  def __init__(self, channels: int, temb_ch: int, config: UNetConfig, *, rngs: nnx.Rngs):
    self.block1 = ResnetBlock(channels, channels, temb_ch, config, rngs=rngs)
    self.attention = AttentionBlock(channels, config, rngs=rngs)
    self.cross_attention = cross_attention(channels, config, rngs)
    self.block2 = ResnetBlock(channels, channels, temb_ch, config, rngs=rngs)

  def __call__(self, h, temb, rngs=None, context=None):
    h = self.attention(self.block1(h, temb, rngs))
    if self.cross_attention is not None:
      h = self.cross_attention(h, *context)
    return self.block2(h, temb, rngs)


class UNet(nnx.Module):
  """eps_theta(x_t, t[, y]): the DDPM U-Net. Call as `model(x, t, y=None, rngs=...)`.

  x: [B, H, W, in_channels] float; t: [B] int timestep indices; y: [B] int class labels when
  `num_classes` is set; context: (token features [B, L, context_dim], mask bool [B, L]) of a
  prompt when `context_dim` is set. `model.train()` enables dropout, which then needs `rngs`
  (an nnx.Rngs with a 'dropout' stream, or a key); `model.eval()` disables it.
  """

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    dtype = jnp.dtype(config.compute_dtype)
    ch, levels = config.ch, len(config.ch_mult)
    temb_ch = 4 * ch
    self.temb_dense0 = dense(ch, temb_ch, dtype, rngs)
    self.temb_dense1 = dense(temb_ch, temb_ch, dtype, rngs)
    self.class_embed = (
      nnx.Embed(config.num_classes, temb_ch, rngs=rngs) if config.num_classes else None
    )
    self.conv_in = conv3x3(config.in_channels, ch, dtype, rngs)

    skip_channels = [ch]  # widths of the activations the up path concatenates
    width, resolution = ch, config.image_size
    down = []
    for level, mult in enumerate(config.ch_mult):
      blocks, attentions, cross = [], [], []
      for _ in range(config.num_res_blocks):
        blocks.append(ResnetBlock(width, ch * mult, temb_ch, config, rngs=rngs))
        width = ch * mult
        if resolution in config.attn_resolutions:
          attentions.append(AttentionBlock(width, config, rngs=rngs))
          cross.append(cross_attention(width, config, rngs))
        skip_channels.append(width)
      resample = None
      if level != levels - 1:
        resample = Downsample(width, config, rngs=rngs)
        skip_channels.append(width)
        resolution //= 2
      down.append(Level(blocks, attentions, resample, [c for c in cross if c is not None]))
    self.down = nnx.List(down)
    self.mid = MiddleBlock(width, temb_ch, config, rngs=rngs)

    up = []  # up[0] is the lowest resolution, as the up path runs
    for level in reversed(range(levels)):
      blocks, attentions, cross = [], [], []
      for _ in range(config.num_res_blocks + 1):
        out_width = ch * config.ch_mult[level]
        blocks.append(
          ResnetBlock(width + skip_channels.pop(), out_width, temb_ch, config, rngs=rngs)
        )
        width = out_width
        if resolution in config.attn_resolutions:
          attentions.append(AttentionBlock(width, config, rngs=rngs))
          cross.append(cross_attention(width, config, rngs))
      resample = None
      if level != 0:
        resample = Upsample(width, config, rngs=rngs)
        resolution *= 2
      up.append(Level(blocks, attentions, resample, [c for c in cross if c is not None]))
    self.up = nnx.List(up)
    assert not skip_channels
    self.norm_out = group_norm(width, config.num_groups, rngs)
    self.conv_out = conv3x3(width, config.out_channels, dtype, rngs, init=zero_init)

  def __call__(self, x, t, y=None, *, context=None, rngs=None):
    config = self.config
    if x.ndim != 4 or x.shape[1:] != (config.image_size, config.image_size, config.in_channels):
      raise ValueError(
        f"UNet expects x of shape [B, {config.image_size}, {config.image_size}, "
        f"{config.in_channels}], got {x.shape}."
      )
    if t.shape != (x.shape[0],):
      raise ValueError(f"UNet expects t of shape [{x.shape[0]}], got {t.shape}.")
    if (y is None) != (self.class_embed is None):
      raise ValueError(
        "Class labels y are required exactly when model.num_classes is set "
        f"(num_classes={config.num_classes}, y given: {y is not None})."
      )
    if (context is None) != (config.context_dim is None):
      raise ValueError(
        "A prompt's (token features, mask) are required exactly when model.context_dim is set "
        f"(context_dim={config.context_dim}, context given: {context is not None})."
      )
    dtype = jnp.dtype(config.compute_dtype)
    temb = timestep_embedding(t, config.ch).astype(dtype)
    temb = self.temb_dense1(swish(self.temb_dense0(temb)))
    if self.class_embed is not None:
      temb = temb + self.class_embed(y).astype(temb.dtype)

    def run_block(block, h, temb, rngs, *context):
      return block(h, temb, rngs, *context)

    if config.remat:
      run_block = nnx.remat(run_block)

    hs = [self.conv_in(x.astype(dtype))]
    for level in self.down:
      for i, block in enumerate(level.blocks):
        h = run_block(block, hs[-1], temb, rngs)
        if level.attentions:
          h = level.attend(i, h, context)
        hs.append(h)
      if level.resample is not None:
        hs.append(level.resample(hs[-1]))

    h = run_block(self.mid, hs[-1], temb, rngs, *(() if context is None else (context,)))

    for level in self.up:
      for i, block in enumerate(level.blocks):
        h = run_block(block, jnp.concatenate([h, hs.pop()], axis=-1), temb, rngs)
        if level.attentions:
          h = level.attend(i, h, context)
      if level.resample is not None:
        h = level.resample(h)

    h = self.conv_out(self.norm_out(h, swish=True))
    return h.astype(jnp.float32)


def count_params(model: nnx.Module) -> int:
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
