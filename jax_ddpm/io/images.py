"""Images at the file boundary: uint8 to float [-1, 1] and back, and grids of images.

Inside the project images are float32 NHWC in [-1, 1] (the data scaling of DDPM Sec. 3.3); every
file holds uint8. Pure array functions: paths.save_png writes a grid.
"""

from __future__ import annotations

import math

import numpy as np


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], the DDPM data scaling (Sec. 3.3)."""
  return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255], the inverse of the data scaling."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
  """uint8 [N, H, W, C] tiled into one [rows*(H+p)+p, cols*(W+p)+p, C] image on white."""
  count, height, width, channels = images.shape
  columns = columns or math.ceil(math.sqrt(count))
  rows = math.ceil(count / columns)
  grid = np.full(
    (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
    255,
    np.uint8,
  )
  for index, image in enumerate(images):
    row, column = divmod(index, columns)
    top, left = padding + row * (height + padding), padding + column * (width + padding)
    grid[top : top + height, left : left + width] = image
  return grid


def class_grid(images: np.ndarray, labels: np.ndarray, padding: int = 2) -> np.ndarray:
  """A grid with one row per class present in `labels` (in class order), white where a class
  has fewer images than the widest row."""
  classes = np.unique(labels)
  columns = max(int(np.sum(labels == c)) for c in classes)
  blank = np.full_like(images[:1], 255)
  rows = [
    np.concatenate([images[labels == c]] + [blank] * (columns - int(np.sum(labels == c))))
    for c in classes
  ]
  return image_grid(np.concatenate(rows), columns=columns, padding=padding)
