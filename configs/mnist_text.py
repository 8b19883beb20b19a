"""Text-to-image latent diffusion at digit scale: prompts such as "a thick slanted seven".

Two stages on the offline digits. Stage 1, --mode=train_autoencoder into runs/mnist_autoencoder:
a KL autoencoder (f = 2: 28x28x1 -> 14x14x2, 600 steps). Stage 2, --mode=train: a U-Net on its
scaled latents that cross-attends to a small transformer's encoding of each digit's caption,
its label and its measured thickness and slant (data/captions.py), the prompt dropped to the
empty one 10% of the time so that guidance has its unconditional model (Rombach et al. 2022,
Sec. 3-4). Samples are drawn with DDIM in 20 steps at guidance scale 3 and decoded.
"""

from jax_ddpm.config import shipped


def get_config():
  config = shipped.load("mnist")

  config.autoencoder.checkpoint = "runs/mnist_autoencoder"
  config.autoencoder.ch = 32
  config.autoencoder.ch_mult = (1, 2)  # f = 2
  config.autoencoder.z_channels = 2
  config.autoencoder.num_train_steps = 600
  config.autoencoder.batch_size = 64

  # The U-Net on 14x14 latents: 14 -> 7, attention (and cross-attention) at 7 and in the middle.
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (7,)
  config.model.prompts = True
  config.model.text_width = 64
  config.model.text_depth = 2
  config.model.text_heads = 4
  config.model.max_tokens = 6

  config.training.label_dropout = 0.1  # the prompt dropped to the empty prompt
  config.training.num_train_steps = 4000
  config.training.batch_size = 64
  config.training.max_timestep = None
  config.optim.lr_decay = "constant"
  # Sample quality while training, on decoded samples of the ten plain prompts, in the digit
  # classifier's features (configs/mnist.py's measurement).
  config.training.eval_every_steps = 1000

  config.sampling.sampler = "ddim"
  config.sampling.num_steps = 20
  config.sampling.spacing = "uniform"
  config.sampling.guidance_scale = 3.0
  config.sampling.thresholding = "none"  # latents are not bounded by [-1, 1]; decoded images are
  config.sampling.num_samples = 80
  config.sampling.batch_size = 80  # a multiple of the ten default prompts and of 8 devices
  return config
