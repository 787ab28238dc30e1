"""Sample-quality metrics over feature arrays: FID, sFID, Inception Score, improved precision/recall.

Statistics are NumPy/SciPy in float64 (the network forward pass is the expensive part and lives in
`tcaq_jax.eval.fid`); the k-NN distances of precision/recall run batched in JAX (float32) so they use the
accelerator. Feature sets are `[N, D]` arrays.

  mu, sigma = feature_stats(feats)                  # [D], [D, D]
  d = frechet_distance(mu1, sigma1, mu2, sigma2)    # or fid(f1, f2), sfid(s1, s2) on raw features
  acc = StatsAccumulator(); acc.update(batch); mu, sigma = acc.stats()   # streaming, float64 sums
  is_mean, is_std = inception_score(logits, splits=10)
  precision, recall = precision_recall(real_feats, fake_feats, k=3)

Small samples (the rule every caller follows; issue 13):
- fewer than 2 samples: refused (MetricError); the covariance is undefined.
- N <= D samples of D-d features: the sample covariance is singular (rank <= N - 1 < D) and the Frechet
  distance is biased (low, mostly); the value is still computed but `sample_size_warning` says so (`fid` / `sfid`
  warn with SmallSampleWarning, `tcaq_jax.eval.fid` puts the line in the report's 'warnings' and on stderr).
  Papers use 50,000 samples for 2048-d Inception features.
- a Frechet distance is >= 0 in exact arithmetic (also with the eps * I regularisation, which `frechet_distance`
  applies to the traces as well as inside the root); a negative result down to -NEG_TOL * (tr sigma1 + tr
  sigma2) is rounding (sqrtm of a near-singular product) and is returned as 0.0; a more negative one raises
  MetricError (the covariances are not positive semi-definite). Non-finite inputs raise MetricError.
- Inception Score needs at least 2 samples per split (1 per split gives exactly 1.0 by construction).
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

__all__ = ['MetricError', 'SmallSampleWarning', 'NEG_TOL', 'sample_size_warning', 'frechet_distance',
           'feature_stats', 'StatsAccumulator', 'fid', 'sfid',
           'fid_from_features', 'inception_score', 'precision_recall', 'kth_nearest_radii']


NEG_TOL = 1e-5   # negative Frechet distances down to -NEG_TOL * (tr sigma1 + tr sigma2) are rounding -> 0.0


class MetricError(ValueError):
  """Inputs to a metric have the wrong shape, too few samples, or give a numerically invalid result."""


class SmallSampleWarning(UserWarning):
  """A metric was computed from fewer samples than it needs to be comparable (see the module docstring)."""


def sample_size_warning(n: int, dim: int, what: str = 'FID') -> str | None:
  """One-line warning when n samples of dim-d features give a singular covariance (n <= dim), else None."""
  if n > dim:
    return None
  return (f'{what} from {n} samples of {dim}-d features is biased and not comparable: the covariance is '
          f'singular (rank <= {n - 1} < {dim}); use more than {dim} samples')


def _check_finite(name: str, a: np.ndarray) -> None:
  bad = int(a.size - np.count_nonzero(np.isfinite(a)))
  if bad:
    raise MetricError(f'{name} has {bad} non-finite value(s) (NaN/inf) of {a.size}')


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """features: [N, D] -> (mu [D], sigma [D, D]) in float64; sigma is the unbiased (N-1) covariance."""
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise MetricError(f'feature_stats expects [N, D] features, got shape {x.shape}')
  if x.shape[0] < 2:
    raise MetricError(f'feature_stats needs at least 2 samples, got {x.shape[0]}')
  return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, imag_tol: float = 1e-3) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (pytorch-fid's computation, float64).

  d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)). When the product is near-singular
  (scipy warns that it is singular, or the root is not finite) `eps * I` is added to both covariances and d is
  the distance between the regularised Gaussians N(mu, sigma + eps I): the traces include the offset too.
  pytorch-fid adds it inside the root only and so reports 2 D eps less in that case (0.004096 at D = 2048: it
  made 10 samples against themselves score -0.004); the two agree whenever no offset is needed. Imaginary
  parts from numerical error are dropped when their diagonal is below `imag_tol`; larger ones raise
  MetricError. Non-finite inputs raise MetricError; a negative result within rounding (>= -NEG_TOL * (tr sigma1
  + tr sigma2)) is returned as 0.0, a more negative one raises MetricError.
  mu: [D]; sigma: [D, D].
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise MetricError(f'mean vectors have different shapes: {mu1.shape} vs {mu2.shape}')
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise MetricError(f'covariances {sigma1.shape}, {sigma2.shape} do not match means of shape {mu1.shape}')
  for name, a in (('mu1', mu1), ('sigma1', sigma1), ('mu2', mu2), ('sigma2', sigma2)):
    _check_finite(name, a)
  diff = mu1 - mu2
  covmean, singular = _sqrtm(sigma1.dot(sigma2))
  if singular or not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    sigma1, sigma2 = sigma1 + offset, sigma2 + offset
    covmean, _ = _sqrtm(sigma1.dot(sigma2))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=imag_tol):
      m = np.max(np.abs(covmean.imag))
      raise MetricError(f'sqrtm(sigma1 sigma2) has an imaginary component of magnitude {m:.3g}')
    covmean = covmean.real
  traces = np.trace(sigma1) + np.trace(sigma2)
  d = float(diff.dot(diff) + traces - 2 * np.trace(covmean))
  return _nonnegative(d, traces)


def _nonnegative(d: float, traces: float) -> float:
  """Applies the rounding rule of the module docstring to a Frechet distance."""
  if not np.isfinite(d):
    raise MetricError(f'the Frechet distance is not finite ({d})')
  if d >= 0:
    return d
  if d >= -NEG_TOL * abs(traces):
    return 0.0
  raise MetricError(f'the Frechet distance is negative ({d:.6g}) beyond rounding (tolerance '
                    f'{NEG_TOL * abs(traces):.3g}): are the covariances positive semi-definite?')


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
  """scipy.linalg.sqrtm -> (root, whether scipy reported the matrix singular)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', scipy.linalg.LinAlgWarning)
    root = scipy.linalg.sqrtm(a)
  return root, any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)


class StatsAccumulator:
  """Streaming mean/covariance of [N, D] features: float64 running sums, O(D^2) memory.

  Sums are taken around a shift (the first batch's mean) so the covariance does not lose precision when the
  mean is large compared with the spread.
  """

  def __init__(self):
    self.n = 0
    self._shift = None
    self._sum = None
    self._outer = None

  def update(self, features: np.ndarray) -> None:
    """features: [B, D]."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
      raise MetricError(f'StatsAccumulator.update expects [B, D], got shape {x.shape}')
    if x.shape[0] == 0:
      return
    if self._sum is None:
      self._shift = x.mean(axis=0)
      self._sum = np.zeros(x.shape[1])
      self._outer = np.zeros((x.shape[1], x.shape[1]))
    elif x.shape[1] != self._sum.shape[0]:
      raise MetricError(f'feature width changed from {self._sum.shape[0]} to {x.shape[1]}')
    xc = x - self._shift
    self.n += x.shape[0]
    self._sum += xc.sum(axis=0)
    self._outer += xc.T @ xc

  def stats(self) -> tuple[np.ndarray, np.ndarray]:
    """-> (mu [D], sigma [D, D]) with the unbiased covariance, as `feature_stats` on all features."""
    if self.n < 2:
      raise MetricError(f'StatsAccumulator needs at least 2 samples, has {self.n}')
    mean_c = self._sum / self.n
    sigma = (self._outer - self.n * np.outer(mean_c, mean_c)) / (self.n - 1)
    return self._shift + mean_c, sigma


def fid(feats1: np.ndarray, feats2: np.ndarray, what: str = 'FID') -> float:
  """FID between two pool3 feature sets [N, D], [M, D]; warns (SmallSampleWarning) when N or M <= D."""
  stats1, stats2 = feature_stats(feats1), feature_stats(feats2)
  for feats in (feats1, feats2):
    msg = sample_size_warning(np.shape(feats)[0], np.shape(feats)[1], what)
    if msg:
      warnings.warn(msg, SmallSampleWarning, stacklevel=2)
  return frechet_distance(*stats1, *stats2)


def sfid(spatial1: np.ndarray, spatial2: np.ndarray) -> float:
  """sFID: the Frechet distance of flattened spatial features [N, ...], [M, ...] (e.g. 17x17x7 maps)."""
  a, b = np.asarray(spatial1), np.asarray(spatial2)
  return fid(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), what='sFID')


fid_from_features = fid


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """Inception Score from classifier logits [N, C] (improved-gan's computation, float64).

  The N samples are cut into `splits` consecutive parts; each part gives exp(E_x KL(p(y|x) || p(y))) with p(y)
  the part's mean prediction. Returns (mean, std) over the parts. Every part needs at least 2 samples (a part
  of one sample scores exactly 1.0 whatever it is): splits must be in [1, N // 2]. A part of m samples scores at
  most m, so with N // splits < C the score is capped (`tcaq_jax.eval.fid` warns about it).
  """
  z = np.asarray(logits, dtype=np.float64)
  if z.ndim != 2:
    raise MetricError(f'inception_score expects [N, C] logits, got shape {z.shape}')
  if not 1 <= splits <= z.shape[0] // 2:
    raise MetricError(f'inception_score: splits={splits} must be in [1, N // 2 = {z.shape[0] // 2}] '
                      f'(at least 2 samples per split)')
  _check_finite('inception_score logits', z)
  z = z - z.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  n = z.shape[0]
  scores = []
  for i in range(splits):
    lo, hi = i * n // splits, (i + 1) * n // splits
    part_p, part_log_p = p[lo:hi], log_p[lo:hi]
    log_py = np.log(part_p.mean(axis=0, keepdims=True))
    kl = (part_p * (part_log_p - log_py)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
  """a: [M, D], b: [N, D] -> squared Euclidean distances [M, N] (float32, clamped at 0)."""
  hi = jax.lax.Precision.HIGHEST
  a2 = jnp.sum(a * a, axis=1)[:, None]
  b2 = jnp.sum(b * b, axis=1)[None, :]
  return jnp.maximum(a2 - 2.0 * jnp.dot(a, b.T, precision=hi) + b2, 0.0)


@functools.partial(jax.jit, static_argnames='k')
def _kth_sq_dist(rows: jax.Array, feats: jax.Array, k: int) -> jax.Array:
  # k-th smallest distance counting the point itself (distance 0) as the 0-th: the k-th nearest neighbour.
  neg_topk, _ = jax.lax.top_k(-_pairwise_sq_dists(rows, feats), k + 1)
  return -neg_topk[:, k]


@jax.jit
def _inside_any(rows: jax.Array, centres: jax.Array, sq_radii: jax.Array) -> jax.Array:
  return jnp.any(_pairwise_sq_dists(rows, centres) <= sq_radii[None, :], axis=1)


def _row_batches(x: np.ndarray, batch: int):
  """Yields (padded [batch, D] block, number of valid rows) so that every jitted call has one shape."""
  for lo in range(0, x.shape[0], batch):
    block = x[lo:lo + batch]
    n = block.shape[0]
    if n < batch:
      block = np.concatenate([block, np.zeros((batch - n, x.shape[1]), x.dtype)])
    yield block, n


def kth_nearest_radii(features: np.ndarray, k: int = 3, batch: int = 1024) -> np.ndarray:
  """features: [N, D] -> squared distance of each point to its k-th nearest other point, [N] (float32)."""
  x = np.asarray(features, np.float32)
  if x.ndim != 2 or x.shape[0] <= k:
    raise MetricError(f'kth_nearest_radii needs [N, D] features with N > k={k}, got shape {x.shape}')
  feats = jnp.asarray(x)
  out = [np.asarray(_kth_sq_dist(jnp.asarray(b), feats, k))[:n] for b, n in _row_batches(x, batch)]
  return np.concatenate(out)


def _coverage(queries: np.ndarray, centres: np.ndarray, sq_radii: np.ndarray, batch: int) -> float:
  c, r = jnp.asarray(centres), jnp.asarray(sq_radii)
  hits = [np.asarray(_inside_any(jnp.asarray(b), c, r))[:n] for b, n in _row_batches(queries, batch)]
  return float(np.concatenate(hits).mean())


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     batch: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019) of fake [M, D] against real [N, D] features.

  The real manifold is the union of balls around each real point with radius its k-th nearest-neighbour
  distance (within the real set); precision is the fraction of fake points inside it. Recall swaps the roles.
  Distances are computed in float32 on the default JAX device, `batch` query rows at a time.
  """
  real = np.asarray(real_features, np.float32)
  fake = np.asarray(fake_features, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise MetricError(f'precision_recall needs [N, D] and [M, D] features, got {real.shape} and {fake.shape}')
  precision = _coverage(fake, real, kth_nearest_radii(real, k, batch), batch)
  recall = _coverage(real, fake, kth_nearest_radii(fake, k, batch), batch)
  return precision, recall
