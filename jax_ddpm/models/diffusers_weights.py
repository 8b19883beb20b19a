"""Imports the published DDPM weights in diffusers' `UNet2DModel` layout into our U-Net.

A diffusers model folder holds `config.json` and `diffusion_pytorch_model.safetensors`. The
tensors are read with safetensors' numpy reader (no torch, nothing unpickled), renamed to our
parameter paths, and transposed from PyTorch's layouts (conv OIHW -> HWIO, linear [out, in] ->
[in, out]). Every mismatch is reported by name: missing and unexpected tensors, wrong shapes,
and config keys on which the checkpoint and our config disagree.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator

import numpy as np
import safetensors
from flax import nnx
from safetensors.numpy import load as load_safetensors

from jax_ddpm.io import errors
from jax_ddpm.io import paths as files
from jax_ddpm.models.unet import RUNTIME_FIELDS, UNet, UNetConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# Older diffusers checkpoints (the DDPM uploads among them) name attention layers this way.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# diffusers config keys whose value our U-Net implements, and that value.
REQUIRED_DIFFUSERS_SETTINGS = {
  "time_embedding_type": "positional",
  "freq_shift": 1,  # frequencies 10000^(-i/(half-1)), the original embedding
  "flip_sin_to_cos": False,  # sin before cos, as the original
  "act_fn": "silu",
  "downsample_padding": 0,  # TF 'SAME' at stride 2: pad after only
  "resnet_time_scale_shift": "default",
  "center_input_sample": False,
  "add_attention": True,
  "class_embed_type": None,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-6,
  "downsample_type": "conv",
  "upsample_type": "conv",
}


class CheckpointMismatchError(errors.InputFileError):
  """The checkpoint does not fit the model; the message lists every offending name."""


def conv_weight(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def linear_weight(w: np.ndarray) -> np.ndarray:
  if w.ndim == 4:  # a 1x1 conv used as a linear map (older shortcut and attention layouts)
    w = w[:, :, 0, 0]
  return np.transpose(w)


def identity(w: np.ndarray) -> np.ndarray:
  return w


Mapping = Iterator[tuple[tuple, str, Callable[[np.ndarray], np.ndarray]]]


def _linear(ours: tuple, theirs: str) -> Mapping:
  yield ours + ("kernel",), f"{theirs}.weight", linear_weight
  yield ours + ("bias",), f"{theirs}.bias", identity


def _conv(ours: tuple, theirs: str) -> Mapping:
  yield ours + ("kernel",), f"{theirs}.weight", conv_weight
  yield ours + ("bias",), f"{theirs}.bias", identity


def _norm(ours: tuple, theirs: str) -> Mapping:
  yield ours + ("scale",), f"{theirs}.weight", identity
  yield ours + ("bias",), f"{theirs}.bias", identity


def _resnet(ours: tuple, theirs: str, has_shortcut: bool) -> Mapping:
  yield from _norm(ours + ("norm1",), f"{theirs}.norm1")
  yield from _conv(ours + ("conv1",), f"{theirs}.conv1")
  yield from _linear(ours + ("temb_proj",), f"{theirs}.time_emb_proj")
  yield from _norm(ours + ("norm2",), f"{theirs}.norm2")
  yield from _conv(ours + ("conv2",), f"{theirs}.conv2")
  if has_shortcut:
    yield from _linear(ours + ("shortcut",), f"{theirs}.conv_shortcut")


def _attention(ours: tuple, theirs: str) -> Mapping:
  yield from _norm(ours + ("norm",), f"{theirs}.group_norm")
  for our_name, their_name in (
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
  ):
    yield from _linear(ours + (our_name,), f"{theirs}.{their_name}")


def parameter_mapping(model: UNet) -> Mapping:
  """(our parameter path, diffusers tensor name, layout transform) for every parameter."""
  yield from _linear(("temb_dense0",), "time_embedding.linear_1")
  yield from _linear(("temb_dense1",), "time_embedding.linear_2")
  if model.class_embed is not None:
    yield ("class_embed", "embedding"), "class_embedding.weight", identity
  yield from _conv(("conv_in",), "conv_in")
  for direction, their_direction, their_resample in (
    ("down", "down_blocks", "downsamplers"),
    ("up", "up_blocks", "upsamplers"),
  ):
    for i, level in enumerate(getattr(model, direction)):
      for j, block in enumerate(level.blocks):
        yield from _resnet(
          (direction, i, "blocks", j),
          f"{their_direction}.{i}.resnets.{j}",
          block.shortcut is not None,
        )
      for j, _ in enumerate(level.attentions):
        yield from _attention(
          (direction, i, "attentions", j), f"{their_direction}.{i}.attentions.{j}"
        )
      if level.resample is not None:
        yield from _conv(
          (direction, i, "resample", "conv"), f"{their_direction}.{i}.{their_resample}.0.conv"
        )
  yield from _resnet(("mid", "block1"), "mid_block.resnets.0", False)
  yield from _attention(("mid", "attention"), "mid_block.attentions.0")
  yield from _resnet(("mid", "block2"), "mid_block.resnets.1", False)
  yield from _norm(("norm_out",), "conv_norm_out")
  yield from _conv(("conv_out",), "conv_out")


def unet_config_from_diffusers(
  config: dict, *, dropout: float = 0.0, compute_dtype: str = "float32"
) -> UNetConfig:
  """The UNetConfig a diffusers `UNet2DModel` config.json describes.

  Raises CheckpointMismatchError naming every setting our network does not implement.
  """
  problems = []
  if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
    problems.append(f"_class_name={config.get('_class_name')!r} (need 'UNet2DModel')")
  for key, value in REQUIRED_DIFFUSERS_SETTINGS.items():
    if key in config and config[key] != value:
      problems.append(f"{key}={config[key]!r} (need {value!r})")
  widths = list(config["block_out_channels"])
  ch = widths[0]
  if any(w % ch for w in widths):
    problems.append(f"block_out_channels={widths} are not multiples of the first")
  down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
  for name in down_types:
    if name not in ("DownBlock2D", "AttnDownBlock2D"):
      problems.append(f"down_block_types contains {name!r}")
  for name in up_types:
    if name not in ("UpBlock2D", "AttnUpBlock2D"):
      problems.append(f"up_block_types contains {name!r}")
  down_attention = [name == "AttnDownBlock2D" for name in down_types]
  up_attention = [name == "AttnUpBlock2D" for name in reversed(up_types)]
  if down_attention != up_attention:
    problems.append(
      f"attention levels differ between down_block_types {down_types} and up_block_types {up_types}"
    )
  attn_norm_groups = config.get("attn_norm_num_groups")
  if attn_norm_groups not in (None, config["norm_num_groups"]):
    problems.append(f"attn_norm_num_groups={attn_norm_groups} != norm_num_groups")
  if problems:
    raise CheckpointMismatchError(
      "The diffusers config describes a network jax_ddpm does not implement: "
      + "; ".join(problems)
      + "."
    )
  image_size = config["sample_size"]
  if isinstance(image_size, (list, tuple)):
    image_size = image_size[0]
  return UNetConfig(
    image_size=int(image_size),
    in_channels=int(config["in_channels"]),
    out_channels=int(config["out_channels"]),
    ch=int(ch),
    ch_mult=tuple(int(w // ch) for w in widths),
    num_res_blocks=int(config["layers_per_block"]),
    attn_resolutions=tuple(int(image_size) // 2**i for i, has in enumerate(down_attention) if has),
    dropout=dropout,
    num_groups=int(config["norm_num_groups"]),
    attention_head_dim=config.get("attention_head_dim"),
    num_classes=config.get("num_class_embeds"),
    compute_dtype=compute_dtype,
  )


def diffusers_config_from_unet(config: UNetConfig) -> dict:
  """The diffusers `UNet2DModel` keyword arguments of the same network (the inverse of above).

  Builds the PyTorch peer of benchmarks/ and the parity tests' reference network.
  """
  levels = range(len(config.ch_mult))
  attention = [config.image_size // 2**level in config.attn_resolutions for level in levels]
  settings = dict(REQUIRED_DIFFUSERS_SETTINGS)
  settings.update(
    sample_size=config.image_size,
    in_channels=config.in_channels,
    out_channels=config.out_channels,
    block_out_channels=tuple(config.ch * m for m in config.ch_mult),
    down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
    up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
    layers_per_block=config.num_res_blocks,
    norm_num_groups=config.num_groups,
    attention_head_dim=config.attention_head_dim,
    num_class_embeds=config.num_classes,
    dropout=config.dropout,
  )
  return settings


def config_differences(ours: UNetConfig, checkpoint: UNetConfig) -> list[str]:
  """'key: ours vs checkpoint' for each architecture field on which the two disagree."""
  differences = []
  for field in dataclasses.fields(UNetConfig):
    if field.name in RUNTIME_FIELDS:
      continue
    mine, theirs = getattr(ours, field.name), getattr(checkpoint, field.name)
    if mine != theirs:
      differences.append(f"model.{field.name}: config {mine!r} vs checkpoint {theirs!r}")
  return differences


def read_diffusers_folder(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, tensors by name) of a diffusers UNet2DModel folder."""
  files.require_dir(path, "--import_from")
  how = (
    f"a diffusers UNet2DModel folder holds {CONFIG_FILE} and {WEIGHTS_FILE} (e.g. the "
    "'unet' folder of google/ddpm-cifar10-32, saved with save_pretrained(..., "
    "safe_serialization=True))."
  )
  config_path, weights_path = (files.join(path, name) for name in (CONFIG_FILE, WEIGHTS_FILE))
  try:
    config = json.loads(files.require_file(config_path, "--import_from", how).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise errors.InputFileError(f"--import_from: {config_path} is not JSON: {error}") from None
  if not isinstance(config, dict):
    raise errors.InputFileError(f"--import_from: {config_path} holds no JSON object.")
  data = files.require_file(weights_path, "--import_from", how).read_bytes()
  try:
    tensors = load_safetensors(data)
  except (safetensors.SafetensorError, ValueError) as error:
    raise errors.InputFileError(
      f"--import_from: {weights_path} is not a readable safetensors "
      f"file (truncated or another format): {error}"
    ) from None
  not_float = sorted(
    name for name, value in tensors.items() if not np.issubdtype(value.dtype, np.floating)
  )
  if not_float:
    raise errors.InputFileError(
      f"--import_from: {weights_path} holds non-float tensors, e.g. "
      f"{not_float[:4]}; network weights are floating point."
    )
  return config, {_modern_name(name): value for name, value in tensors.items()}


def _modern_name(name: str) -> str:
  parts = name.split(".")
  if len(parts) >= 2 and "attentions" in parts and parts[-2] in LEGACY_ATTENTION_NAMES:
    parts[-2] = LEGACY_ATTENTION_NAMES[parts[-2]]
  return ".".join(parts)


def params_from_diffusers(model_config: UNetConfig, tensors: dict[str, np.ndarray]) -> nnx.State:
  """Our U-Net's nnx.Param state, filled from diffusers tensors.

  Raises CheckpointMismatchError listing every missing tensor, unexpected tensor and shape
  mismatch by name.
  """
  abstract = nnx.eval_shape(lambda: UNet(model_config, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  pure = state.to_pure_dict()
  missing, mismatched, used = [], [], set()
  for our_path, their_name, transform in parameter_mapping(abstract):
    node = pure
    for key in our_path[:-1]:
      node = node[key]
    expected = node[our_path[-1]]
    if their_name not in tensors:
      missing.append(their_name)
      continue
    used.add(their_name)
    value = transform(np.asarray(tensors[their_name], np.float32))
    if value.shape != expected.shape:
      mismatched.append(
        f"{their_name}: checkpoint {tuple(value.shape)} (as "
        f"{'/'.join(map(str, our_path))}) vs model {tuple(expected.shape)}"
      )
      continue
    node[our_path[-1]] = value
  unexpected = sorted(set(tensors) - used)
  if missing or unexpected or mismatched:
    lines = []
    for title, names in (
      ("missing tensors", missing),
      ("unexpected tensors", unexpected),
      ("shape mismatches", mismatched),
    ):
      if names:
        lines.append(f"{len(names)} {title}:\n  " + "\n  ".join(names))
    raise CheckpointMismatchError("The checkpoint does not fit the model.\n" + "\n".join(lines))
  nnx.replace_by_pure_dict(state, pure)
  return state


def load_diffusers_unet(
  path: str, model_config: UNetConfig | None = None
) -> tuple[UNetConfig, nnx.State]:
  """Reads a diffusers UNet2DModel folder; returns (its UNetConfig, our parameter state).

  With `model_config` given, the checkpoint must describe the same architecture; otherwise a
  CheckpointMismatchError names the keys that differ.
  """
  config, tensors = read_diffusers_folder(path)
  checkpoint_config = unet_config_from_diffusers(
    config,
    dropout=model_config.dropout if model_config else 0.0,
    compute_dtype=model_config.compute_dtype if model_config else "float32",
  )
  if model_config is not None:
    differences = config_differences(model_config, checkpoint_config)
    if differences:
      raise CheckpointMismatchError(
        f"The config does not match the checkpoint's {CONFIG_FILE} in {path}:\n  "
        + "\n  ".join(differences)
      )
  return checkpoint_config, params_from_diffusers(checkpoint_config, tensors)
