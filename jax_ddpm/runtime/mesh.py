"""The device mesh and shardings: one 'data' axis over every device of every process.

Data parallelism is `jax.jit` over this mesh: arrays sharded along the batch axis with
NamedSharding, parameters replicated, and XLA inserts the gradient all-reduce. This is the
same program on one CPU, one GPU or a TPU pod slice; `jax.pmap` is in maintenance mode. Loops
that launch mesh programs go through `DispatchLimit`, which keeps XLA's CPU client from
deadlocking when the host runs far ahead of the devices.
"""

import collections

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jax_ddpm.io.errors import ConfigError

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


def check_divisible(batch_size, key: str, count: int, what: str = "devices") -> None:
  """ConfigError unless the global batch `key` = batch_size splits evenly over `count` devices
  (or processes): each gets an equal share of every batch."""
  if not isinstance(batch_size, int) or batch_size <= 0 or batch_size % count:
    raise ConfigError(
      f"{key}={batch_size} must be a positive multiple of the number of {what}, "
      f"{count}: the global batch is split evenly over them."
    )


def shard_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array, the same on every process, as a global array sharded along its batch axis."""
  return jax.make_array_from_callback(array.shape, batch_sharding(mesh), lambda i: array[i])


def gather(array: jax.Array | None) -> np.ndarray | None:
  """A batch sharded over every process's devices, whole on each process (None stays None)."""
  if array is None:
    return None
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class DispatchLimit:
  """Keeps at most `limit` mesh programs queued ahead of the devices; loops dispatch through it.

  Why: XLA's CPU client runs every device's part of a multi-device launch on one thread pool of
  max(cores, devices) threads (one per device when main.py starts one device per core), and
  before each launch it waits, on a pool thread, for one of the device's 32 in-flight slots. A
  host that runs ~50 launches ahead (a loop that never reads a result) thus parks a pool thread
  in that wait while an earlier launch still needs every thread at once for its all-reduce: the
  collective never completes and XLA aborts after 40 s. Waiting on the host for the oldest
  result keeps the queue short, so no launch ever waits for a slot (and two in flight keep the
  devices busy).

  `add(result)` after each dispatch; `result` must stay valid (not a donated buffer): pass a
  small output such as the step's metrics.
  """

  def __init__(self, limit: int = 2):
    self._limit = limit
    self._pending = collections.deque()

  def add(self, result) -> None:
    self._pending.append(result)
    while len(self._pending) > self._limit:
      jax.block_until_ready(self._pending.popleft())
