"""Every config key with its default; the per-setup configs start here and override a few.

The keys, their types, defaults and checks are jax_ddpm/config/run_config.py's sections (data,
diffusion, model, optim, training, sampling, eval, debug), each documented there. Any key can be
overridden on the command line: --config.training.batch_size=64.
"""

import ml_collections

from jax_ddpm.config import run_config


def get_config():
  return run_config.default_config_dict()


def make_conditional(config: ml_collections.ConfigDict, grid_images_per_class: int):
  """`config` made class-conditional on its data's 10 labels, for classifier-free guidance:
  label dropout 0.1 (Ho & Salimans 2022 used 0.1-0.2), training grids with one row per class,
  and samples from DPM-Solver++(2M) in 20 logsnr steps with guidance w = 2 and "grid" labels."""
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.training.num_sample_images = 10 * grid_images_per_class
  config.sampling.sampler = "dpmpp_2m"
  config.sampling.num_steps = 20
  config.sampling.spacing = "logsnr"
  config.sampling.labels = "grid"
  config.sampling.guidance_scale = 2.0
  return config
