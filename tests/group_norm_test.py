"""The U-Net's GroupNorm: Flax's forward, and a written-out backward equal to autodiff's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_ddpm.models import group_norm

# (input shape, groups): the U-Net's layout, a group of one channel, an odd spatial size.
CASES = [((2, 4, 4, 64), 32), ((3, 5, 5, 8), 8), ((2, 7, 3, 12), 3)]


def _modules(channels, groups):
  """(ours, Flax's) with the same random scale and bias."""
  ours = group_norm.GroupNorm(
    channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False, rngs=nnx.Rngs(0)
  )
  flax_norm = nnx.GroupNorm(
    channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False, rngs=nnx.Rngs(0)
  )
  rng = np.random.default_rng(channels)
  for module in (ours, flax_norm):
    module.scale[...] = jnp.asarray(rng.normal(1.0, 0.5, channels), jnp.float32)
    module.bias[...] = jnp.asarray(rng.normal(0.0, 0.5, channels), jnp.float32)
    rng = np.random.default_rng(channels)
  return ours, flax_norm


def _vjp(module, call, x, dout):
  """call(module, x), and the cotangents of x, scale and bias for cotangent dout."""
  graphdef, params = nnx.split(module)
  out, pullback = jax.vjp(lambda x, params: call(nnx.merge(graphdef, params), x), x, params)
  dx, dparams = pullback(dout)
  return out, dx, dparams["scale"][...], dparams["bias"][...]


@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("swish", [False, True])
def test_forward_and_gradients_equal_flax_group_norm_under_autodiff(shape, groups, swish):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(0.3, 2.0, shape), jnp.float32)
  dout = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ours, flax_norm = _modules(shape[-1], groups)
  got = _vjp(ours, lambda m, x: m(x, swish=swish), x, dout)
  expected = _vjp(flax_norm, lambda m, x: jax.nn.silu(m(x)) if swish else m(x), x, dout)
  for name, a, b in zip(("output", "dx", "dscale", "dbias"), got, expected):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=0, atol=2e-6 * scale, err_msg=name
    )


def test_bfloat16_input_is_normalised_in_float32_and_its_gradient_stays_bfloat16():
  ours, _ = _modules(8, 4)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 8)), jnp.bfloat16)
  out, pullback = jax.vjp(lambda x: ours(x, swish=True), x)
  assert out.dtype == jnp.float32
  (dx,) = pullback(jnp.ones_like(out))
  assert dx.dtype == jnp.bfloat16
