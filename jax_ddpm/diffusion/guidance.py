"""Conditioning at sampling time: which labels to draw, and classifier-free guidance.

A conditional U-Net embeds num_classes + 1 labels; the last, `null_label`, means "no class". It
is trained on it with probability training.label_dropout (Ho & Salimans 2022, Algorithm 1), so
one network is both the conditional model D(x_t, t, y) and the unconditional D(x_t, t, null).

Guidance (Ho & Salimans 2022, eq. 6) mixes the two:

  D_w(x_t, t, y) = D(x_t, t, null) + w (D(x_t, t, y) - D(x_t, t, null))

with this project's convention for the scale w: w = 1 is the plain conditional model, w = 0 the
unconditional one, w > 1 moves further towards the class (the paper's w is our w - 1). D is
whatever the network predicts, eps, x_0 or v: at fixed x_t each is an affine function of the
others with the same coefficients, so mixing any of them gives the same guided step. The
samplers never see labels: `guide` turns the conditional denoiser into a label-free one, and
`guide_condition` does the same for any condition, a text prompt's tokens with the empty prompt as
the unconditional input (Rombach et al. 2022, Sec. 4.3.1, trained with the prompt dropped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_ddpm.io.errors import ConfigError

LABEL_CHOICES = ("grid", "random")


def null_label(num_classes: int) -> int:
  """The label index that means "no class": the extra, last row of the class embedding."""
  return num_classes


@dataclasses.dataclass(frozen=True)
class Conditioning:
  """The labels a conditional model is sampled with, and the guidance scale w.

  labels: "grid" (the batch split into num_classes equal runs, class 0 first: a grid with one
    row per class), "random" (uniform, drawn from the sampling key) or a tuple of classes
    repeated over the batch.
  """

  num_classes: int
  labels: str | tuple[int, ...] = "grid"
  guidance_scale: float = 1.0

  def __post_init__(self):
    if not isinstance(self.num_classes, int) or self.num_classes < 1:
      raise ConfigError(f"num_classes must be a positive integer, got {self.num_classes!r}.")
    check_labels(self.labels, self.num_classes)
    check_guidance_scale(self.guidance_scale)

  def batch_labels(self, rng: jax.Array, batch: int) -> jax.Array:
    """int32 [batch] labels of one batch; "random" draws them from `rng`."""
    if self.labels == "grid":
      return (jnp.arange(batch) * self.num_classes // batch).astype(jnp.int32)
    if self.labels == "random":
      return jax.random.randint(rng, (batch,), 0, self.num_classes, jnp.int32)
    table = jnp.asarray(self.labels, jnp.int32)
    return table[jnp.arange(batch) % len(self.labels)]


@dataclasses.dataclass(frozen=True)
class PromptConditioning:
  """The prompts a text model is sampled with, as token ids (models/text_encoder.py's
  Tokenizer), and the guidance scale w; image j of every batch follows prompt j mod P, so with a
  batch size that P divides, image n of the stream follows prompts[n mod P]."""

  prompts: tuple[str, ...]
  ids: tuple[tuple[int, ...], ...]  # [P, max_tokens], 0 is padding
  empty_ids: tuple[int, ...]  # the empty prompt: the unconditional input
  guidance_scale: float = 1.0

  def batch_labels(self, rng: jax.Array, batch: int) -> jax.Array:
    """int32 [batch] prompt indices of one batch (`rng` unused: prompts are not drawn)."""
    del rng
    return (jnp.arange(batch) % len(self.prompts)).astype(jnp.int32)

  def tokens(self, indices: jax.Array):
    """(ids [B, L], mask [B, L]) of the prompts `indices`, and of as many empty prompts."""
    ids = jnp.asarray(self.ids, jnp.int32)[indices]
    empty = jnp.broadcast_to(jnp.asarray(self.empty_ids, jnp.int32), ids.shape)
    return (ids, ids != 0), (empty, empty != 0)


def guide(
  denoise_fn: Callable,
  y: jax.Array,
  guidance_scale: float,
  num_classes: int,
  learn_sigma: bool = False,
) -> Callable:
  """denoise(x_t, t) of the guided model D_w above, from a conditional denoise_fn(x_t, t, y)
  whose unconditional input is the null label (`guide_condition`)."""
  null = jnp.full_like(y, null_label(num_classes))
  return guide_condition(denoise_fn, y, null, guidance_scale, learn_sigma)


def guide_condition(
  denoise_fn: Callable, condition, null_condition, guidance_scale: float, learn_sigma: bool = False
) -> Callable:
  """denoise(x_t, t) of D_w above for any condition (a batch-first pytree: labels, or a prompt's
  token ids and mask) and the condition that means "none" (the null label, the empty prompt).

  w = 1 and w = 0 call the network once; any other w evaluates the conditional and the
  unconditional branch in one forward pass over a doubled batch. A learned-variance network's
  variance channels (learn_sigma) are the conditional branch's, unguided, as in GLIDE.
  """
  if guidance_scale == 1:
    return lambda x_t, t: denoise_fn(x_t, t, condition)
  if guidance_scale == 0:
    return lambda x_t, t: denoise_fn(x_t, t, null_condition)
  both_conditions = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), condition, null_condition)

  def guided(x_t, t):
    both = denoise_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), both_conditions)
    conditional, unconditional = jnp.split(both, 2)
    guided_output = unconditional + guidance_scale * (conditional - unconditional)
    if learn_sigma:
      channels = conditional.shape[-1] // 2
      return jnp.concatenate([guided_output[..., :channels], conditional[..., channels:]], -1)
    return guided_output

  return guided


def check_labels(labels, num_classes: int, key: str = "labels") -> None:
  """ConfigError unless `key` = labels is "grid", "random" or classes in 0..num_classes-1."""
  if isinstance(labels, str):
    if labels not in LABEL_CHOICES:
      raise ConfigError(
        f"Unknown {key} {labels!r}; allowed values: {list(LABEL_CHOICES)} or a list of classes."
      )
  elif not labels or any(not isinstance(y, int) or not 0 <= y < num_classes for y in labels):
    raise ConfigError(
      f"{key}={list(labels)!r}: each must be a class in 0..{num_classes - 1} "
      f"(num_classes={num_classes})."
    )


def check_guidance_scale(guidance_scale, key: str = "guidance_scale") -> None:
  """ConfigError unless the guidance scale w (`key`) is >= 0."""
  if not guidance_scale >= 0:
    raise ConfigError(f"{key} must be >= 0, got {guidance_scale!r}.")
