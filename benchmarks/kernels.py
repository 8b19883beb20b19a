"""The U-Net's two kernels on their own: a 3x3 convolution and single-head self-attention.

Times (ms, median of repeats) of one 3x3 convolution's forward pass, input gradient and weight
gradient in XLA, against PyTorch's forward and forward+backward of the same convolution; and of
attention written as two einsums (jax_ddpm's AttentionBlock) against jax.nn.dot_product_attention.
The shapes are the small and the CIFAR-10 U-Net's. benchmarks/NOTES.md quotes this table.

  XLA_FLAGS=--xla_force_host_platform_device_count=1 python benchmarks/kernels.py
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks import common

# (batch, height = width, channels): the small U-Net at batch 16 per device, the CIFAR-10 one at 8.
CONV_SHAPES = ((16, 28, 32), (16, 14, 64), (8, 32, 128), (8, 16, 256))
# (batch, positions, channels) of the attention blocks: 7x7 in the small U-Net, 16x16 in CIFAR-10's.
ATTENTION_SHAPES = ((16, 49, 64), (8, 256, 256))


def milliseconds(fn, repeats) -> str:
  return f"{1e3 * common.time_call(fn, repeats, warmup=2)[0]:.2f}"


def conv(x, w):
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def conv_rows(repeats, with_torch) -> list[list]:
  rows = []
  for batch, size, channels in CONV_SHAPES:
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    w = 0.01 * jax.random.normal(jax.random.key(1), (3, 3, channels, channels))
    forward = jax.jit(conv)
    input_grad = jax.jit(lambda x, w: jax.grad(lambda x: conv(x, w).sum())(x))
    weight_grad = jax.jit(lambda x, w: jax.grad(lambda w: conv(x, w).sum())(w))
    row = [f"{batch}x{size}x{size}x{channels}"] + [
      milliseconds(lambda f=f: f(x, w).block_until_ready(), repeats)
      for f in (forward, input_grad, weight_grad)
    ]
    row.append(f"{sum(float(ms) for ms in row[1:]):.2f}")
    if with_torch:
      row += torch_conv(batch, size, channels, repeats)
    rows.append(row)
  return rows


def torch_conv(batch, size, channels, repeats) -> list[str]:
  import torch

  torch.set_num_threads(os.cpu_count())
  x = torch.randn(batch, channels, size, size, requires_grad=True)
  w = 0.01 * torch.randn(channels, channels, 3, 3)
  w.requires_grad_()

  def forward():
    with torch.no_grad():
      torch.nn.functional.conv2d(x, w, padding=1)

  def forward_backward():
    torch.nn.functional.conv2d(x, w, padding=1).sum().backward()

  return [milliseconds(forward, repeats), milliseconds(forward_backward, repeats)]


def einsum_attention(q, k, v):
  """jax_ddpm's AttentionBlock core: softmax(q k^T / sqrt(d)) v with float32 logits."""
  logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhc->bqhc", weights, v)


def attention_rows(repeats) -> list[list]:
  rows = []
  for batch, positions, channels in ATTENTION_SHAPES:
    q, k, v = (
      jax.random.normal(jax.random.key(i), (batch, positions, 1, channels)) for i in range(3)
    )
    row = [f"{batch}x{positions}x{channels}"]
    for attention in (einsum_attention, jax.nn.dot_product_attention):
      forward = jax.jit(attention)
      both = jax.jit(
        jax.grad(lambda q, k, v, f=attention: (f(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
      )
      row += [
        milliseconds(lambda f=forward: f(q, k, v).block_until_ready(), repeats),
        milliseconds(lambda f=both: jax.block_until_ready(f(q, k, v)), repeats),
      ]
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--no_torch", action="store_true")
  args = parser.parse_args()
  print(f"Machine: {common.machine_description()}\n")
  header = ["batch x H x W x C", "XLA forward", "input grad", "weight grad", "XLA total"]
  if not args.no_torch:
    header += ["PyTorch forward", "PyTorch forward+backward"]
  print("3x3 convolution, ms")
  common.print_table(header, conv_rows(args.repeats, not args.no_torch))
  print("\nSelf-attention (one head), ms")
  common.print_table(
    [
      "batch x positions x C",
      "einsums forward",
      "einsums fwd+bwd",
      "dot_product_attention forward",
      "dot_product_attention fwd+bwd",
    ],
    attention_rows(args.repeats),
  )


if __name__ == "__main__":
  main()
