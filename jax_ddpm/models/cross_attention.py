"""Cross-attention from image positions to prompt tokens, the layer by which a text encoder's
output steers the U-Net (Rombach et al. 2022, LDM, Sec. 3.3, eq. 3):

  Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,  Q = W_Q phi(z_t),  K = W_K tau(y),
  V = W_V tau(y),

with phi(z_t) the GroupNorm'd feature map (one query per position) and tau(y) the token features
[B, L, D]; padded tokens are masked out of the softmax. The output projection starts at zero, so
a new cross-attention block is the identity until it learns, as the U-Net's other residual
branches are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

zero_init = nnx.initializers.zeros_init()
default_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def masked_attention(q, k, v, mask):
  """softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1) over keys where mask is True.

  q [B, Q, H, C], k and v [B, K, H, C], mask bool [B, K]; logits and softmax in float32.
  """
  logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * q.shape[-1] ** -0.5
  logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhc->bqhc", weights, v)


class CrossAttentionBlock(nnx.Module):
  """x + W_O Attention(W_Q GN(x), W_K c, W_V c) over the tokens c where mask is True."""

  def __init__(
    self,
    channels: int,
    context_dim: int,
    num_heads: int,
    num_groups: int,
    dtype,
    *,
    rngs: nnx.Rngs,
  ):
    self.num_heads = num_heads
    # The U-Net's GroupNorm (epsilon as unet.GROUP_NORM_EPSILON, statistics in float32), here
    # with autodiff's backward: one per attention resolution, where the maps are small.
    self.norm = nnx.GroupNorm(
      channels,
      num_groups=num_groups,
      epsilon=1e-6,
      use_fast_variance=False,
      dtype=jnp.float32,
      rngs=rngs,
    )
    linear = lambda n_in, n_out, init=default_init: nnx.Linear(
      n_in, n_out, dtype=dtype, kernel_init=init, rngs=rngs
    )
    self.q = linear(channels, channels)
    self.k = linear(context_dim, channels)
    self.v = linear(context_dim, channels)
    self.proj_out = linear(channels, channels, zero_init)

  def __call__(self, x, context, mask):
    """x [B, H, W, C], context [B, L, D], mask bool [B, L]."""
    batch, height, width, channels = x.shape
    head_dim = channels // self.num_heads
    q = self.q(self.norm(x.astype(jnp.float32))).reshape(
      batch, height * width, self.num_heads, head_dim
    )
    split = lambda a: a.reshape(batch, context.shape[1], self.num_heads, head_dim)
    attended = masked_attention(q, split(self.k(context)), split(self.v(context)), mask)
    return x + self.proj_out(attended.reshape(batch, height, width, channels).astype(x.dtype))
