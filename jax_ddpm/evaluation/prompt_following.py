"""How closely a text model's samples follow their prompts, measured by the code that wrote the
training captions (data/captions.py) and a digit classifier.

For each image and the prompt it was drawn from: whether the classifier reads the requested
digit (label accuracy), and its measured stroke thickness and slant against the requested level
(0: "thin" / "upright", 1: no word, 2: "thick" / "slanted"): the Pearson correlation of the
measured value with the level, the mean measured value per level, and how often the measured
tercile is the requested one (1/3 by chance).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_ddpm.data import captions


@dataclasses.dataclass(frozen=True)
class PropertyFollowing:
  """One measured property (thickness in pixels, slant in degrees) against its requested level."""

  correlation: float  # Pearson r of the measured value with the requested level (NaN: one level)
  mean_by_level: tuple[float, float, float]  # NaN for a level no prompt asked for
  level_accuracy: float  # measured tercile == requested level


@dataclasses.dataclass(frozen=True)
class PromptFollowing:
  count: int
  label_accuracy: float
  thickness: PropertyFollowing
  slant: PropertyFollowing


def _following(values: np.ndarray, levels: np.ndarray, measured_levels: np.ndarray):
  spread = np.std(values) * np.std(levels)
  covariance = np.mean((values - values.mean()) * (levels - levels.mean()))
  correlation = float(covariance / spread) if spread > 0 else float("nan")  # one level asked
  means = tuple(
    float(np.mean(values[levels == level])) if np.any(levels == level) else float("nan")
    for level in range(captions.LEVELS)
  )
  return PropertyFollowing(correlation, means, float(np.mean(measured_levels == levels)))


def measure(
  images: np.ndarray, prompts, predicted_labels: np.ndarray, bins: captions.CaptionBins
) -> PromptFollowing:
  """Prompt following of uint8 digits [N, H, W, 1] drawn from `prompts` [N] (digit captions),
  the classifier's labels of them [N], with the training digits' terciles `bins`."""
  requested = np.array([captions.parse(str(p)) for p in prompts])
  if len(requested) != len(images) or len(predicted_labels) != len(images):
    raise ValueError(
      f"{len(images)} images, {len(requested)} prompts and {len(predicted_labels)} labels."
    )
  thickness, slant = captions.thickness(images), captions.slant(images)
  return PromptFollowing(
    count=len(images),
    label_accuracy=float(np.mean(np.asarray(predicted_labels) == requested[:, 0])),
    thickness=_following(thickness, requested[:, 1], bins.thickness_level(thickness)),
    slant=_following(slant, requested[:, 2], bins.slant_level(slant)),
  )
