"""Prompts: captions measured on digits, the tokenizer, the text encoder and the U-Net's
cross-attention, whose padded tokens must never change an output."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_ddpm.data import captions
from jax_ddpm.io.errors import ConfigError
from jax_ddpm.models.cross_attention import CrossAttentionBlock
from jax_ddpm.models.text_encoder import TextEncoder, TextEncoderConfig, Tokenizer
from jax_ddpm.models.unet import UNet, UNetConfig

CAPTIONS = ["a thick slanted seven", "a thin two", "a seven", "a upright one"]
TINY_UNET = UNetConfig(
  image_size=8,
  in_channels=1,
  out_channels=1,
  ch=16,
  ch_mult=(1, 2),
  num_res_blocks=1,
  attn_resolutions=(4,),
  num_groups=4,
  dropout=0.0,
)


def bar(width, length=20, shear=0.0, size=28):
  """A uint8 [1, size, size, 1] stroke `width` pixels wide and `length` tall, its column
  moving right by `shear` pixels per pixel upwards."""
  image = np.zeros((size, size), np.uint8)
  top = (size - length) // 2
  for row in range(top, top + length):
    left = int(round(size / 2 - width / 2 + shear * (top + length / 2 - row)))
    image[row, left : left + width] = 255
  return image[None, :, :, None]


def test_thickness_is_twice_the_area_over_the_outline_and_follows_the_stroke_width():
  for width in (1, 2, 3, 5):
    area, outline = width * 20, 2 * (width + 20)
    assert captions.thickness(bar(width))[0] == pytest.approx(2 * area / outline)
  widths = [captions.thickness(bar(w))[0] for w in (1, 2, 3, 4, 5)]
  assert widths == sorted(widths)
  assert captions.thickness(np.zeros((1, 28, 28, 1), np.uint8))[0] == 0.0


def test_slant_is_the_angle_of_the_moments_shear():
  assert captions.slant(bar(3))[0] == pytest.approx(0.0, abs=1e-9)
  for shear in (-0.4, 0.25, 0.5):
    expected = np.degrees(np.arctan(shear))
    assert captions.slant(bar(3, shear=shear))[0] == pytest.approx(expected, abs=2.0)


def test_captions_name_the_label_and_the_measured_terciles_and_parse_back():
  images = np.concatenate([bar(1), bar(3), bar(5), bar(3, shear=0.5), bar(1, shear=-0.3)])
  bins = captions.CaptionBins(thickness_edges=(1.5, 3.0), slant_edges=(-5.0, 15.0))
  assert captions.captions(images, np.array([7, 2, 0, 4, 1]), bins) == [
    "a thin seven",  # 0.95 pixels, 0 degrees
    "a two",  # 2.6 pixels
    "a thick zero",  # 4 pixels
    "a slanted four",  # 1.8 pixels, 27 degrees
    "a thin upright one",  # leaning left counts as upright
  ]
  assert captions.parse("a thick slanted seven") == (7, 2, 2)
  assert captions.parse("A seven") == (7, 1, 1)
  with pytest.raises(ConfigError, match=r"prompt 'a purple seven' has words outside"):
    captions.parse("a purple seven")
  with pytest.raises(ConfigError, match=r"prompt 'seven' is not a digit caption"):
    captions.parse("seven")


def test_the_tokenizer_refuses_unknown_words_and_long_prompts_by_name():
  tokenizer = Tokenizer.from_captions(CAPTIONS, max_tokens=6)
  ids, mask = tokenizer.encode(["a seven", ""])
  assert ids.shape == (2, 6) and ids[1].tolist() == [1, 0, 0, 0, 0, 0]
  assert mask.tolist() == [[True] * 3 + [False] * 3, [True] + [False] * 5]
  assert ids[0, 1] == 2 + tokenizer.words.index("a")
  with pytest.raises(ConfigError, match=r"prompt 'a purple seven': unknown word\(s\) \['purple'\]"):
    tokenizer.encode(["a purple seven"])
  with pytest.raises(ConfigError, match=r"has 6 words; at most 5 fit"):
    tokenizer.encode(["a thick thick thick thick seven"])


def randomised(module, seed=1):
  """The module with every parameter redrawn (zero-initialised output layers included), so a
  test sees what a trained one computes."""
  state = nnx.state(module, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  fresh = [0.3 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
  nnx.update(module, jax.tree.unflatten(tree, fresh))
  return module


def test_cross_attention_ignores_padded_tokens_and_reads_the_others():
  block = randomised(CrossAttentionBlock(16, 8, 2, 4, jnp.float32, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(2), (2, 4, 4, 16))
  context = jax.random.normal(jax.random.key(3), (2, 5, 8))
  mask = jnp.array([[True, True, False, False, False], [True, False, False, False, False]])
  out = block(x, context, mask)
  garbage = context.at[:, 2:].set(1e3)
  np.testing.assert_array_equal(block(x, garbage, mask), out)
  assert not np.allclose(block(x, context.at[:, 0].set(1.0), mask), out)


def test_a_fresh_cross_attention_block_is_the_identity():
  block = CrossAttentionBlock(16, 8, 2, 4, jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, 4, 4, 16))
  context, mask = jnp.ones((1, 3, 8)), jnp.array([[True, True, False]])
  np.testing.assert_array_equal(block(x, context, mask), x)


def test_the_text_encoder_and_the_unet_ignore_what_lies_under_the_padding():
  tokenizer = Tokenizer.from_captions(CAPTIONS, max_tokens=6)
  encoder = randomised(
    TextEncoder(TextEncoderConfig(tokenizer.vocabulary_size, 6, 16, 1, 2), rngs=nnx.Rngs(0))
  )
  ids, mask = (jnp.asarray(a) for a in tokenizer.encode(["a thick slanted seven", "a two"]))
  features = encoder(ids, mask)
  other = encoder(ids.at[:, 5].set(3), mask)  # a word id under every prompt's padding
  np.testing.assert_allclose(other[mask], features[mask], rtol=1e-6)
  unet = randomised(UNet(dataclasses.replace(TINY_UNET, context_dim=16), rngs=nnx.Rngs(0)))
  x, t = jax.random.normal(jax.random.key(4), (2, 8, 8, 1)), jnp.array([10, 500])
  out = unet(x, t, context=(features, mask))
  padded_garbage = jnp.where(mask[..., None], features, 50.0)
  np.testing.assert_allclose(unet(x, t, context=(padded_garbage, mask)), out, rtol=1e-5)
  empty_ids, empty_mask = (jnp.asarray(a) for a in tokenizer.encode(["", ""]))
  assert not np.allclose(unet(x, t, context=(encoder(empty_ids, empty_mask), empty_mask)), out)
  with pytest.raises(ValueError, match=r"required exactly when model.context_dim is set"):
    unet(x, t)


def test_guidance_with_the_empty_prompt_mixes_the_prompted_and_the_unconditional_model():
  """w = 0 is the network given the empty prompt (the unconditional model it is trained to be
  by prompt dropout), w = 1 the prompted one, and w = 3 their mix (Ho & Salimans 2022, eq. 6)
  from one doubled batch."""
  from jax_ddpm.diffusion import guidance
  from jax_ddpm.models.prompted_unet import PromptedUNet

  tokenizer = Tokenizer.from_captions(CAPTIONS, max_tokens=6)
  text = TextEncoderConfig(tokenizer.vocabulary_size, 6, 16, 1, 2)
  model = randomised(PromptedUNet(TINY_UNET, text, rngs=nnx.Rngs(0)))
  prompt = tuple(jnp.asarray(a) for a in tokenizer.encode(["a thick slanted seven", "a two"]))
  empty = tuple(jnp.asarray(a) for a in tokenizer.encode(["", ""]))
  x, t = jax.random.normal(jax.random.key(5), (2, 8, 8, 1)), jnp.array([100, 900])
  network = lambda x, t, p: model(x, t, p)
  conditional, unconditional = network(x, t, prompt), network(x, t, empty)
  assert not np.allclose(conditional, unconditional)
  at = lambda w: guidance.guide_condition(network, prompt, empty, w)(x, t)
  np.testing.assert_array_equal(at(0.0), unconditional)
  np.testing.assert_array_equal(at(1.0), conditional)
  mix = unconditional + 3.0 * (conditional - unconditional)
  np.testing.assert_allclose(at(3.0), mix, rtol=1e-4, atol=1e-5)
