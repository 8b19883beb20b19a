"""Captions for digit images from what is measured on each image: its label, its stroke thickness
and its slant, so that a text prompt asks for more than the class ("a thick slanted seven").

Thickness is the mean stroke width 2 A / P of the binarised digit (A its ink pixels, P the length
of the ink's outline in pixel edges: a stroke of length L and width w has A = L w and P ~ 2 L),
the area-over-length measure of Morpho-MNIST (Castro et al. 2019, Sec. 3.1) without a skeleton.
Slant is the shear of the ink's second central moments, -mu_11 / mu_02 with y pointing down
(positive: the top leans right), the shear that moment-based deskewing removes; it is reported
in degrees, atan of the shear. Each property is cut into three words at the training digits'
terciles (`CaptionBins.from_images`), so that every word is as frequent as the others, and the
middle tercile says nothing: "a seven" is a digit of ordinary thickness and slant. Handwritten
digits lean right (the 5000 training digits' median slant is 8 degrees, their lower tercile
0.6), so the slant words are "upright" and "slanted".

There are 10 x 3 x 3 = 90 captions; `caption_index` numbers them, so that a labelled source
becomes a captioned one (`CaptionedSource`: its labels are caption indices) and the training
pipeline carries captions as it carries classes. The same functions measure generated samples, so
a test can ask whether a prompt was followed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_ddpm.io.errors import ConfigError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS_WORDS = ("thin", None, "thick")
SLANT_WORDS = ("upright", None, "slanted")
INK_THRESHOLD = 127  # uint8 pixels above it are ink
LEVELS = 3  # words per property: the lower tercile's, none, the upper tercile's
NUM_CAPTIONS = len(DIGIT_WORDS) * LEVELS * LEVELS
VOWEL_SOUNDS = ("upright", "eight")  # the caption words that take "an"


def article(word: str) -> str:
  return "an" if word in VOWEL_SOUNDS else "a"


DEFAULT_PROMPTS = tuple(f"{article(word)} {word}" for word in DIGIT_WORDS)


def _ink(images: np.ndarray) -> np.ndarray:
  """[N, H, W] float ink intensities in [0, 1] of uint8 [N, H, W, 1] (or [N, H, W]) images."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"captions measure uint8 images, got {images.dtype}.")
  if images.ndim == 4:
    if images.shape[-1] != 1:
      raise ValueError(f"captions measure one-channel digits, got shape {images.shape}.")
    images = images[..., 0]
  return images.astype(np.float64) / 255.0


def thickness(images: np.ndarray) -> np.ndarray:
  """Mean stroke width in pixels, 2 A / P of each binarised image (0 for an empty one)."""
  ink = _ink(images) > INK_THRESHOLD / 255.0
  padded = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
  outline = np.sum(padded[:, 1:, :] != padded[:, :-1, :], axis=(1, 2)) + np.sum(
    padded[:, :, 1:] != padded[:, :, :-1], axis=(1, 2)
  )
  area = ink.sum(axis=(1, 2))
  return np.where(outline > 0, 2.0 * area / np.maximum(outline, 1), 0.0)


def slant(images: np.ndarray) -> np.ndarray:
  """Slant in degrees, atan(-mu_11 / mu_02) of each image's ink (positive: leaning right)."""
  ink = _ink(images)
  _, height, width = ink.shape
  y, x = np.mgrid[:height, :width].astype(np.float64)
  mass = np.maximum(ink.sum(axis=(1, 2)), 1e-12)
  y_mean = (ink * y).sum(axis=(1, 2)) / mass
  x_mean = (ink * x).sum(axis=(1, 2)) / mass
  dy, dx = y[None] - y_mean[:, None, None], x[None] - x_mean[:, None, None]
  mu_11, mu_02 = (ink * dx * dy).sum(axis=(1, 2)), (ink * dy**2).sum(axis=(1, 2))
  return np.degrees(np.arctan(-mu_11 / np.maximum(mu_02, 1e-12)))


@dataclasses.dataclass(frozen=True)
class CaptionBins:
  """The tercile edges that turn a thickness (pixels) and a slant (degrees) into words."""

  thickness_edges: tuple[float, float]
  slant_edges: tuple[float, float]

  @classmethod
  def from_images(cls, images: np.ndarray) -> CaptionBins:
    """Terciles of the measured properties of `images` (the training digits)."""
    terciles = lambda values: tuple(float(v) for v in np.quantile(values, [1 / 3, 2 / 3]))
    return cls(terciles(thickness(images)), terciles(slant(images)))

  def thickness_level(self, values: np.ndarray) -> np.ndarray:
    """0 thin, 1 ordinary, 2 thick."""
    return np.digitize(values, self.thickness_edges)

  def slant_level(self, values: np.ndarray) -> np.ndarray:
    """0 upright, 1 ordinary, 2 slanted."""
    return np.digitize(values, self.slant_edges)


def caption(label: int, thickness_level: int, slant_level: int) -> str:
  """ "a thick slanted seven", "a thin two", "an upright one", "a seven", ..."""
  if not 0 <= int(label) < len(DIGIT_WORDS):
    raise ValueError(f"a digit label must be in 0..9, got {label!r}.")
  words = [THICKNESS_WORDS[thickness_level], SLANT_WORDS[slant_level], DIGIT_WORDS[int(label)]]
  words = [word for word in words if word]
  return article(words[0]) + " " + " ".join(words)


def captions(images: np.ndarray, labels: np.ndarray, bins: CaptionBins) -> list[str]:
  """The caption of each digit: its label and the words for its measured properties."""
  thick = bins.thickness_level(thickness(images))
  slanted = bins.slant_level(slant(images))
  return [caption(y, a, b) for y, a, b in zip(np.asarray(labels), thick, slanted)]


def parse(prompt: str) -> tuple[int, int, int]:
  """(label, thickness level, slant level) a caption asks for; ConfigError naming the prompt
  when it is not one of the captions `caption` writes."""
  words = prompt.strip().lower().split()
  if len(words) < 2 or words[0] not in ("a", "an") or words[-1] not in DIGIT_WORDS:
    raise ConfigError(
      f"prompt {prompt!r} is not a digit caption: 'a [thin|thick] [upright|slanted] <zero..nine>'."
    )
  middle = words[1:-1]
  thick = [THICKNESS_WORDS.index(w) for w in middle if w in THICKNESS_WORDS]
  slanted = [SLANT_WORDS.index(w) for w in middle if w in SLANT_WORDS]
  if len(thick) + len(slanted) != len(middle) or len(thick) > 1 or len(slanted) > 1:
    raise ConfigError(f"prompt {prompt!r} has words outside the captions' vocabulary: {middle}.")
  return DIGIT_WORDS.index(words[-1]), (thick or [1])[0], (slanted or [1])[0]


def requested_digits(prompts) -> np.ndarray:
  """int32 [N]: the digit each prompt asks for (what a text model's samples are scored on)."""
  return np.array([parse(str(prompt))[0] for prompt in prompts], np.int32)


def caption_index(label, thickness_level, slant_level):
  """The caption's number in 0..NUM_CAPTIONS - 1 (numpy arrays or ints)."""
  return (np.asarray(label) * LEVELS + thickness_level) * LEVELS + slant_level


def all_captions() -> tuple[str, ...]:
  """Every caption, in caption_index order."""
  return tuple(
    caption(label, thick, slanted)
    for label in range(len(DIGIT_WORDS))
    for thick in range(LEVELS)
    for slanted in range(LEVELS)
  )


def vocabulary() -> tuple[str, ...]:
  """The captions' words, sorted."""
  return tuple(sorted({word for text in all_captions() for word in text.split()}))


class CaptionedSource:
  """A labelled digit source whose labels are its digits' caption indices, measured as each
  batch is read (bins: the training digits' terciles)."""

  num_classes = NUM_CAPTIONS

  def __init__(self, source, bins: CaptionBins):
    self.source, self.bins = source, bins

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices: np.ndarray) -> np.ndarray:
    return self.source.read(indices)

  def read_labelled(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images, labels = self.source.read_labelled(indices)
    thick = self.bins.thickness_level(thickness(images))
    slanted = self.bins.slant_level(slant(images))
    return images, caption_index(labels, thick, slanted).astype(np.int32)
