"""A real TFDS dataset for tests: the shipped MNIST digits stored by TFDS in a chosen format."""

import numpy as np

from jax_ddpm.data import sources as data_sources

NAME = "jax_ddpm_digits"


def build(data_dir: str, file_format: str, count: int = 256) -> str:
  """Writes NAME (train: the first `count` embedded digits with labels) under data_dir."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  images = data_sources.read_embedded_mnist()[:count]
  labels = data_sources.read_embedded_mnist_labels()[:count].astype(np.int64)
  features = tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(28, 28, 1)),
      "label": tfds.features.ClassLabel(num_classes=10),
    }
  )
  split = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  tfds.dataset_builders.store_as_tfds_dataset(
    name=NAME,
    version="1.0.0",
    features=features,
    split_datasets={"train": split},
    data_dir=data_dir,
    file_format=file_format,
  )
  return data_dir
