"""GroupNorm followed by swish, with its backward pass written out in two passes over the data.

GroupNorm (Wu & He 2018, eq. 1 with the group sets of eq. 7): per example n and group g,
  x^ = (x - mu_ng) / sqrt(sigma_ng^2 + eps),   y = gamma_c x^ + beta_c,
mu and sigma^2 the mean and (two-pass) variance over the group's positions and channels. Every
GroupNorm of the DDPM U-Net but the attention block's is followed by swish(y) = y sigmoid(y)
(Ramachandran et al. 2017; the original code's `nonlinearity`), so the module can apply it.

Autodiff of that composition keeps x^, y and swish'(y) of every norm alive from the forward
pass and leaves XLA several reductions over the activation in the backward one. The
custom VJP keeps only x and the per-group statistics and computes, with u the cotangent of y
(u = dz swish'(y) where swish follows, swish'(y) = s (1 + y (1 - s)), s = sigmoid(y)):
  dbeta_c = sum_n A_nc,   dgamma_c = sum_n B_nc,   A_nc = sum_hw u,   B_nc = sum_hw u x^,
  dx = rstd_ng (gamma_c u - m1_ng - x^ m2_ng),
  m1_ng = mean over the group of gamma_c u = sum_{c in g} gamma_c A_nc / (HW |g|),
  m2_ng = sum_{c in g} gamma_c B_nc / (HW |g|),
the normalisation's gradient (Ioffe & Szegedy 2015, Sec. 3, with the group in place of the
mini-batch). A and B come out of one reduction over the activation, dx out of one elementwise
pass. The forward is Flax's `nnx.GroupNorm` formula step for step, and the parameters are its
`scale` and `bias`, so checkpoints and imported weights do not change; the saving in memory is
in docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _grouped(x, num_groups):
  """[N, ..., C] -> [N, positions, G, C / G]."""
  return x.reshape(x.shape[0], -1, num_groups, x.shape[-1] // num_groups)


def _statistics(xg, epsilon):
  """Per (n, g) mean and 1/sqrt(variance + eps), shaped [N, 1, G, 1]; two-pass variance."""
  mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
  variance = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
  return mean, jax.lax.rsqrt(variance + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm_swish(x, gamma, beta, num_groups: int, epsilon: float, apply_swish: bool):
  """swish(GroupNorm(x)) (or GroupNorm(x)) for float32 x [N, ..., C], gamma and beta [C]."""
  return _forward(x, gamma, beta, num_groups, epsilon, apply_swish)[0]


def _forward(x, gamma, beta, num_groups, epsilon, apply_swish):
  xg = _grouped(x, num_groups)
  gamma_g, beta_g = gamma.reshape(xg.shape[2:]), beta.reshape(xg.shape[2:])
  mean, rstd = _statistics(xg, epsilon)
  y = (xg - mean) * (rstd * gamma_g) + beta_g  # nnx.GroupNorm's order of operations
  out = y * jax.nn.sigmoid(y) if apply_swish else y
  return out.reshape(x.shape), (x, gamma, beta, mean, rstd)


def _backward(num_groups, epsilon, apply_swish, residuals, dout):
  del epsilon  # only the saved statistics are needed
  x, gamma, beta, mean, rstd = residuals
  xg, dg = _grouped(x, num_groups), _grouped(dout, num_groups)
  gamma_g, beta_g = gamma.reshape(xg.shape[2:]), beta.reshape(xg.shape[2:])
  x_hat = (xg - mean) * rstd
  u = dg
  if apply_swish:
    y = x_hat * gamma_g + beta_g
    s = jax.nn.sigmoid(y)
    u = dg * (s * (1 + y * (1 - s)))
  a = jnp.sum(u, axis=1)  # [N, G, C/G]
  b = jnp.sum(u * x_hat, axis=1)
  count = xg.shape[1] * xg.shape[3]
  m1 = jnp.sum(a * gamma_g, axis=2)[:, None, :, None] / count
  m2 = jnp.sum(b * gamma_g, axis=2)[:, None, :, None] / count
  dx = rstd * (gamma_g * u - m1 - x_hat * m2)
  return (
    dx.reshape(x.shape),
    jnp.sum(b, axis=0).reshape(gamma.shape),
    jnp.sum(a, axis=0).reshape(beta.shape),
  )


group_norm_swish.defvjp(_forward, _backward)


class GroupNorm(nnx.GroupNorm):
  """`nnx.GroupNorm` (same parameters and forward) over the last axis of [N, ..., C], computed
  in float32, with the written-out backward above; `model(x, swish=True)` adds swish."""

  def __call__(self, x, *, swish: bool = False):
    return group_norm_swish(
      x.astype(jnp.float32),
      self.scale[...].astype(jnp.float32),
      self.bias[...].astype(jnp.float32),
      self.num_groups,
      self.epsilon,
      swish,
    )
