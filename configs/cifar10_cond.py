"""configs/cifar10.py made class-conditional on CIFAR-10's 10 labels, for classifier-free guidance.

The DDPM paper's network and training, plus a class embedding added to the timestep embedding
(model.num_classes = 10, one more row for the null label) and label dropout 0.1 (Ho & Salimans
2022 trained with 0.1-0.2). Sampled with DPM-Solver++(2M) in 20 steps and guidance w = 2 (our
w: 1 is the plain conditional model); labels "grid" give one row per class in each grid.
"""

from jax_ddpm.config import shipped


def get_config():
  return shipped.module("default").make_conditional(
    shipped.load("cifar10"), grid_images_per_class=10
  )
