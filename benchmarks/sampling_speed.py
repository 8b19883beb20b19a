"""Sampling throughput (images/s) of DDPM and DDIM at several step counts, over the device mesh.

Uses the offline default's U-Net (configs/mnist.py) with random weights; the throughput does not
depend on the weights. Run with one CPU device per core, as main.py does:

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/sampling_speed.py
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

from benchmarks import common  # pylint: disable=g-import-not-at-top
from configs import mnist  # pylint: disable=g-import-not-at-top
from jax_ddpm import parallel, sampling, state  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--ddim_steps", default="10,50,100")
  args = parser.parse_args()

  config = mnist.get_config()
  mesh = parallel.data_mesh()
  _, eval_graphdef, train_state = state.create_train_state(config, mesh,
                                                           state.create_optimizer(config.optim))
  schedule = state.schedule_from_config(config)
  shape = (args.batch, 28, 28, 1)
  runs = [("ddim", int(s)) for s in args.ddim_steps.split(",")] + [("ddpm", 1000)]
  rows = []
  for sampler, steps in runs:
    fn = sampling.make_sample_fn(eval_graphdef, schedule, shape, mesh, sampler=sampler,
                                 num_steps=steps)
    started = time.perf_counter()
    fn(train_state.ema_params, jax.random.key(0)).block_until_ready()
    first_call = time.perf_counter() - started
    repeats = 1 if sampler == "ddpm" else args.repeats
    median, low, high = common.time_call(
        lambda: fn(train_state.ema_params, jax.random.key(1)).block_until_ready(), repeats,
        warmup=0)
    rows.append([sampler, steps, f"{args.batch / median:.1f}",
                 f"{args.batch / high:.1f}-{args.batch / low:.1f}",
                 f"{1e3 * median / steps:.2f}", f"{first_call - median:.1f}"])
  print(f"Machine: {common.machine_description()}; mesh of {mesh.size} device(s)")
  print(f"U-Net of configs/mnist.py, batch {args.batch}, median of {args.repeats} "
        "(DDPM-1000: 1 run)\n")
  common.print_table(["sampler", "steps", "images/s", "min-max", "ms/step", "compile (s)"], rows)


if __name__ == "__main__":
  main()
