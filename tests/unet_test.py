"""The DDPM U-Net: size, structure, modes, dtypes, sharding and config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_ddpm.models import unet

TINY = unet.UNetConfig(
  image_size=16,
  in_channels=1,
  out_channels=1,
  ch=16,
  ch_mult=(1, 2),
  num_res_blocks=1,
  attn_resolutions=(8,),
  dropout=0.1,
  num_groups=8,
)


def test_cifar10_model_has_the_papers_parameter_count():
  model = nnx.eval_shape(lambda: unet.UNet(unet.UNetConfig(), rngs=nnx.Rngs(0)))
  assert unet.count_params(model) == 35_746_307


def test_timestep_embedding_matches_the_original_formula():
  t = np.array([0, 1, 17, 999])
  dim, half = 32, 16
  frequencies = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
  expected = np.concatenate([np.sin(t[:, None] * frequencies), np.cos(t[:, None] * frequencies)], 1)
  np.testing.assert_allclose(unet.timestep_embedding(jnp.asarray(t), dim), expected, atol=2e-4)


@pytest.fixture(scope="module")
def tiny_model():
  return unet.UNet(TINY, rngs=nnx.Rngs(0))


def randomize(model, seed=1):
  """Replaces every parameter (zero-initialised ones too) by noise, so outputs are non-trivial."""
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def test_output_starts_at_zero_and_has_the_input_shape(tiny_model):
  tiny_model.eval()
  x = jnp.ones((3, 16, 16, 1))
  out = tiny_model(x, jnp.array([0, 5, 999]))
  assert out.shape == x.shape and out.dtype == jnp.float32
  # conv_out is zero-initialised, as in the original.
  np.testing.assert_array_equal(out, 0.0)


def test_dropout_is_active_only_in_train_mode():
  model = randomize(unet.UNet(TINY, rngs=nnx.Rngs(0)))
  x, t = jax.random.normal(jax.random.key(0), (2, 16, 16, 1)), jnp.array([3, 300])
  model.eval()
  eval_a, eval_b = model(x, t), model(x, t)
  np.testing.assert_array_equal(eval_a, eval_b)
  model.train()
  with pytest.raises(ValueError, match="no `rngs` argument was provided to Dropout"):
    model(x, t)
  train_a = model(x, t, rngs=nnx.Rngs(dropout=1))
  train_b = model(x, t, rngs=nnx.Rngs(dropout=2))
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_a)


def test_output_depends_on_time_and_class_label():
  config = unet.UNetConfig(**{**vars(TINY), "num_classes": 10})
  model = randomize(unet.UNet(config, rngs=nnx.Rngs(0)))
  model.eval()
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  base = model(x, jnp.array([10, 10]), jnp.array([1, 1]))
  assert not np.allclose(base, model(x, jnp.array([500, 500]), jnp.array([1, 1])))
  assert not np.allclose(base, model(x, jnp.array([10, 10]), jnp.array([2, 2])))
  with pytest.raises(ValueError, match="Class labels y are required"):
    model(x, jnp.array([10, 10]))


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
  config = unet.UNetConfig(**{**vars(TINY), "compute_dtype": "bfloat16"})
  low = randomize(unet.UNet(config, rngs=nnx.Rngs(0)))
  full = randomize(unet.UNet(TINY, rngs=nnx.Rngs(0)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(low, nnx.Param)))
  low.eval(), full.eval()
  x, t = jax.random.normal(jax.random.key(0), (2, 16, 16, 1)), jnp.array([3, 300])
  expected, actual = full(x, t), low(x, t)
  assert actual.dtype == jnp.float32
  relative = float(jnp.linalg.norm(actual - expected) / jnp.linalg.norm(expected))
  assert relative < 0.05, relative


def test_remat_recomputes_the_same_loss_gradients_and_dropout():
  """model.remat only moves work from memory to compute: same numbers, dropout masks included."""

  def loss_and_grads(remat):
    config = unet.UNetConfig(**{**vars(TINY), "remat": remat})
    model = randomize(unet.UNet(config, rngs=nnx.Rngs(0)))
    model.train()
    graphdef, params = nnx.split(model)
    x, t = jax.random.normal(jax.random.key(0), (2, 16, 16, 1)), jnp.array([3, 300])

    def loss(params):
      out = nnx.merge(graphdef, params)(x, t, rngs=nnx.Rngs(dropout=7))
      return jnp.mean(out**2)

    return jax.jit(jax.value_and_grad(loss))(params)

  (plain_loss, plain_grads), (remat_loss, remat_grads) = loss_and_grads(False), loss_and_grads(True)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for plain, remat in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(remat, plain, rtol=1e-5, atol=1e-7)


def test_model_runs_jitted_with_the_batch_sharded_over_8_devices():
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py sets 8 simulated CPU devices"
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  model = randomize(unet.UNet(TINY, rngs=nnx.Rngs(0)))
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x, t):
    return nnx.merge(graphdef, state)(x, t)

  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 1))
  t = jnp.arange(8) * 100
  sharded = forward(state, jax.device_put(x, data), jax.device_put(t, data))
  assert sharded.sharding.is_equivalent_to(data, 4)
  np.testing.assert_allclose(sharded, forward(state, x, t), atol=1e-5)


@pytest.mark.parametrize(
  "change, message",
  [
    (
      dict(image_size=18, ch_mult=(1, 2, 2)),
      r"image_size=18 must be divisible by 2\^\(levels-1\) = 4",
    ),
    (dict(attn_resolutions=(4,)), r"attn_resolutions \[4\] are not among .*\[16, 8\]"),
    (dict(num_groups=5), r"not divisible by model.num_groups=5"),
    (dict(compute_dtype="float16"), r"compute_dtype must be 'float32' or 'bfloat16'"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
  ],
)
def test_bad_model_config_names_the_field(change, message):
  with pytest.raises(ValueError, match=message):
    unet.UNetConfig(**{**vars(TINY), **change}).validate()
