"""Parity with diffusers' UNet2DModel (an independent PyTorch implementation) through import."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jax_ddpm.io import errors
from jax_ddpm.models import diffusers_weights as convert
from jax_ddpm.models import unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# ddpm-cifar10-32's architecture; attention_head_dim None is diffusers' single-head setting.
CIFAR10_DIFFUSERS = dict(
  sample_size=32,
  in_channels=3,
  out_channels=3,
  block_out_channels=(128, 256, 256, 256),
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  layers_per_block=2,
  downsample_padding=0,
  freq_shift=1,
  flip_sin_to_cos=False,
  norm_eps=1e-6,
  norm_num_groups=32,
  attention_head_dim=None,
)
SMALL_DIFFUSERS = dict(
  CIFAR10_DIFFUSERS,
  sample_size=16,
  block_out_channels=(32, 64, 64),
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  norm_num_groups=8,
  layers_per_block=1,
)


def save_random_diffusers_unet(directory, settings, seed=0):
  """A diffusers UNet2DModel with every weight random (none left at a zero init), saved."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**settings).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      scale = 0.3 if "norm" in name else 1.0 / np.sqrt(max(parameter[0].numel(), 1))
      offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
      parameter.copy_(offset + scale * torch.randn_like(parameter))
  model.save_pretrained(directory, safe_serialization=True)
  return model


def compare_outputs(torch_model, config, params, batch, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, config.image_size, config.image_size, 3)).astype(np.float32)
  t = rng.integers(0, 1000, size=batch)
  with torch.no_grad():
    expected = (
      torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t))
      .sample.numpy()
      .transpose(0, 2, 3, 1)
    )
  model = nnx.merge(
    nnx.graphdef(nnx.eval_shape(lambda: unet.UNet(config, rngs=nnx.Rngs(0)))), params
  )
  model.eval()
  actual = np.asarray(jax.jit(lambda x, t: model(x, t))(jnp.asarray(x), jnp.asarray(t)))
  return np.abs(actual - expected).max(), np.abs(expected).max()


def test_small_unet_matches_diffusers_after_import(tmp_path):
  torch_model = save_random_diffusers_unet(tmp_path, SMALL_DIFFUSERS)
  config, params = convert.load_diffusers_unet(str(tmp_path))
  assert config.ch_mult == (1, 2, 2) and config.attn_resolutions == (8,)
  max_error, scale = compare_outputs(torch_model, config, params, batch=4, seed=1)
  assert scale > 1.0  # the comparison is not between two near-zero outputs
  assert max_error <= 1e-4, max_error


def test_a_learned_variance_unet_with_2c_outputs_imports_exactly(tmp_path):
  """Improved DDPM's layout (out_channels = 2C) matches a learn_sigma run config."""
  import runs

  from configs import tiny

  torch_model = save_random_diffusers_unet(tmp_path, dict(SMALL_DIFFUSERS, out_channels=6))
  run_config = tiny.get_config()
  run_config.data.channels, run_config.model.learn_sigma = 3, True
  run_config.model.ch, run_config.model.ch_mult = 32, (1, 2, 2)
  run_config.model.attn_resolutions, run_config.model.dropout = (8,), 0.0
  ours = runs.build(run_config).unet
  config, params = convert.load_diffusers_unet(str(tmp_path), ours)
  assert config.out_channels == 6
  assert convert.config_differences(ours, config) == []
  max_error, scale = compare_outputs(torch_model, config, params, batch=2, seed=3)
  assert scale > 1.0 and max_error <= 1e-4, max_error


def test_cifar10_unet_matches_diffusers_after_import(tmp_path):
  """The full 35.7M network of the DDPM paper (about 40 s on a 2-core CPU)."""
  torch_model = save_random_diffusers_unet(tmp_path, CIFAR10_DIFFUSERS)
  model_config = unet.UNetConfig()  # configs/cifar10.py's model
  config, params = convert.load_diffusers_unet(str(tmp_path), model_config)
  assert convert.config_differences(model_config, config) == []
  max_error, scale = compare_outputs(torch_model, config, params, batch=2, seed=2)
  assert scale > 1.0
  assert max_error <= 1e-4, max_error


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("small")
  save_random_diffusers_unet(directory, SMALL_DIFFUSERS)
  return directory


def rewrite_tensors(source, destination, edit):
  os.makedirs(destination, exist_ok=True)
  with open(os.path.join(source, convert.CONFIG_FILE)) as f:
    config = json.load(f)
  tensors = edit(dict(load_file(os.path.join(source, convert.WEIGHTS_FILE))), config)
  save_file(tensors, os.path.join(destination, convert.WEIGHTS_FILE))
  with open(os.path.join(destination, convert.CONFIG_FILE), "w") as f:
    json.dump(config, f)


def test_legacy_attention_names_import_to_the_same_params(small_checkpoint, tmp_path):
  def to_legacy(tensors, config):
    renamed = {}
    for name, value in tensors.items():
      for new, old in (
        ("to_q", "query"),
        ("to_k", "key"),
        ("to_v", "value"),
        ("to_out.0", "proj_attn"),
      ):
        name = name.replace(f".{new}.", f".{old}.")
      renamed[name] = value
    return renamed

  rewrite_tensors(small_checkpoint, tmp_path, to_legacy)
  _, modern = convert.load_diffusers_unet(str(small_checkpoint))
  _, legacy = convert.load_diffusers_unet(str(tmp_path))
  for a, b in zip(jax.tree.leaves(modern), jax.tree.leaves(legacy)):
    np.testing.assert_array_equal(a, b)


def test_missing_unexpected_and_misshapen_tensors_are_listed_by_name(small_checkpoint, tmp_path):
  def damage(tensors, config):
    del tensors["mid_block.attentions.0.to_q.weight"]
    tensors["extra.weight"] = np.zeros(3, np.float32)
    tensors["conv_out.bias"] = np.zeros(5, np.float32)
    return tensors

  rewrite_tensors(small_checkpoint, tmp_path, damage)
  with pytest.raises(convert.CheckpointMismatchError) as error:
    convert.load_diffusers_unet(str(tmp_path))
  message = str(error.value)
  assert "1 missing tensors:\n  mid_block.attentions.0.to_q.weight" in message
  assert "1 unexpected tensors:\n  extra.weight" in message
  assert "conv_out.bias: checkpoint (5,)" in message and "vs model (3,)" in message


def test_config_mismatch_names_the_keys(small_checkpoint):
  ours = unet.UNetConfig(
    image_size=16, ch=32, ch_mult=(1, 2, 4), attn_resolutions=(16,), num_res_blocks=1, num_groups=8
  )
  with pytest.raises(convert.CheckpointMismatchError) as error:
    convert.load_diffusers_unet(str(small_checkpoint), ours)
  message = str(error.value)
  assert "model.ch_mult: config (1, 2, 4) vs checkpoint (1, 2, 2)" in message
  assert "model.attn_resolutions: config (16,) vs checkpoint (8,)" in message
  assert "model.num_res_blocks" not in message


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_diffusers_settings_of_our_configs_describe_the_same_network(name):
  """The inverse mapping builds the PyTorch peer of benchmarks/: same config, same parameters."""
  import importlib

  import runs

  ours = runs.build(importlib.import_module(f"configs.{name}").get_config()).unet
  settings = convert.diffusers_config_from_unet(ours)
  assert convert.unet_config_from_diffusers(settings, dropout=ours.dropout) == ours
  peer = diffusers.UNet2DModel(**settings)
  abstract = nnx.eval_shape(lambda: unet.UNet(ours, rngs=nnx.Rngs(0)))
  assert sum(p.numel() for p in peer.parameters()) == unet.count_params(abstract)


def test_unsupported_diffusers_settings_are_named():
  settings = dict(
    SMALL_DIFFUSERS,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  )
  with pytest.raises(
    convert.CheckpointMismatchError,
    match=r"freq_shift=0 \(need 1\).*flip_sin_to_cos=True.*CrossAttnDownBlock2D",
  ):
    convert.unet_config_from_diffusers(settings)


def test_missing_folder_says_what_is_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config.json' does not exist.*UNet2DModel folder"):
    convert.load_diffusers_unet(str(tmp_path))


# diffusers' layout of configs/tiny.py's model: 16x16x1, ch 16, ch_mult (1, 2), attention at 8.
TINY_DIFFUSERS = dict(
  SMALL_DIFFUSERS,
  in_channels=1,
  out_channels=1,
  block_out_channels=(16, 32),
  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
  up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


def test_import_mode_writes_a_checkpoint_that_samples(tmp_path):
  import runs

  from configs import tiny
  from jax_ddpm import cli
  from jax_ddpm.training import checkpointing

  save_random_diffusers_unet(tmp_path / "diffusers", TINY_DIFFUSERS)
  config = tiny.get_config()
  config.sampling.num_samples, config.sampling.batch_size = 8, 8
  workdir = str(tmp_path / "run")
  arguments = cli.Arguments(config, workdir, import_from=str(tmp_path / "diffusers"))
  assert cli.import_diffusers(arguments) == 0
  _, imported = convert.load_diffusers_unet(str(tmp_path / "diffusers"))
  _, restored, step = checkpointing.load_checkpoint(runs.build(config), workdir)
  assert step == 0
  for a, b, c in zip(
    jax.tree.leaves(imported),
    jax.tree.leaves(restored.params),
    jax.tree.leaves(restored.ema_params),
  ):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  directory = cli.sample(cli.Arguments(config, workdir))
  images = np.load(os.path.join(directory, "samples_8x16x16x1.npz"))["arr_0"]
  assert images.shape == (8, 16, 16, 1) and images.std() > 0
  with pytest.raises(errors.UserInputError, match="already holds checkpoints"):
    cli.import_diffusers(arguments)
