"""One measurement of the PyTorch peer per process: diffusers' `UNet2DModel` of the same network.

The network comes from `convert.diffusers_config_from_unet` of the same run config, so the
layer list and parameter count are ours (checked below). The train step does what ours does:
t ~ U{0..T-1}, eps ~ N(0, I), x_t (DDPM eq. 4), MSE to eps (eq. 14), backward, gradient
clipping where the config clips, Adam, EMA. Sampling uses diffusers' own DDIM and DDPM
schedulers, as a diffusers user would. PyTorch runs on all cores (torch.set_num_threads).

  python -m benchmarks.torch_peer '{"kind": "train", "model": "small", "batch": 32}'
"""

import json
import os
import sys
import time

import numpy as np
import torch

from benchmarks import common
from jax_ddpm.models import diffusers_weights as convert


def peer_model(spec: dict):
  import diffusers

  config = common.model_config(spec["model"])
  torch.manual_seed(0)
  unet_config = common.build(config).unet
  model = diffusers.UNet2DModel(**convert.diffusers_config_from_unet(unet_config))
  return config, model


def param_count(model) -> int:
  return int(sum(p.numel() for p in model.parameters()))


def measure_train(spec: dict) -> dict:
  config, model = peer_model(spec)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  optim = config.optim
  optimizer = torch.optim.Adam(
    params, lr=optim.learning_rate, betas=(optim.adam_b1, optim.adam_b2), eps=optim.adam_eps
  )
  ema = [p.detach().clone() for p in params]
  alphas_cumprod = torch.from_numpy(  # a writable copy: the schedule's arrays are read-only
    np.array(common.build(config).schedule.alphas_cumprod, np.float32)
  )
  size, channels = config.data.image_size, config.data.channels
  generator = torch.Generator().manual_seed(0)
  x0 = torch.rand(spec["batch"], channels, size, size, generator=generator) * 2 - 1

  def step():
    t = torch.randint(0, len(alphas_cumprod), (spec["batch"],))
    eps = torch.randn_like(x0)
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    loss = torch.nn.functional.mse_loss(model(x_t, t).sample, eps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if optim.grad_clip_norm:
      torch.nn.utils.clip_grad_norm_(params, optim.grad_clip_norm)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - optim.ema_decay)
    return float(loss.detach())

  started = time.perf_counter()
  step()  # the first step allocates Adam's moments and warms oneDNN's kernel caches
  first_s = time.perf_counter() - started
  median, low, high = common.time_call(step, spec["repeats"], warmup=1)
  return {
    "seconds": [median, low, high],
    "first_call_s": first_s,
    "params": param_count(model),
    "peak_rss_mb": common.peak_rss_mb(),
  }


def measure_sample(spec: dict) -> dict:
  import diffusers

  config, model = peer_model(spec)
  model.eval()
  d = config.diffusion
  scheduler_class = (
    diffusers.DDPMScheduler if spec["sampler"] == "ddpm" else diffusers.DDIMScheduler
  )
  scheduler = scheduler_class(
    num_train_timesteps=d.num_timesteps,
    beta_start=d.beta_start,
    beta_end=d.beta_end,
    beta_schedule=d.schedule,
    clip_sample=True,
  )
  scheduler.set_timesteps(spec["steps"])
  size, channels = config.data.image_size, config.data.channels
  calls = iter(range(10**6))

  @torch.inference_mode()
  def sample():
    generator = torch.Generator().manual_seed(next(calls))
    x = torch.randn(spec["batch"], channels, size, size, generator=generator)
    for t in scheduler.timesteps:
      x = scheduler.step(model(x, t).sample, t, x, generator=generator).prev_sample
    return x

  repeats = 1 if spec["sampler"] == "ddpm" else spec["repeats"]
  median, low, high = common.time_call(sample, repeats, warmup=0 if repeats == 1 else 1)
  return {
    "seconds": [median, low, high],
    "params": param_count(model),
    "peak_rss_mb": common.peak_rss_mb(),
  }


def measure_ceiling(spec: dict) -> dict:
  n = spec.get("n", 2048)
  a, b = torch.randn(n, n), torch.randn(n, n)
  median, low, high = common.time_call(lambda: torch.mm(a, b), spec["repeats"], warmup=1)
  return {"flops": 2.0 * n**3, "seconds": [median, low, high]}


MEASURE = {"train": measure_train, "sample": measure_sample, "ceiling": measure_ceiling}


def measure(spec: dict) -> dict:
  """The result of one measurement: spec["kind"] is train, sample or ceiling."""
  spec = {"repeats": 5, **spec}
  torch.set_num_threads(int(spec.get("threads", os.cpu_count())))
  result = MEASURE[spec["kind"]](spec)
  result["threads"] = torch.get_num_threads()
  result["torch"] = torch.__version__
  return result


def main():
  print(json.dumps(measure(json.loads(sys.argv[1]))))


if __name__ == "__main__":
  main()
