"""The denoiser of text-to-image diffusion: a text encoder and a U-Net that cross-attends to its
token features (Rombach et al. 2022, Sec. 3.3, eq. 3: tau_theta(y) into every attention
resolution), trained together from scratch.

`model(x, t, prompt)` with prompt = (token ids [B, L], mask [B, L]) from `Tokenizer.encode`; the
empty prompt (the start token alone) is the unconditional input that classifier-free guidance
mixes in (diffusion/guidance.py, `guide_condition`).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jax_ddpm.models.text_encoder import TextEncoder, TextEncoderConfig
from jax_ddpm.models.unet import UNet, UNetConfig


@dataclasses.dataclass(frozen=True)
class PromptedUNetConfig:
  """The two networks of a text model."""

  unet: UNetConfig
  text: TextEncoderConfig

  def build(self, rngs: nnx.Rngs) -> PromptedUNet:
    return PromptedUNet(self.unet, self.text, rngs=rngs)


class PromptedUNet(nnx.Module):
  """eps_theta(x_t, t, tau_theta(y)): the U-Net with model.context_dim = the encoder's width."""

  def __init__(self, unet: UNetConfig, text: TextEncoderConfig, *, rngs: nnx.Rngs):
    self.text_encoder = TextEncoder(text, rngs=rngs)
    self.unet = UNet(dataclasses.replace(unet, context_dim=text.width), rngs=rngs)

  def __call__(self, x, t, prompt, *, rngs=None):
    ids, mask = prompt
    return self.unet(x, t, context=(self.text_encoder(ids, mask), mask), rngs=rngs)
