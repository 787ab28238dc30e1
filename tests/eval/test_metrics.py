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
  with pytest.warns(metrics.SmallSampleWarning, match='20 samples of 50-d'):
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


# ------------------------------------------------------------------ small samples, bad statistics (issue 13)

def test_small_sample_fid_is_not_negative_and_warns():
  """Issue 13 probe 4: 10 samples vs themselves gave FID -0.004 at 2048-d (-3.5e-6 here at 64-d, same cause)."""
  x = np.random.default_rng(0).normal(size=(10, 64))
  mu, sigma = metrics.feature_stats(x)
  with pytest.warns(metrics.SmallSampleWarning, match='10 samples of 64-d features is biased'):
    assert metrics.fid(x, x) == 0.0                              # rounding below 0 -> 0.0 (documented)
  assert metrics.frechet_distance(mu, sigma, mu, sigma) == 0.0
  dead = x.copy()
  dead[:, 32:] = 0             # dead feature units: scipy reports the product singular -> the eps * I branch
  mu_d, sigma_d = metrics.feature_stats(dead)
  assert 0 <= metrics.frechet_distance(mu_d, sigma_d, mu_d, sigma_d) < 1e-6   # pytorch-fid: -2 D eps = -1.28e-4
  assert metrics.sample_size_warning(65, 64) is None
  with pytest.raises(metrics.MetricError, match='negative'):     # not rounding: a covariance that is not PSD
    metrics.frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), -np.eye(2))


def test_inception_score_refuses_one_sample_per_split():
  """Issue 13 probe 4: IS of 10 samples in 10 splits was exactly 1.0 whatever the logits."""
  logits = np.random.default_rng(1).normal(size=(10, 5)) * 3
  with pytest.raises(metrics.MetricError, match='at least 2 samples per split'):
    metrics.inception_score(logits, splits=10)
  assert metrics.inception_score(logits, splits=5)[0] > 1.0


def test_non_finite_statistics_raise_metric_error():
  """Issue 13 probe 5: a NaN gave FID NaN, an all-NaN covariance a raw LinAlgError (after minutes in sqrtm)."""
  mu, sigma = np.zeros(3), np.eye(3)
  with pytest.raises(metrics.MetricError, match='mu2 has 1 non-finite'):
    metrics.frechet_distance(mu, sigma, np.array([0.0, np.nan, 0.0]), sigma)
  with pytest.raises(metrics.MetricError, match='sigma2 has 9 non-finite'):
    metrics.frechet_distance(mu, sigma, mu, np.full((3, 3), np.nan))


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


# ------------------------------------------------------------------------ pipeline errors and warnings (issue 13)

def _grey_npz(path, n, seed=0):
  return _write_npz(path, np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16), dtype=np.uint8))


def test_evaluate_small_samples_warn_and_fid_is_not_negative(tmp_path):
  """Issue 13 probe 4 through evaluate: 10 samples vs themselves (toy features are 22-d)."""
  s = _grey_npz(tmp_path / 's.npz', 10)
  rep = fid_lib.evaluate(s, s, _toy_feature_fn, batch_size=4, progress=False)
  assert rep['fid'] == 0.0 and rep['sfid'] == 0.0 and 'is_mean' not in rep
  text = '\n'.join(rep['warnings'])
  assert f'FID of {s} from 10 samples of 22-d features is biased' in text
  assert f'FID reference {s} from 10 samples' in text and 'sFID of' in text
  assert 'Inception Score left out: 10 samples give fewer than 2 per split (--is_splits=10)' in text
  rep5 = fid_lib.evaluate(s, s, _toy_feature_fn, batch_size=4, is_splits=5, progress=False)
  assert rep5['is_mean'] >= 1.0 and any('Inception Score is capped at 2' in w for w in rep5['warnings'])
  many = _grey_npz(tmp_path / 'm.npz', 40, seed=1)
  assert fid_lib.evaluate(many, many, _toy_feature_fn, batch_size=16, is_splits=2, progress=False)['warnings'] == []


def test_reference_statistics_with_nan_are_refused(tmp_path):
  """Issue 13 probe 5: NaN in a statistics npz printed "fid": NaN with exit 0; all-NaN raised LinAlgError."""
  s = _grey_npz(tmp_path / 's.npz', 30)
  stats = fid_lib.extract(_toy_feature_fn, fid_lib.open_images(s), batch_size=8, progress=False).as_npz_dict()
  one = dict(stats, mu=stats['mu'].copy())
  one['mu'][3] = np.nan
  np.savez(tmp_path / 'nan1.npz', **one)
  with pytest.raises(fid_lib.FidError, match=r"nan1.npz.*'mu' has 1 non-finite"):
    fid_lib.evaluate(s, str(tmp_path / 'nan1.npz'), _toy_feature_fn, progress=False)
  np.savez(tmp_path / 'nan_all.npz', **dict(stats, sigma=np.full_like(stats['sigma'], np.nan)))
  with pytest.raises(fid_lib.FidError, match=r"nan_all.npz.*'sigma' has 484 non-finite"):
    fid_lib.reference_stats(str(tmp_path / 'nan_all.npz'), None)
  np.savez(tmp_path / 'shape.npz', **dict(stats, sigma=stats['sigma'][:3]))
  with pytest.raises(fid_lib.FidError, match=r"shape.npz.*'sigma' \(3, 22\)"):
    fid_lib.reference_stats(str(tmp_path / 'shape.npz'), None)


def test_corrupt_files_name_the_file(tmp_path):
  from PIL import Image
  good = _grey_npz(tmp_path / 'good.npz', 8)
  data = open(good, 'rb').read()
  for name, cut in (('head.npz', data[:len(data) // 2]), ('tail.npz', data[:100] + data[-100:])):
    open(tmp_path / name, 'wb').write(cut)
    with pytest.raises(fid_lib.FidError, match=name):
      fid_lib.open_images(str(tmp_path / name))
    with pytest.raises(fid_lib.FidError, match=name):
      fid_lib.reference_stats(str(tmp_path / name), _toy_feature_fn, progress=False)
  os.makedirs(tmp_path / 'png')
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / 'png' / 'a.png')
  png = open(tmp_path / 'png' / 'a.png', 'rb').read()
  open(tmp_path / 'png' / 'b.png', 'wb').write(png[:len(png) // 2])      # truncated
  with pytest.raises(fid_lib.FidError, match='b.png: cannot read the image'):
    next(fid_lib.open_images(str(tmp_path / 'png')).batches(2))
  os.makedirs(tmp_path / 'junk')
  open(tmp_path / 'junk' / 'c.png', 'wb').write(b'not a png at all')      # not an image
  with pytest.raises(fid_lib.FidError, match='c.png: cannot read the image'):
    next(fid_lib.open_images(str(tmp_path / 'junk')).batches(1))
  open(tmp_path / 'data_batch_1', 'wb').write(pickle.dumps({b'data': np.zeros(4)}, protocol=2)[:20])
  with pytest.raises(fid_lib.FidError, match='data_batch_1: not a readable pickle'):
    ref_stats.load_cifar10(str(tmp_path))


def test_size_flags_below_one_are_refused(tmp_path):
  s = _grey_npz(tmp_path / 's.npz', 4)
  with pytest.raises(fid_lib.FidError, match=r'^batch_size=0: must be a positive integer'):
    fid_lib.extract(_toy_feature_fn, fid_lib.open_images(s), batch_size=0, progress=False)
  with pytest.raises(fid_lib.FidError, match=r'^limit=0'):
    fid_lib.evaluate(s, s, _toy_feature_fn, limit=0, progress=False)
  with pytest.raises(fid_lib.FidError, match=r'^is_splits=-1'):
    fid_lib.evaluate(s, s, _toy_feature_fn, is_splits=-1, progress=False)
  with pytest.raises(fid_lib.FidError, match=r'^--num_images=-3: must be a positive integer'):
    fid_lib.check_positive('--num_images', -3, optional=True)
  fid_lib.check_positive('--num_samples', None, optional=True)
  with pytest.raises(fid_lib.FidError, match='--out=.*does not exist'):
    ref_stats.check_out(str(tmp_path / 'missing' / 'ref.npz'))


@pytest.mark.skipif(not os.path.isfile(os.path.join(os.path.dirname(fid_lib.__file__), '..', 'assets',
                                                    'digit_classifier', 'config.json')),
                    reason='demo classifier asset not built')
def test_fid_cli_prints_before_writing_json_and_warns(tmp_path):
  """Issue 13 probe 11 (the CLI, once): --json to an unwritable path printed nothing; now the report is on stdout,
  the small-sample warnings on stderr, then one error line and exit 2."""
  import json
  import subprocess
  import sys
  s = _grey_npz(tmp_path / 's.npz', 10)
  bad = str(tmp_path / 'missing' / 'r.json')
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  p = subprocess.run([sys.executable, '-m', 'tcaq_jax.eval.fid', f'--samples={s}', f'--ref={s}',
                      '--feature=digits', f'--json={bad}', '--no_progress'], capture_output=True, text=True,
                     cwd=root, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert p.returncode == 2, p.stderr
  report = json.loads(p.stdout)
  assert report['fid'] >= 0 and report['n_samples'] == 10
  lines = [l for l in p.stderr.splitlines() if l.startswith(('warning:', 'error:'))]
  assert lines[-1] == f'error: --json={bad}: cannot write the report (No such file or directory); it is printed above'
  assert any('10 samples of 64-d features is biased' in l for l in lines if l.startswith('warning:'))
