"""The DDPM paper's CIFAR-10 run (Ho et al. 2020, Sec. 4 and Appendix B): 35.7M params, 800k steps.

TFDS cifar10 must be prepared in data.data_dir beforehand (tfds build cifar10, or copy the
prepared directory); nothing is downloaded at run time.
"""

from jax_ddpm.config import shipped


def get_config():
  config = shipped.load("default")
  config.data.source = "tfds"
  config.data.tfds_name = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.random_flip = True

  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.num_groups = 32

  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip_norm = 1.0
  config.optim.ema_decay = 0.9999
  config.optim.ema_warmup = False  # the original code's plain EMA, from step 0

  config.training.batch_size = 128
  config.training.num_train_steps = 800_000
  config.training.checkpoint_every_steps = 5000
  config.training.sample_every_steps = 20_000

  config.sampling.sampler = "ddpm"
  config.sampling.variance = "fixed_large"  # what the original CIFAR-10 run sampled with

  # The DDPM paper's protocol: FID of 50,000 samples against the training set, and the
  # Inception Score of the same samples in 10 splits (Table 1: IS 9.46, FID 3.17).
  config.eval.feature_net = "inception"
  config.eval.num_samples = 50_000
  config.eval.inception_score = True
  config.eval.reference_split = "train"
  return config
