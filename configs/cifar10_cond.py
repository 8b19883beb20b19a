"""configs/cifar10.py made class-conditional on CIFAR-10's 10 labels, for classifier-free guidance.

The DDPM paper's network and training, plus a class embedding added to the timestep embedding
(model.num_classes = 10, one more row for the null label) and label dropout 0.1 (Ho & Salimans
2022 trained with 0.1-0.2). Sampled with DPM-Solver++(2M) in 20 steps and guidance w = 2 (our
w: 1 is the plain conditional model); labels "grid" give one row per class in each grid.
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.training.num_sample_images = 100  # the training grids: 10 images of each class per row

  config.sampling.sampler = "dpmpp_2m"
  config.sampling.num_steps = 20
  config.sampling.spacing = "logsnr"
  config.sampling.labels = "grid"
  config.sampling.guidance_scale = 2.0
  return config
