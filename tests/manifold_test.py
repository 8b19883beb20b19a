"""Precision, recall, density, coverage and KID against brute-force float64 references."""

import numpy as np
import pytest

from jax_ddpm.evaluation import manifold, metrics
from jax_ddpm.runtime import mesh as parallel


def reference_scores(real, fake, k_pr=3, k_dc=5):
  """The four definitions (Kynkaenniemi et al. 2019; Naeem et al. 2020) on full distance
  matrices in float64."""

  def distances(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

  real_real, fake_fake, fake_real = (
    distances(real, real),
    distances(fake, fake),
    distances(fake, real),
  )
  radius_real = np.sort(real_real, 1)[:, k_pr]  # column 0 is the point itself
  radius_fake = np.sort(fake_fake, 1)[:, k_pr]
  radius_dc = np.sort(real_real, 1)[:, k_dc]
  return manifold.ManifoldScores(
    precision=np.mean((fake_real <= radius_real[None]).any(1)),
    recall=np.mean((radius_fake[None] >= fake_real.T).any(1)),
    density=(fake_real <= radius_dc[None]).sum() / (k_dc * len(fake)),
    coverage=np.mean(fake_real.min(0) < radius_dc),
  )


@pytest.fixture
def small_blocks(monkeypatch):
  monkeypatch.setattr(manifold, "BLOCK", 64)  # several blocks, the last one padded


def test_scores_match_the_brute_force_definitions(small_blocks):
  rng = np.random.default_rng(0)
  real = rng.normal(size=(300, 16))
  fake = rng.normal(size=(250, 16)) * 1.3 + 0.4
  ours = manifold.manifold_scores(real, fake, parallel.data_mesh())
  expected = reference_scores(real, fake)
  for name, value in expected._asdict().items():
    assert abs(getattr(ours, name) - value) <= 1 / 250, (name, getattr(ours, name), value)
  assert 0.05 < ours.precision < 0.95 and 0.05 < ours.coverage < 0.95  # a case that can fail


def test_identical_sets_score_one_and_far_apart_sets_zero(small_blocks):
  points = np.random.default_rng(1).normal(size=(200, 8))
  mesh = parallel.data_mesh()
  same = manifold.manifold_scores(points, points, mesh)
  assert same.precision == same.recall == same.coverage == 1.0
  far = manifold.manifold_scores(points, points + 100.0, mesh)
  assert far == manifold.ManifoldScores(0.0, 0.0, 0.0, 0.0)


def test_kid_is_the_unbiased_polynomial_mmd_and_near_zero_for_one_distribution():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(120, 6)), rng.normal(size=(120, 6)) + 0.5
  kernel = lambda a, b: (a @ b.T / 6 + 1) ** 3
  m = len(x)
  expected = (
    kernel(x, x).sum() - np.trace(kernel(x, x)) + kernel(y, y).sum() - np.trace(kernel(y, y))
  ) / (m * (m - 1)) - 2 * kernel(x, y).mean()
  # One subset of all points: a permutation, to which the estimate is invariant.
  mean, spread = metrics.kernel_inception_distance(x, y, num_subsets=1, subset_size=m)
  assert abs(mean - expected) < 1e-12 and spread == 0.0 and mean > 0.1
  same = rng.normal(size=(2000, 6))
  other = rng.normal(size=(2000, 6))
  mean, spread = metrics.kernel_inception_distance(same, other, num_subsets=50, subset_size=500)
  assert abs(mean) < 3 * spread / np.sqrt(50) + 1e-3, (mean, spread)
