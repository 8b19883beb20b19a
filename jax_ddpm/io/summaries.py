"""TensorBoard summaries written through the path layer, with TensorBoard's protos alone.

The writers have CLU's MetricWriter methods (write_scalars, write_images, write_texts,
write_histograms, write_hparams, flush, close), so CLU's periodic actions write through them, but
they import neither CLU's metric_writers nor TensorFlow (which that package loads): a run writes
its summaries where TensorFlow is not installed. `EventFileWriter` produces the event files that
tf.summary's v2 ops write (TFRecord framing of `Event` protos, float32 scalars) through epath, so
a gs:// workdir holds them too (TensorFlow's own GCS client reaches only the public endpoint). A
local file grows by appends, so a live TensorBoard follows it; object stores have no append, so
there each flush uploads the current file whole, and a new file starts when it passes
`segment_bytes`. TensorBoard reads the files of a directory in name order, and a name starts with
the creation time, as TensorFlow's do. `LoggingWriter` logs what it is given as CLU's does.
"""

from __future__ import annotations

import io
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.hparams import summary_v2

from jax_ddpm.io import paths as files


def create_writer(workdir: str, *, just_logging: bool = False) -> MultiWriter:
  """Logs every summary; process 0 (just_logging=False) also writes TensorBoard event files."""
  writers = [LoggingWriter()]
  if not just_logging:
    writers.append(EventFileWriter(workdir))
  return MultiWriter(writers)


class MultiWriter:
  """Hands every summary to each of its writers."""

  def __init__(self, writers: list):
    self._writers = writers

  def __getattr__(self, method: str):
    def fan_out(*args, **kwargs):
      for writer in self._writers:
        getattr(writer, method)(*args, **kwargs)

    return fan_out


class LoggingWriter:
  """Logs summaries as CLU's LoggingWriter does ("[step] key=value, ..."), which scripts parse."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    values = [
      f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())
    ]
    logging.info("[%d] %s", step, ", ".join(values))

  def write_images(self, step: int, images: Mapping[str, Any]):
    logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]):
    logging.info("[%d] Got texts: %s.", step, texts)

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
    del num_buckets
    logging.info("[%d] Got histograms: %s.", step, {k: np.shape(v) for k, v in arrays.items()})

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None):
    del metadata
    logging.info("[%d] Got raw tensors: %s.", step, {k: np.shape(v) for k, v in values.items()})

  def write_hparams(self, hparams: Mapping[str, Any]):
    logging.info("[Hyperparameters] %s", hparams)

  def flush(self):
    logging.flush()

  def close(self):
    self.flush()


def _record(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
  length = struct.pack("<Q", len(data))
  return (
    length
    + struct.pack("<I", masked_crc32c(length))
    + data
    + struct.pack("<I", masked_crc32c(data))
  )


def _tensor(values: np.ndarray) -> tensor_pb2.TensorProto:
  """A TensorProto of `values` in the dtype tf.summary writes: strings, int64, float32 scalars
  (TensorBoard's default loader drops DT_DOUBLE scalars) and float64 tables (histograms)."""
  shape = tensor_shape_pb2.TensorShapeProto(
    dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in values.shape]
  )
  if values.dtype.kind in "SUO":
    return tensor_pb2.TensorProto(
      dtype=types_pb2.DT_STRING,
      tensor_shape=shape,
      string_val=[v if isinstance(v, bytes) else str(v).encode() for v in values.ravel()],
    )
  if values.dtype.kind in "iub":
    return tensor_pb2.TensorProto(
      dtype=types_pb2.DT_INT64,
      tensor_shape=shape,
      int64_val=values.astype(np.int64).ravel().tolist(),
    )
  if values.dtype == np.float32:
    return tensor_pb2.TensorProto(
      dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=values.ravel().tolist()
    )
  return tensor_pb2.TensorProto(
    dtype=types_pb2.DT_DOUBLE,
    tensor_shape=shape,
    double_val=values.astype(np.float64).ravel().tolist(),
  )


def _png(image: np.ndarray) -> bytes:
  """PNG bytes of one HWC image, uint8 or float in [0, 1]."""
  if image.dtype != np.uint8:
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


class EventFileWriter:
  """A CLU MetricWriter of TensorBoard event files under `logdir`, local or on an object store."""

  def __init__(self, logdir: str, segment_bytes: int = 8 << 20):
    self._logdir, self._segment_bytes = logdir, segment_bytes
    self._segment = 0
    self._start_segment()

  def _start_segment(self) -> None:
    name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{self._segment}.v2"
    self._path = files.join(self._logdir, name)
    self._segment += 1
    first = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
    self._written: list[bytes] = []  # kept for object stores, which rewrite the whole file
    self._pending = [_record(first.SerializeToString())]
    self._size = len(self._pending[0])

  def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    event = event_pb2.Event(
      wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
    )
    record = _record(event.SerializeToString())
    if self._size + len(record) > self._segment_bytes:
      self.flush()
      self._start_segment()
    self._pending.append(record)
    self._size += len(record)

  @staticmethod
  def _value(
    tag: str,
    values: np.ndarray,
    plugin: str,
    content: bytes = b"",
    data_class=summary_pb2.DATA_CLASS_TENSOR,
  ) -> summary_pb2.Summary.Value:
    metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin, content=content),
      data_class=data_class,
    )
    return summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=_tensor(values))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    """float32 scalar tensors of the scalars plugin, as tf.summary.scalar writes them."""
    self._add(
      step,
      [
        self._value(
          tag,
          np.asarray(value, np.float32).reshape(()),
          "scalars",
          data_class=summary_pb2.DATA_CLASS_SCALAR,
        )
        for tag, value in scalars.items()
      ],
    )

  def write_images(self, step: int, images: Mapping[str, Any]):
    """Each value [N, H, W, C] (C = 1 or 3): tf.summary.image's [width, height, png...] tensor."""
    values = []
    for tag, batch in images.items():
      batch = np.asarray(batch)
      strings = [str(batch.shape[2]).encode(), str(batch.shape[1]).encode()]
      strings += [_png(image) for image in batch]
      values.append(
        self._value(
          tag,
          np.array(strings, dtype=object),
          "images",
          data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE,
        )
      )
    self._add(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._add(
      step,
      [
        self._value(tag, np.array([text], dtype=object).reshape(()), "text")
        for tag, text in texts.items()
      ],
    )

  def write_histograms(
    self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
  ):
    """tf.summary.histogram's [k, 3] tensor of (left edge, right edge, count)."""
    values = []
    for tag, array in arrays.items():
      counts, edges = np.histogram(
        np.asarray(array, np.float64).ravel(), bins=(num_buckets or {}).get(tag, 30)
      )
      table = np.stack([edges[:-1], edges[1:], counts], axis=1)
      values.append(self._value(tag, table, "histograms"))
    self._add(step, values)

  def write_summaries(
    self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
  ):
    summary_values = []
    for tag, value in values.items():
      meta = (metadata or {}).get(tag)
      if isinstance(meta, bytes):
        meta = summary_pb2.SummaryMetadata.FromString(meta)
      summary_values.append(
        summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=_tensor(np.asarray(value)))
      )
    self._add(step, summary_values)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._add(0, list(summary_v2.hparams_pb(dict(hparams)).value))

  def flush(self):
    if not self._pending:
      return
    if files.is_object_store(self._path):
      self._written += self._pending
      files.save_bytes(self._path, b"".join(self._written))
    else:
      files.append_bytes(self._path, b"".join(self._pending))
    self._pending = []

  def close(self):
    self.flush()
