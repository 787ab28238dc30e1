"""FID / sFID / IS / precision-recall against float64 NumPy/SciPy computations written here; the streaming
feature pipeline (tcaq_jax.eval.fid) and the CIFAR-10 reader (tcaq_jax.eval.ref_stats).

The tensorflow-gan oracle is not used: tensorflow(-gan) is not installed in this environment.
"""
import os
import pickle

import numpy as np
import pytest
import scipy.special

from tcaq_jax.eval import fid as fid_lib
from tcaq_jax.eval import metrics, ref_stats


# ----------------------------------------------------------------------------------------- oracles (float64)

def _oracle_fid(x, y):
  """|mu_x - mu_y|^2 + tr Sx + tr Sy - 2 tr (Sx^1/2 Sy Sx^1/2)^1/2 with symmetric eigendecompositions."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mx, my = x.mean(0), y.mean(0)
  sx = (x - mx).T @ (x - mx) / (len(x) - 1)
  sy = (y - my).T @ (y - my) / (len(y) - 1)
  w, v = np.linalg.eigh(sx)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root @ sy @ root)
  return float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def _oracle_is(logits, splits):
  p = scipy.special.softmax(np.asarray(logits, np.float64), axis=1)
  scores = []
  n = len(p)
  for part in (p[i * n // splits:(i + 1) * n // splits] for i in range(splits)):   # improved-gan's split
    py = part.mean(0, keepdims=True)
    scores.append(np.exp(np.mean(np.sum(scipy.special.rel_entr(part, py), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


def _oracle_pr(real, fake, k):
  def d2(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)
  r_real = np.sort(d2(real, real), axis=1)[:, k]
  r_fake = np.sort(d2(fake, fake), axis=1)[:, k]
  precision = np.mean((d2(fake, real) <= r_real[None, :]).any(1))
  recall = np.mean((d2(real, fake) <= r_fake[None, :]).any(1))
  return precision, recall


def _rel(a, b):
  return abs(a - b) / abs(b)


# ----------------------------------------------------------------------------------------------------- tests

def _features(rng, n, d, shift=0.0, scale=1.0):
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return (rng.normal(size=(n, d)) @ mix) * scale + shift + 3.0


def test_fid_matches_float64_oracle():
  rng = np.random.default_rng(0)
  x, y = _features(rng, 600, 64), _features(rng, 500, 64, shift=0.2, scale=1.3)
  assert _rel(metrics.fid(x, y), _oracle_fid(x, y)) < 1e-6
  mu1, s1 = metrics.feature_stats(x)
  mu2, s2 = metrics.feature_stats(y)
  assert _rel(metrics.frechet_distance(mu1, s1, mu2, s2), _oracle_fid(x, y)) < 1e-6
  assert abs(metrics.fid(x, x)) < 1e-6 * np.trace(s1)


def test_sfid_matches_float64_oracle_on_spatial_maps():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(400, 5, 5, 3)) + 1.0
  b = rng.normal(size=(300, 5, 5, 3)) * 1.2
  assert _rel(metrics.sfid(a, b), _oracle_fid(a.reshape(400, -1), b.reshape(300, -1))) < 1e-6


def test_fid_rank_deficient_covariance_is_finite():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(20, 50)), rng.normal(size=(20, 50)) + 0.1   # N < D: singular covariances
  d = metrics.fid(x, y)
  assert np.isfinite(d) and d > 0
  assert _rel(d, _oracle_fid(x, y)) < 1e-3


def test_frechet_distance_rejects_large_imaginary_part_and_bad_shapes():
  with pytest.raises(metrics.MetricError, match='imaginary'):
    metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(metrics.MetricError, match='shapes'):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_streaming_accumulator_matches_full_statistics():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1003, 16)) * 0.01 + 1e4          # large mean, small spread
  acc = metrics.StatsAccumulator()
  for lo in range(0, len(x), 128):
    acc.update(x[lo:lo + 128])
  mu, sigma = acc.stats()
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-7, atol=1e-12)
  assert acc.n == 1003


def test_inception_score_matches_float64_oracle():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(1000, 1008)) * 3
  got = metrics.inception_score(logits, splits=10)
  want = _oracle_is(logits, 10)
  assert _rel(got[0], want[0]) < 1e-6 and _rel(got[1], want[1]) < 1e-6
  one_hot = np.full((100, 10), -1e4)
  one_hot[np.arange(100), np.arange(100) % 10] = 0
  assert abs(metrics.inception_score(one_hot, splits=1)[0] - 10.0) < 1e-6   # uniform over 10 sure classes


def test_precision_recall_self_and_shift():
  rng = np.random.default_rng(5)
  real = rng.normal(size=(300, 32)).astype(np.float32)
  assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)
  fake = (rng.normal(size=(300, 32)) + 4.0).astype(np.float32)   # disjoint
  p, r = metrics.precision_recall(real, fake, k=3)
  assert p < 0.05 and r < 0.05
  near = (rng.normal(size=(300, 32)) * 0.5 + 0.3).astype(np.float32)
  p2, r2 = metrics.precision_recall(real, near, k=3)
  assert p2 > p and r2 < 1.0


def test_precision_recall_matches_brute_force_oracle():
  rng = np.random.default_rng(6)
  real = rng.normal(size=(257, 8)).astype(np.float32)
  fake = (rng.normal(size=(190, 8)) * 1.3 + 0.4).astype(np.float32)
  got = metrics.precision_recall(real, fake, k=3, batch=64)    # several padded row batches
  want = _oracle_pr(real, fake, 3)
  np.testing.assert_allclose(got, want, atol=1.5 / 190)         # at most one borderline point differs


# --------------------------------------------------------------------------------- streaming pipeline (fid.py)

def _toy_feature_fn(images):
  """Deterministic features of uint8 images: per-channel means and a coarse 4x4 grey map."""
  x = np.asarray(images, np.float64) / 255.0
  b, h, w, _ = x.shape
  grey = x.mean(-1).reshape(b, 4, h // 4, 4, w // 4).mean((2, 4))
  pool3 = np.concatenate([x.mean((1, 2)), grey.reshape(b, -1), (x ** 2).mean((1, 2))], axis=1)
  return {'pool3': pool3, 'spatial': grey.reshape(b, -1), 'logits': pool3[:, :10] * 5}


def _write_npz(path, images, key='arr_0'):
  np.savez(path, **{key: images})
  return str(path)


def test_evaluate_streams_and_matches_direct_computation(tmp_path):
  rng = np.random.default_rng(7)
  a = rng.integers(0, 256, size=(53, 16, 16, 3), dtype=np.uint8)
  b = np.clip(rng.integers(0, 256, size=(41, 16, 16, 3)) * 0.8, 0, 255).astype(np.uint8)
  sa, sb = _write_npz(tmp_path / 's.npz', a), _write_npz(tmp_path / 'r.npz', b, key='images')
  report = fid_lib.evaluate(sa, sb, _toy_feature_fn, batch_size=8, is_splits=5, precision_recall=True,
                            progress=False)
  fa, fb = _toy_feature_fn(a), _toy_feature_fn(b)
  assert report['n_samples'] == 53 and report['n_ref'] == 41 and report['ref_source'] == 'images'
  assert _rel(report['fid'], _oracle_fid(fa['pool3'], fb['pool3'])) < 1e-6
  assert _rel(report['sfid'], _oracle_fid(fa['spatial'], fb['spatial'])) < 1e-6
  # IS logits are kept as float32 (the network's output type), so the oracle sees float32 logits too
  assert _rel(report['is_mean'], _oracle_is(fa['logits'].astype(np.float32), 5)[0]) < 1e-6
  np.testing.assert_allclose((report['precision'], report['recall']), _oracle_pr(fb['pool3'], fa['pool3'], 3),
                             atol=1.5 / 41)

  # statistics npz reference (as ref_stats writes it) gives the same FID; folders of PNGs read as images
  stats = fid_lib.extract(_toy_feature_fn, fid_lib.open_images(sb), batch_size=16, progress=False)
  np.savez(tmp_path / 'stats.npz', **stats.as_npz_dict())
  rep2 = fid_lib.evaluate(sa, str(tmp_path / 'stats.npz'), _toy_feature_fn, batch_size=8, progress=False)
  assert rep2['ref_source'] == 'statistics' and _rel(rep2['fid'], report['fid']) < 1e-9
  assert rep2['n_ref'] == 41
  np.savez(tmp_path / 'stats_digits.npz', feature=np.asarray('digits'), **stats.as_npz_dict())
  with pytest.raises(fid_lib.FidError, match='feature=digits'):
    fid_lib.evaluate(sa, str(tmp_path / 'stats_digits.npz'), _toy_feature_fn, progress=False,
                     feature_name='inception')

  from PIL import Image
  os.makedirs(tmp_path / 'png')
  for i, im in enumerate(b):
    Image.fromarray(im).save(tmp_path / 'png' / f'{i:05d}.png')
  rep3 = fid_lib.evaluate(sa, str(tmp_path / 'png'), _toy_feature_fn, batch_size=8, progress=False)
  assert _rel(rep3['fid'], report['fid']) < 1e-9


def test_digits_feature_plugs_into_the_pipeline(tmp_path):
  import jax
  from tcaq_jax import checkpoint
  from tcaq_jax.demo.classifier import CLASSIFIER_CONFIG, DigitClassifier, classify
  model = DigitClassifier(CLASSIFIER_CONFIG)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 1), np.float32))['params']
  checkpoint.save_model_dir(str(tmp_path / 'clf'), params, CLASSIFIER_CONFIG)
  fn = fid_lib.make_feature_fn('digits', digits_dir=str(tmp_path / 'clf'))
  rng = np.random.default_rng(9)
  grey = rng.integers(0, 256, size=(21, 16, 16), dtype=np.uint8)
  stats = fid_lib.extract(fn, fid_lib.open_images(_write_npz(tmp_path / 'd.npz', grey)), batch_size=8,
                          keep_features=True, progress=False)
  want, _ = classify(model, params, grey[..., None])
  np.testing.assert_allclose(stats.features(), want, rtol=1e-5, atol=1e-5)


def test_bad_sources_raise_named_errors(tmp_path):
  np.savez(tmp_path / 'x.npz', foo=np.zeros(3))
  with pytest.raises(fid_lib.FidError, match='x.npz'):
    fid_lib.open_images(str(tmp_path / 'x.npz'))
  with pytest.raises(fid_lib.FidError, match='uint8'):
    src = fid_lib.open_images(_write_npz(tmp_path / 'f.npz', np.zeros((4, 8, 8, 3), np.float32)))
    next(src.batches(2))
  with pytest.raises(fid_lib.FidError, match='unknown'):
    fid_lib.make_feature_fn('nope')


# ------------------------------------------------------------------------------------- CIFAR-10 reader

def test_cifar10_reader_layout_and_safety(tmp_path):
  rng = np.random.default_rng(8)
  imgs = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
  rows = imgs.transpose(0, 3, 1, 2).reshape(6, 3072)     # R plane, G plane, B plane, each row-major
  for i, sl in ((1, slice(0, 4)), (2, slice(4, 6))):
    d = {b'batch_label': b'training batch', b'labels': list(range(sl.start, sl.stop)), b'data': rows[sl],
         b'filenames': [b'x.png'] * (sl.stop - sl.start)}
    with open(tmp_path / f'data_batch_{i}', 'wb') as f:
      pickle.dump(d, f, protocol=2)
  got, labels = ref_stats.load_cifar10(str(tmp_path))
  np.testing.assert_array_equal(got, imgs)
  np.testing.assert_array_equal(labels, np.arange(6))
  assert len(ref_stats.data_source(f'cifar10:{tmp_path}')) == 6

  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))
  with open(tmp_path / 'evil', 'wb') as f:
    pickle.dump({b'data': Evil()}, f, protocol=2)
  with pytest.raises(ref_stats.UnsafePickleError, match='system'):
    ref_stats.safe_pickle_load(str(tmp_path / 'evil'))
