"""A seconds-long run on fake 16x16 data, for tests of the training machinery."""

from jax_ddpm.config import shipped


def get_config():
  config = shipped.load("default")
  config.data.source = "fake"
  config.data.image_size = 16
  config.data.channels = 1
  config.data.random_flip = True
  config.data.fake_size = 64

  config.diffusion.num_timesteps = 100
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.1
  config.model.num_groups = 8

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 2
  config.optim.ema_decay = 0.999

  config.training.batch_size = 8
  config.training.num_train_steps = 6
  config.training.log_every_steps = 2
  config.training.checkpoint_every_steps = 3
  config.training.keep_checkpoints = 5
  config.training.sample_every_steps = 6
  config.training.num_sample_images = 4

  config.training.sample_ddim_steps = 4
  config.sampling.num_steps = 4
  return config
