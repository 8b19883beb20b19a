"""CIFAR-10 with Improved DDPM's training recipe (Nichol & Dhariwal 2021) on the DDPM network.

From their CIFAR-10 setting (Sec. 3-4 and their released flags): learned variances with the
hybrid loss (L_simple + 0.001 L_vlb, eq. 16), the cosine schedule (eq. 17) with T = 4000,
3 residual blocks per resolution, attention at 16x16 and 8x8 with 4 heads, dropout 0.3, Adam at
1e-4, batch 128, EMA 0.9999. The network stays the DDPM paper's U-Net (our models/unet.py):
their scale-shift GroupNorm conditioning is not implemented, so this is their recipe on Ho et
al.'s architecture, not a reproduction of their Table 2 numbers. Samples come from their
strided ancestral sampler: DDIM's update with eta = 1 and the learned variance over 100 of the
4000 steps (their Sec. 4 shows learned sigmas keep FID with 50-100 steps).

configs/cifar10.py keeps the DDPM paper's recipe.
"""

from jax_ddpm.config import shipped


def get_config():
  config = shipped.load("cifar10")
  config.diffusion.schedule = "cosine"
  config.diffusion.num_timesteps = 4000

  config.model.learn_sigma = True
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.attention_head_dim = 64  # 4 heads at the 256-channel attention levels
  config.model.dropout = 0.3
  config.training.vlb_weight = 0.001

  config.optim.learning_rate = 1e-4

  config.sampling.sampler = "ddim"
  config.sampling.num_steps = 100
  config.sampling.eta = 1.0
  config.sampling.variance = "learned"
  return config
