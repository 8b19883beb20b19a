"""Fidelity and diversity from nearest neighbours in feature space: precision, recall, density,
coverage.

Each set's manifold is estimated as the union of balls around its points, the radius of point
x being the distance to its k-th nearest neighbour in the same set (NN_k(x), x itself excluded):
  precision  fraction of generated points inside the real manifold
             (Kynkaanniemi et al. 2019, eq. 1-3, k = 3)
  recall     fraction of real points inside the generated manifold (same paper, k = 3)
  density    (1 / kM) sum_j sum_i 1[f_j in B(r_i, NN_k(r_i))]: how many real balls hold each
             generated point, on average, over k (Naeem et al. 2020, eq. 3, k = 5)
  coverage   fraction of real points whose ball holds at least one generated point (Naeem et
             al. 2020, eq. 4, k = 5)
with N real points r_i and M generated points f_j.

Squared distances are computed in JAX, one block of query points at a time against the whole
other set, the block sharded over the device mesh; so a 50k x 50k comparison needs one
block x 50k slice per step, never the whole matrix.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jax_ddpm.runtime import mesh as parallel

BLOCK = 1024  # query points per compiled call (a multiple of any power-of-two mesh up to 1024)


class ManifoldScores(NamedTuple):
  precision: float
  recall: float
  density: float
  coverage: float


def _squared_distances(queries: jax.Array, points: jax.Array) -> jax.Array:
  """[b, n] ||q - x||^2 = |q|^2 - 2 q.x + |x|^2, clipped at 0 against round-off."""
  cross = jnp.matmul(queries, points.T, precision=jax.lax.Precision.HIGHEST)
  squared = jnp.sum(queries**2, 1)[:, None] - 2 * cross + jnp.sum(points**2, 1)[None, :]
  return jnp.maximum(squared, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour(queries, points, k):
  """Squared distance from each query (a member of `points`) to its k-th nearest other point."""
  nearest = -jax.lax.top_k(-_squared_distances(queries, points), k + 1)[0]
  return nearest[:, k]  # entry 0 is the query itself, at distance 0


@jax.jit
def _balls_holding(queries, points, radii):
  """For each query: how many balls B(points_i, radii[r, i]) hold it, for each radius set r
  ([b, R]), and its squared distance to the nearest point ([b]); one distance matrix for both."""
  squared = _squared_distances(queries, points)
  inside = jnp.sum(squared[:, None, :] <= radii[None], axis=2)
  return inside, jnp.min(squared, axis=1)


def _global(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array every process holds whole, as one global array laid out by `sharding`."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _blocked(fn, queries: np.ndarray, mesh: jax.sharding.Mesh, *others, **static):
  """fn(block, *others) over blocks of `queries` (padded, sharded over the mesh), concatenated
  and whole on every process."""
  sharding = parallel.batch_sharding(mesh)
  others = [_global(np.asarray(o, np.float32), parallel.replicated(mesh)) for o in others]
  outputs = []
  for start in range(0, len(queries), BLOCK):
    block = np.asarray(queries[start : start + BLOCK], np.float32)
    count = len(block)
    block = np.concatenate([block, np.zeros((BLOCK - count, block.shape[1]), np.float32)])
    result = multihost_utils.process_allgather(
      fn(_global(block, sharding), *others, **static), tiled=True
    )
    outputs.append(jax.tree.map(lambda x, n=count: np.asarray(x)[:n], result))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def kth_neighbour_radii(features: np.ndarray, k: int, mesh: jax.sharding.Mesh) -> np.ndarray:
  """Squared NN_k radius of every point of `features` within its own set."""
  if not 1 <= k < len(features):
    raise ValueError(f"k = {k} nearest neighbours need more than k points; got {len(features)}.")
  return _blocked(_kth_neighbour, features, mesh, features, k=k)


def manifold_scores(
  real: np.ndarray, fake: np.ndarray, mesh: jax.sharding.Mesh, k_pr: int = 3, k_dc: int = 5
) -> ManifoldScores:
  """Precision and recall (k = k_pr) and density and coverage (k = k_dc) of `fake` against
  `real` features, both [n, d]."""
  real_pr, fake_pr = (kth_neighbour_radii(x, k_pr, mesh) for x in (real, fake))
  real_dc = real_pr if k_dc == k_pr else kth_neighbour_radii(real, k_dc, mesh)
  in_real, _ = _blocked(_balls_holding, fake, mesh, real, np.stack([real_pr, real_dc]))
  in_fake, nearest_fake = _blocked(_balls_holding, real, mesh, fake, fake_pr[None])
  return ManifoldScores(
    precision=float(np.mean(in_real[:, 0] > 0)),
    recall=float(np.mean(in_fake[:, 0] > 0)),
    density=float(np.sum(in_real[:, 1]) / (k_dc * len(fake))),
    coverage=float(np.mean(nearest_fake < real_dc)),
  )
