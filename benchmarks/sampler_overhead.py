"""How much the sampling loop costs beyond the network it calls.

For each sampler: seconds per reverse step with a trivial denoiser (the loop alone) and with a
small U-Net, against one jitted forward pass of that U-Net. Overhead = (sampler step - forward)
/ forward. Also: compile time at 10 and 1000 steps. Prints a Markdown table.

  python benchmarks/sampler_overhead.py [--batch 64] [--repeats 5]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import common
from jax_ddpm.diffusion import schedules
from jax_ddpm.models import unet
from jax_ddpm.samplers import base
from jax_ddpm.samplers.ddim import DDIM
from jax_ddpm.samplers.ddpm import DDPM

SMALL_UNET = unet.UNetConfig(
  image_size=28,
  in_channels=1,
  out_channels=1,
  ch=32,
  ch_mult=(1, 2, 2),
  num_res_blocks=1,
  attn_resolutions=(7,),
  dropout=0.0,
  num_groups=8,
)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  schedule = schedules.get_schedule("linear", 1000)
  model = unet.UNet(SMALL_UNET, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, params = nnx.split(model)
  shape = (args.batch, 28, 28, 1)
  x = jax.random.normal(jax.random.key(0), shape)
  t = jnp.full((args.batch,), 500, jnp.int32)

  forward = jax.jit(lambda p, x, t: nnx.merge(graphdef, p)(x, t))
  forward_s, _, _ = common.time_call(
    lambda: forward(params, x, t).block_until_ready(), args.repeats
  )

  def trivial(x_t, t):
    return 0.1 * x_t

  rows = []
  for name in ("ddpm", "ddim"):
    num_steps = 1000 if name == "ddpm" else args.steps

    def run(p, rng, denoise_kind, name=name):
      if denoise_kind == "trivial":
        denoise = trivial
      else:
        model_ = nnx.merge(graphdef, p)
        denoise = lambda x_t, t: model_(x_t, t)  # noqa: E731
      if name == "ddpm":
        return base.run(DDPM(), denoise, schedule, shape, rng)
      return base.run(DDIM(num_steps=args.steps), denoise, schedule, shape, rng)

    for kind in ("trivial", "unet"):
      fn = jax.jit(lambda p, rng, kind=kind: run(p, rng, kind))
      started = time.perf_counter()
      fn(params, jax.random.key(1)).block_until_ready()
      compile_s = time.perf_counter() - started
      repeats = max(1, args.repeats // (5 if name == "ddpm" and kind == "unet" else 1))
      median, low, high = common.time_call(
        lambda: fn(params, jax.random.key(2)).block_until_ready(), repeats, warmup=0
      )
      per_step = median / num_steps
      overhead = "" if kind == "trivial" else f"{100 * (per_step - forward_s) / forward_s:+.1f}%"
      rows.append(
        [
          name,
          num_steps,
          kind,
          f"{1e3 * per_step:.3f}",
          f"{1e3 * low / num_steps:.3f}-{1e3 * high / num_steps:.3f}",
          overhead,
          f"{compile_s:.1f}",
        ]
      )
  print(f"Machine: {common.machine_description()}")
  print(
    f"U-Net: {unet.count_params(model):,} params, batch {args.batch}; one jitted forward "
    f"pass: {1e3 * forward_s:.2f} ms (median of {args.repeats})\n"
  )
  common.print_table(
    [
      "sampler",
      "steps",
      "denoiser",
      "ms/step (median)",
      "min-max",
      "overhead vs forward",
      "first call incl. compile (s)",
    ],
    rows,
  )


if __name__ == "__main__":
  main()
