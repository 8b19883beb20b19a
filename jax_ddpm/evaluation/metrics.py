"""Sample-quality statistics: Frechet distance, streaming feature moments, Inception Score, KID.

Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6;
Dowson & Landau 1982):
    d^2 = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2}).
FID is this distance in the pool3 features of the FID Inception (`models/inception.py`); the
same formula in another network's features is a "feature distance" (FD).

Tr (Sigma_1 Sigma_2)^{1/2} is computed in float64 from symmetric eigendecompositions:
Sigma_1 Sigma_2 is similar to A Sigma_2 A with A = Sigma_1^{1/2}, which is symmetric positive
semi-definite, so the trace is the sum of the square roots of its (clipped) eigenvalues. This
equals the TTUR / pytorch-fid value (scipy.linalg.sqrtm of the product) without its complex
round-off; as they do, a non-finite result is retried with eps * I added to both covariances.

Moments are accumulated batch by batch with Chan et al.'s pairwise update in float64, so 50k
samples never sit in memory; reference statistics travel as `.npz` with keys mu, sigma, count.
"""

from __future__ import annotations

import numpy as np

from jax_ddpm.io import errors
from jax_ddpm.io import paths as files

SQRT_EPS = 1e-6  # the offset TTUR and pytorch-fid add to singular covariances


class RunningMoments:
  """Mean and covariance of feature batches, merged in float64 (Chan, Golub & LeVeque 1979)."""

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self.mean = np.zeros(dim, np.float64)
    self.scatter = np.zeros((dim, dim), np.float64)  # sum of (x - mean)(x - mean)^T

  def update(self, features) -> None:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"Expected features of shape [n, {self.dim}], got {x.shape}.")
    n = len(x)
    if n == 0:
      return
    batch_mean = x.mean(axis=0)
    centred = x - batch_mean
    delta = batch_mean - self.mean
    total = self.count + n
    self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
    self.mean += delta * (n / total)
    self.count = total

  def statistics(self) -> FeatureStatistics:
    if self.count < 2:
      raise ValueError(f"A covariance needs at least 2 samples; got {self.count}.")
    return FeatureStatistics(self.mean.copy(), self.scatter / (self.count - 1), self.count)


class FeatureStatistics:
  """mu [d], sigma [d, d] and the number of samples they were estimated from."""

  def __init__(self, mu: np.ndarray, sigma: np.ndarray, count: int):
    self.mu = np.asarray(mu, np.float64)
    self.sigma = np.asarray(sigma, np.float64)
    self.count = int(count)
    if self.mu.ndim != 1 or self.sigma.shape != (len(self.mu), len(self.mu)):
      raise ValueError(
        f"Statistics with mu of shape {self.mu.shape} and sigma of shape "
        f"{self.sigma.shape}: expected [d] and [d, d]."
      )

  @property
  def dim(self) -> int:
    return len(self.mu)

  def save(self, path: str) -> None:
    files.save_npz(path, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))

  @classmethod
  def load(cls, path: str, what: str = "reference statistics") -> FeatureStatistics:
    """Reads an `.npz` of mu [d] and sigma [d, d] (and count, when we wrote it); never unpickles."""
    data = files.read_npz(path, what)
    missing = [key for key in ("mu", "sigma") if key not in data]
    if missing:
      raise errors.InputFileError(
        f"{what}={path!r} has no {missing} arrays; reference statistics "
        f"need 'mu' and 'sigma' (it has {sorted(data)})."
      )
    mu, sigma = data["mu"], data["sigma"]
    if (
      mu.ndim != 1
      or sigma.shape != (len(mu), len(mu))
      or not np.issubdtype(mu.dtype, np.floating)
      or not np.issubdtype(sigma.dtype, np.floating)
    ):
      raise errors.InputFileError(
        f"{what}={path!r}: expected float mu [d] and sigma [d, d], got "
        f"{mu.dtype} {mu.shape} and {sigma.dtype} {sigma.shape}."
      )
    count = int(data["count"]) if "count" in data else 0
    return cls(mu, sigma, count)


def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues >= 0)."""
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma_1: np.ndarray, sigma_2: np.ndarray) -> float:
  """Tr (Sigma_1 Sigma_2)^{1/2} for symmetric PSD Sigma_1, Sigma_2."""
  a = sqrt_psd(sigma_1)
  eigenvalues = np.linalg.eigvalsh(a @ sigma_2 @ a)
  return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(first: FeatureStatistics, second: FeatureStatistics) -> float:
  """Squared Frechet distance of N(mu_1, Sigma_1) and N(mu_2, Sigma_2) (Heusel et al., eq. 6)."""
  if first.dim != second.dim:
    raise ValueError(
      f"Cannot compare statistics of {first.dim}-d features with {second.dim}-d "
      "ones: they come from different feature networks or layers."
    )
  diff = first.mu - second.mu
  trace = trace_sqrt_product(first.sigma, second.sigma)
  if not np.isfinite(trace):
    offset = SQRT_EPS * np.eye(first.dim)
    trace = trace_sqrt_product(first.sigma + offset, second.sigma + offset)
  return float(diff @ diff + np.trace(first.sigma) + np.trace(second.sigma) - 2 * trace)


def check_full_rank_possible(count: int, dim: int, what: str) -> None:
  """Fails when `count` samples cannot give a full-rank dim x dim covariance."""
  if count <= dim:
    raise ValueError(
      f"{what}: {count} samples give a covariance of rank at most {count - 1}, but the features "
      f"are {dim}-dimensional; the Frechet distance needs more than {dim} samples (FID is "
      "reported on 50,000 and is biased upwards for small sets)."
    )


def inception_score(probabilities: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016): mean, std over splits."""
  p = np.asarray(probabilities, np.float64)
  if p.ndim != 2 or len(p) < splits:
    raise ValueError(f"Need class probabilities [n >= {splits}, classes]; got {p.shape}.")
  scores = []
  for part in np.array_split(p, splits):
    marginal = part.mean(axis=0, keepdims=True)
    kl = np.sum(
      part * (np.log(np.clip(part, 1e-12, None)) - np.log(np.clip(marginal, 1e-12, None))), axis=1
    )
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(
  real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
  """KID (Binkowski et al. 2018, Sec. 3): the unbiased estimate of the squared MMD with the
  cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over `num_subsets` random subsets
  of `subset_size` points of each set (drawn without replacement within a subset, as
  torch-fidelity and the paper's code do); returns (mean, std) over the subsets.

  Unbiased MMD^2 of m points each (the paper's eq. 2 estimator):
    1/(m(m-1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m^2 sum_{i, j} k(x_i, y_j).
  """
  x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"KID needs two [n, d] feature sets of one d; got {x.shape} and {y.shape}.")
  m = min(subset_size, len(x), len(y))
  if m < 2:
    raise ValueError(f"KID needs at least 2 points in each set; got {len(x)} and {len(y)}.")
  d = x.shape[1]
  rng = np.random.default_rng(seed)
  estimates = []
  for _ in range(num_subsets):
    a = x[rng.choice(len(x), m, replace=False)]
    b = y[rng.choice(len(y), m, replace=False)]
    k_aa, k_bb, k_ab = ((p @ q.T / d + 1) ** 3 for p, q in ((a, a), (b, b), (a, b)))
    within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    estimates.append(within - 2 * k_ab.mean())
  return float(np.mean(estimates)), float(np.std(estimates))
