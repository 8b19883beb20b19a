"""The event-file writer: what it writes, TensorBoard reads back."""

import os

import numpy as np
import tensorboard_server
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from jax_ddpm.io import summaries


def read_back(logdir):
  accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  accumulator.Reload()
  return accumulator


def test_tensorboard_reads_scalars_images_texts_histograms_and_hparams(tmp_path):
  writer = summaries.EventFileWriter(str(tmp_path))
  writer.write_hparams({"optim.learning_rate": 2e-4, "data.source": "fake"})
  writer.write_scalars(1, {"loss": 0.5})
  writer.write_scalars(2, {"loss": 0.25})
  image = np.zeros((1, 4, 6, 3), np.uint8)
  image[0, 1, 2] = (255, 0, 0)
  writer.write_images(2, {"samples": image})
  writer.write_texts(2, {"note": "hello"})
  writer.write_histograms(2, {"weights": np.arange(10.0)}, num_buckets={"weights": 5})
  writer.close()
  accumulator = read_back(tmp_path)
  losses = {
    e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors("loss")
  }
  assert losses == {1: 0.5, 2: 0.25}
  width, height, png = tensor_util.make_ndarray(accumulator.Tensors("samples")[0].tensor_proto)
  assert (int(width), int(height)) == (6, 4)
  import io

  from PIL import Image

  assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), image[0])
  assert tensor_util.make_ndarray(accumulator.Tensors("note")[0].tensor_proto) == b"hello"
  histogram = tensor_util.make_ndarray(accumulator.Tensors("weights")[0].tensor_proto)
  assert histogram.shape == (5, 3) and histogram[:, 2].sum() == 10
  assert "_hparams_/session_start_info" in accumulator.Tags()["tensors"]


def test_each_flush_rewrites_the_file_and_a_full_file_starts_the_next(tmp_path):
  writer = summaries.EventFileWriter(str(tmp_path), segment_bytes=2000)
  for step in range(40):
    writer.write_scalars(step, {"loss": float(step)})
    if step % 7 == 0:
      writer.flush()
  writer.close()
  names = sorted(os.listdir(tmp_path))
  assert len(names) > 1 and all(".tmp" not in name for name in names), names
  assert all(os.path.getsize(tmp_path / name) <= 2000 for name in names)
  steps = [e.step for e in read_back(tmp_path).Tensors("loss")]
  assert steps == list(range(40))


def test_a_default_flags_tensorboard_serves_every_kind_of_summary(tmp_path):
  """TensorBoard's default (Rust) loader drops float64 scalars; the writer's must show."""
  logdir = tmp_path / "run"
  writer = summaries.EventFileWriter(str(logdir))
  writer.write_hparams({"optim.learning_rate": 2e-4, "data.source": "fake"})
  writer.write_scalars(1, {"loss": 0.5, "nonfinite_steps": 0})
  writer.write_scalars(2, {"loss": 0.25, "nonfinite_steps": 1})
  writer.write_images(2, {"samples": np.zeros((1, 4, 6, 3), np.uint8)})
  writer.write_texts(2, {"note": "hello"})
  writer.write_histograms(2, {"weights": np.arange(10.0)}, num_buckets={"weights": 5})
  writer.close()
  with tensorboard_server.running(str(logdir), str(tmp_path / "tensorboard.log")) as server:
    scalars = server.wait_for("plugin/scalars/tags", lambda tags: "loss" in tags.get(".", {}))
    print("scalars plugin:", scalars)
    assert set(scalars.get(".", {})) == {"loss", "nonfinite_steps"}, server.log()
    loss = server.get("plugin/scalars/scalars", run=".", tag="loss")
    assert [(step, value) for _, step, value in loss] == [(1, 0.5), (2, 0.25)]
    counts = server.get("plugin/scalars/scalars", run=".", tag="nonfinite_steps")
    assert [(step, value) for _, step, value in counts] == [(1, 0.0), (2, 1.0)]
    assert "samples" in server.get("plugin/images/tags")["."]
    assert server.get("plugin/text/tags")["."] == ["note"]
    histogram = server.get("plugin/histograms/histograms", run=".", tag="weights")
    assert [sum(bucket[2] for bucket in buckets) for _, _, buckets in histogram] == [10.0]
    hparams = server.post("plugin/hparams/experiment", {"experimentName": ""})
    assert {h["name"] for h in hparams["hparamInfos"]} == {"optim.learning_rate", "data.source"}
