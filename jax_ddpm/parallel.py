"""The device mesh and shardings: one 'data' axis over every device of every process.

Data parallelism is `jax.jit` over this mesh: arrays sharded along the batch axis with
NamedSharding, parameters replicated, and XLA inserts the gradient all-reduce. This is the
same program on one CPU, one GPU or a TPU pod slice; `jax.pmap` is in maintenance mode.
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Shards the batch axis, which follows `leading_axes` unsharded axes (e.g. a steps axis)."""
  return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
