"""Prompts to token embeddings: a word-level tokenizer over the training captions' vocabulary and a
small transformer encoder trained with the diffusion model from scratch, as the text-to-image
model of Rombach et al. 2022 (LDM, Sec. 4.3.1: a transformer on tokenized prompts, trained
jointly) was.

Every prompt becomes [<start>, its words..., <pad>...] of `max_tokens` ids; the mask marks the
start token and the words, so the empty prompt (classifier-free guidance's unconditional input)
is the start token alone and attention always has a key. A word outside the vocabulary is
refused by name rather than mapped to an unknown token: the model has never seen it. The encoder
is pre-LayerNorm self-attention and MLP blocks (Vaswani et al. 2017, eq. 1, with the padded
tokens masked out of every softmax) over learned token and position embeddings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ddpm.io.errors import ConfigError
from jax_ddpm.models.cross_attention import masked_attention

PAD, START = "<pad>", "<start>"


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Word-level ids: 0 is <pad>, 1 <start>, then the vocabulary's words in sorted order."""

  words: tuple[str, ...]
  max_tokens: int

  @classmethod
  def from_captions(cls, captions, max_tokens: int) -> Tokenizer:
    words = sorted({word for text in captions for word in text.lower().split()})
    tokenizer = cls(tuple(words), max_tokens)
    for text in captions:
      tokenizer.check(text)
    return tokenizer

  @property
  def vocabulary_size(self) -> int:
    return len(self.words) + 2

  def check(self, prompt: str) -> None:
    """ConfigError naming the prompt when a word is unknown or it is too long."""
    words = prompt.lower().split()
    unknown = [word for word in words if word not in self.words]
    if unknown:
      raise ConfigError(
        f"prompt {prompt!r}: unknown word(s) {unknown}; the model knows {list(self.words)}."
      )
    if len(words) + 1 > self.max_tokens:
      raise ConfigError(
        f"prompt {prompt!r} has {len(words)} words; at most {self.max_tokens - 1} fit "
        f"(model.max_tokens={self.max_tokens} with the start token)."
      )

  def encode(self, prompts) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, max_tokens], mask bool [N, max_tokens]) of the prompts."""
    index = {word: i + 2 for i, word in enumerate(self.words)}
    ids = np.zeros((len(prompts), self.max_tokens), np.int32)
    for row, prompt in enumerate(prompts):
      self.check(prompt)
      tokens = [1] + [index[word] for word in prompt.lower().split()]
      ids[row, : len(tokens)] = tokens
    return ids, ids != 0


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  vocabulary_size: int
  max_tokens: int = 8
  width: int = 64
  depth: int = 2
  num_heads: int = 4

  def validate(self) -> None:
    if self.width % self.num_heads:
      raise ConfigError(
        f"the text encoder's width {self.width} must be divisible by its {self.num_heads} heads."
      )


class EncoderBlock(nnx.Module):
  """x + attention(LN(x)), then x + MLP(LN(x)) (pre-LN transformer layer)."""

  def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
    width = config.width
    self.num_heads = config.num_heads
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.out = nnx.Linear(width, width, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x, mask):
    batch, length, width = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    heads = lambda a: a.reshape(batch, length, self.num_heads, width // self.num_heads)
    attended = masked_attention(heads(q), heads(k), heads(v), mask)
    x = x + self.out(attended.reshape(batch, length, width))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))


class TextEncoder(nnx.Module):
  """Token ids [B, L] and their mask -> token features [B, L, width] (the cross-attention's
  keys and values)."""

  def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    self.token_embed = nnx.Embed(config.vocabulary_size, config.width, rngs=rngs)
    self.position_embed = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (config.max_tokens, config.width))
    )
    self.blocks = nnx.List([EncoderBlock(config, rngs=rngs) for _ in range(config.depth)])
    self.norm = nnx.LayerNorm(config.width, rngs=rngs)

  def __call__(self, ids, mask):
    if ids.shape[1:] != (self.config.max_tokens,) or mask.shape != ids.shape:
      raise ValueError(
        f"TextEncoder expects ids and mask of shape [B, {self.config.max_tokens}], got "
        f"{ids.shape} and {mask.shape}."
      )
    x = self.token_embed(ids) + self.position_embed[...][None]
    for block in self.blocks:
      x = block(x, mask)
    return self.norm(x)
