"""Data sources, the deterministic batch order, and per-process slices of the global batch."""

import dataclasses
import os

import numpy as np
import pytest
import tfds_data

from jax_ddpm.config.sections import DataConfig
from jax_ddpm.data import pipeline as input_pipeline
from jax_ddpm.data import sources as data_sources
from jax_ddpm.io import errors
from jax_ddpm.runtime import mesh as parallel

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def test_each_epoch_visits_every_example_once_in_a_seeded_order():
  n, batch = 40, 8
  first_epoch = np.concatenate(
    [input_pipeline.global_indices(s, batch, n, seed=3) for s in range(5)]
  )
  second_epoch = np.concatenate(
    [input_pipeline.global_indices(s, batch, n, seed=3) for s in range(5, 10)]
  )
  assert sorted(first_epoch) == list(range(n)) and sorted(second_epoch) == list(range(n))
  assert not np.array_equal(first_epoch, second_epoch)
  np.testing.assert_array_equal(
    input_pipeline.global_indices(7, batch, n, seed=3),
    input_pipeline.global_indices(7, batch, n, seed=3),
  )
  assert not np.array_equal(
    input_pipeline.global_indices(0, batch, n, seed=3),
    input_pipeline.global_indices(0, batch, n, seed=4),
  )


def test_batches_straddling_an_epoch_boundary_stay_deterministic():
  indices = input_pipeline.global_indices(step=4, global_batch=12, num_examples=50, seed=0)
  assert len(indices) == 12 and len(set(indices[:2])) == 2  # positions 48, 49 end epoch 0


def test_process_slices_assemble_the_global_batch():
  source = data_sources.ArraySource(data_sources.fake_images(30, 4, 1, seed=0))
  whole = input_pipeline.local_batch(source, 3, 8, 0, True, process_index=0, process_count=1)
  parts = [
    input_pipeline.local_batch(source, 3, 8, 0, True, process_index=p, process_count=4)
    for p in range(4)
  ]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  assert whole.dtype == np.float32 and whole.min() >= -1 and whole.max() <= 1


def test_random_flip_mirrors_exactly_the_chosen_images():
  images = data_sources.fake_images(16, 4, 1, seed=1)
  source = data_sources.ArraySource(images)
  flipped = input_pipeline.local_batch(source, 0, 16, 0, True, 0, 1)
  plain = input_pipeline.local_batch(source, 0, 16, 0, False, 0, 1)
  flips = input_pipeline.global_flips(0, 16, 0)
  assert 0 < flips.sum() < 16
  np.testing.assert_array_equal(flipped[flips], plain[flips][:, :, ::-1])
  np.testing.assert_array_equal(flipped[~flips], plain[~flips])


def test_embedded_mnist_holds_the_5000_real_digits():
  images = data_sources.read_embedded_mnist()
  assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
  # Real digits: dark background, bright strokes covering roughly a fifth of the pixels.
  assert images[:, 0, :, 0].max() == 0 and images.max() == 255
  assert 0.1 < (images > 128).mean() < 0.3


def test_batch_iterator_yields_sharded_global_batches_from_the_given_step():
  mesh = parallel.data_mesh()
  source = data_sources.ArraySource(data_sources.fake_images(20, 4, 1, seed=0))
  for k in (1, 3):
    iterator = input_pipeline.BatchIterator(
      source,
      first_step=5,
      global_batch=8,
      seed=0,
      random_flip=False,
      sharding=parallel.batch_sharding(mesh, int(k > 1)),
      steps_per_dispatch=k,
    )
    batch = next(iterator)["image"]
    iterator.close()
    expected = input_pipeline.local_batch(source, 5, 8, 0, False, 0, 1)
    first = batch if k == 1 else batch[0]
    np.testing.assert_array_equal(np.asarray(first), expected)
    assert batch.shape == ((8, 4, 4, 1) if k == 1 else (3, 8, 4, 4, 1))
    assert batch.sharding.spec == parallel.batch_sharding(mesh, int(k > 1)).spec


def test_grain_reads_the_plain_loops_batches_for_every_process_and_step():
  # 20 examples, global batch 8: steps 3..9 straddle epochs; flips on; two processes.
  source = data_sources.ArraySource(data_sources.fake_images(20, 4, 3, seed=1))
  for process_index in (0, 1):
    batches = iter(
      input_pipeline.grain_batches(
        source,
        first_step=3,
        global_batch=8,
        seed=7,
        random_flip=True,
        process_index=process_index,
        process_count=2,
        num_threads=3,
      )
    )
    for step in range(3, 10):
      np.testing.assert_array_equal(
        next(batches)["image"],
        input_pipeline.local_batch(source, step, 8, 7, True, process_index, 2),
      )


def test_iterator_surfaces_errors_from_its_thread():
  class Broken:
    def __len__(self):
      return 4

    def read(self, indices):
      raise OSError("disk gone")

  iterator = input_pipeline.BatchIterator(
    Broken(),
    first_step=0,
    global_batch=8,
    seed=0,
    random_flip=False,
    sharding=parallel.batch_sharding(parallel.data_mesh()),
  )
  with pytest.raises(OSError, match="disk gone"):
    next(iterator)
  iterator.close()


def test_image_folder_source_crops_resizes_and_checks_shape(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  for i, size in enumerate([(40, 30), (20, 20)]):
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  config = DataConfig(source="folder", path=str(tmp_path), channels=3, image_size=16)
  source = data_sources.create_source(config)
  assert source.read(np.arange(2)).shape == (2, 16, 16, 3)
  data_sources.check_source_shape(source, config)
  config = dataclasses.replace(config, image_size=8)
  with pytest.raises(ValueError, match=r"yields images of shape \(16, 16, 3\).*data.image_size=8"):
    data_sources.check_source_shape(source, config)


@pytest.fixture(scope="module")
def tfds_digits(tmp_path_factory):
  """The same 256 digits stored by TFDS as ArrayRecord and as TFRecord."""
  return {
    file_format: tfds_data.build(str(tmp_path_factory.mktemp(file_format)), file_format)
    for file_format in ("array_record", "tfrecord")
  }


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_source_reads_both_file_formats_by_index(tfds_digits, file_format):
  config = DataConfig(
    source="tfds",
    tfds_name=tfds_data.NAME,
    split="train",
    data_dir=tfds_digits[file_format],
    image_size=28,
    channels=1,
  )
  source = data_sources.create_source(config)
  data_sources.check_source_shape(source, config)
  assert len(source) == 256
  digits = data_sources.read_embedded_mnist()[:256]
  images = source.read(np.arange(256))
  # TFDS stores examples in an order of its own; the set of images is the digits'.
  assert sorted(map(bytes, images)) == sorted(map(bytes, digits))
  if file_format == "tfrecord":
    other = data_sources.TfdsSource(tfds_data.NAME, "train", tfds_digits["array_record"])
    assert np.array_equal(other.read(np.arange(256)), images)  # the same order in both formats
  sliced = data_sources.TfdsSource(tfds_data.NAME, "train[10:20]", tfds_digits[file_format])
  assert np.array_equal(sliced.read(np.arange(10)), images[10:20])


def test_tfrecord_data_too_large_for_memory_names_the_conversion(tfds_digits):
  with pytest.raises(errors.InputFileError, match=r"tfds convert_format --dataset_version_dir="):
    data_sources.TfdsSource(tfds_data.NAME, "train", tfds_digits["tfrecord"], max_bytes=1000)


def test_a_truncated_tfrecord_shard_is_named(tmp_path):
  import shutil

  data_dir = shutil.copytree(tfds_data.build(str(tmp_path / "a"), "tfrecord"), tmp_path / "b")
  (shard,) = (data_dir / tfds_data.NAME / "1.0.0").glob("*.tfrecord*")
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(errors.InputFileError, match=r"truncated"):
    data_sources.TfdsSource(tfds_data.NAME, "train", str(data_dir))


def test_idx_source_reads_real_fashion_mnist():
  if not os.path.isdir(FASHION_MNIST):
    pytest.skip(f"{FASHION_MNIST} absent: apt-get install dataset-fashion-mnist (CI installs it)")
  config = DataConfig(
    **dict(source="idx", path=FASHION_MNIST, split="test", image_size=28, channels=1)
  )
  source = data_sources.create_source(config)
  assert len(source) == 10_000
  images = source.read(np.arange(100))
  assert images.dtype == np.uint8 and images.shape == (100, 28, 28, 1)
  assert 50 < images.mean() < 100  # clothing on black, not noise (~127) or blank


def test_idx_reader_rejects_a_truncated_file(tmp_path):
  header = b"\x00\x00\x08\x03" + (3).to_bytes(4, "big") + (2).to_bytes(4, "big") * 2
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(header + bytes(5))
  with pytest.raises(ValueError, match=r"header says dimensions \(3, 2, 2\), but the file holds 5"):
    data_sources.read_idx_images(str(path))


def write_idx(path, array):
  header = (
    b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  )
  path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_labelled_idx_split_pairs_images_with_labels(tmp_path):
  images = np.arange(5 * 4 * 4).reshape(5, 4, 4) % 256
  write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 1, 4, 1, 5]))
  config = DataConfig(source="idx", path=str(tmp_path), split="train")
  read_images, labels = data_sources.read_labelled(config, "test")
  np.testing.assert_array_equal(read_images[..., 0], images)
  np.testing.assert_array_equal(labels, [3, 1, 4, 1, 5])
  write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 1, 4]))
  with pytest.raises(ValueError, match="5 images but 3 labels in split 'test'"):
    data_sources.read_labelled(config, "test")
  with pytest.raises(FileNotFoundError, match="No train-images-idx3-ubyte"):
    data_sources.read_labelled(config, "train")


def test_embedded_digits_have_500_labels_of_each_digit():
  config = DataConfig(source="mnist_embedded")
  images, labels = data_sources.read_labelled(config, "train")
  assert images.shape == (5000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
  with pytest.raises(ValueError, match="has only the split 'train'"):
    data_sources.read_labelled(config, "test")


def test_unknown_source_names_the_allowed_values():
  with pytest.raises(ValueError, match=r"Unknown data.source 'imagenet'.*mnist_embedded"):
    DataConfig(source="imagenet")
