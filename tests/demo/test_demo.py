"""The shipped demo: assets load, the classifier works, sampling writes the evaluator's .npz, samples are digits.

Thresholds were measured on the shipped assets (docs/results/sample.md): on 1,000 samples (DDIM 50 quad steps,
eta 0, seed 0) the classifier is >= 0.9 confident on 82.8% of them and the 64-d feature FID is 3.60 against a
real-vs-real floor of 3.02 (recorded threshold: 2 x floor = 6.0); the CI test samples 200 images (seed 1) and
uses thresholds measured at that size.
"""
import os

import jax
import numpy as np
import pytest

from tcaq_jax.checkpoint import restore
from tcaq_jax.assets import CLASSIFIER_DIR, DEMO_UNET_DIR
from tcaq_jax.demo.classifier import classify, demo_quality, load_classifier
from tcaq_jax.demo.data import load_digits_16
from tcaq_jax.models.configs import get_config

HAVE_ASSETS = all(os.path.isfile(os.path.join(d, 'config.json'))
                  for d in (DEMO_UNET_DIR, CLASSIFIER_DIR))
# measured on the shipped demo_unet (DDIM 50 quad steps, eta 0): 1,000 samples seed 0: 82.8% >= 0.9 confident,
# FID 3.60 (real half vs half: 3.02); 200 samples seed 1: 86.5% confident, FID 9.71 (a 200-image real subset
# against all real images: 7.37; uniform noise: ~500).
SMALL_N, SMALL_FID_THRESHOLD = 200, 15.0

needs_assets = pytest.mark.skipif(not HAVE_ASSETS, reason='demo assets not built yet')


def test_digits_data():
  x, y = load_digits_16()
  assert x.shape == (1797, 16, 16, 1) and x.dtype == np.float32 and y.shape == (1797,)
  assert x.min() == -1.0 and x.max() == 1.0
  assert np.bincount(y).min() > 170


@needs_assets
def test_demo_assets_load():
  from tcaq_jax.models import family
  model, params, config = family.load(DEMO_UNET_DIR)
  want = get_config('ddim_digits')
  assert {k: config[k] for k in want} == want
  n = sum(int(a.size) for a in jax.tree.leaves(params))
  assert 300_000 <= n <= 2_000_000
  meta = restore(DEMO_UNET_DIR)['meta']
  assert meta['trained_steps'] > 0 and meta['config']['name'] == 'ddim_digits'
  clf_meta = restore(CLASSIFIER_DIR)['meta']
  assert clf_meta['heldout_accuracy'] >= 0.95


@needs_assets
def test_classifier_on_real_digits_and_fid_floor():
  clf, params = load_classifier()
  x, y = load_digits_16()
  _, probs = classify(clf, params, x)
  assert (probs.argmax(-1) == y).mean() >= 0.97
  subset = np.random.default_rng(1).permutation(x.shape[0])[:600]
  q = demo_quality(x[subset], clf, params)      # real digits scored as if they were samples
  assert q['confident_fraction'] >= 0.9
  # measured: half vs half of the real digits 3.0 (seed 0; 2.97-4.15 over seeds 0-2), uniform noise ~500
  assert 1.0 < q['fid_floor'] < 6.0 and q['fid'] < 4.0   # measured 1.67 (overlaps the reference set)


@needs_assets
def test_sample_cli_writes_npz_and_grid(tmp_path):
  from tcaq_jax.eval.sample import generate
  images = generate(DEMO_UNET_DIR, num_samples=6, batch_size=4, steps=5, skip_type='uniform', eta=0.0,
                    seed=0, out_dir=str(tmp_path), progress=False)
  npz = np.load(tmp_path / 'samples_6x16x16x1.npz')
  assert npz['arr_0'].dtype == np.uint8 and npz['arr_0'].shape == (6, 16, 16, 1)
  np.testing.assert_array_equal(npz['arr_0'], images)
  assert (tmp_path / 'grid.png').stat().st_size > 0
  # same seed, other batch split -> same images
  again = generate(DEMO_UNET_DIR, num_samples=6, batch_size=6, steps=5, skip_type='uniform', eta=0.0,
                   seed=0, progress=False)
  assert np.abs(again.astype(int) - images.astype(int)).max() <= 1


@needs_assets
@pytest.mark.slow
def test_demo_samples_are_digits():
  from tcaq_jax.eval.sample import generate
  images = generate(DEMO_UNET_DIR, num_samples=SMALL_N, batch_size=SMALL_N, steps=50, skip_type='quad',
                    eta=0.0, seed=1, progress=False)
  q = demo_quality(images)
  assert q['confident_fraction'] >= 0.8, q
  assert q['fid'] < SMALL_FID_THRESHOLD, q
  assert min(q['class_histogram']) > 0, q              # every digit class appears


# ------------------------------------------------------------------------- checked inputs (issue 13, probe 6)

def _random_classifier():
  """A classifier with random weights (shapes from eval_shape: an eager model.init takes ~7 s on 2 cores)."""
  from tcaq_jax.demo.classifier import CLASSIFIER_CONFIG, DigitClassifier
  model = DigitClassifier(CLASSIFIER_CONFIG)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 16, 16, 1), np.float32))['params']
  rng = np.random.default_rng(0)
  return model, jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.2).astype(np.float32), shapes)


def test_classifier_refuses_images_outside_the_documented_range():
  """Issue 13 probe 6: [0, 1] float images were accepted (FID 390 against 8.68 for the same images as uint8)."""
  from tcaq_jax.demo.classifier import CLASSIFIER_CONFIG, DigitClassifier
  from tcaq_jax.demo.data import DemoDataError, to_model_input
  x = np.random.default_rng(0).uniform(-1, 1, size=(8, 16, 16, 1)).astype(np.float32)
  with pytest.raises(DemoDataError, match=r'images: float images have no value below 0.*\[0, 1\] data'):
    to_model_input((x + 1) / 2, refuse_unit_range=True)
  assert to_model_input((x + 1) / 2).min() >= 0       # in memory (a collapsed model's samples): range check only
  with pytest.raises(DemoDataError, match=r'images: float images must lie in \[-1, 1\], got \[-1.99'):
    classify(DigitClassifier(CLASSIFIER_CONFIG), None, x * 2)          # refused before the network runs
  with pytest.raises(DemoDataError, match=r'float images must lie in \[-1, 1\], got \[0, 25'):
    to_model_input(np.round((x + 1) * 127.5))
  with pytest.raises(DemoDataError, match='got int64'):
    to_model_input(np.round((x + 1) * 127.5).astype(np.int64))
  with pytest.raises(DemoDataError, match=r'got shape \(8, 16, 16, 3\)'):
    to_model_input(np.repeat(x, 3, axis=-1))
  with pytest.raises(DemoDataError, match='1 non-finite'):
    to_model_input(np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x))
  u8 = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
  np.testing.assert_allclose(to_model_input(u8[..., 0]), to_model_input(x), atol=1 / 127.5)


def test_evaluate_file_names_the_file(tmp_path):
  """--evaluate FILE: a [0, 1] float file, a truncated file and a file without images each name the file."""
  from tcaq_jax.demo.classifier import evaluate_file
  from tcaq_jax.demo.data import DemoDataError
  x = np.random.default_rng(0).uniform(-1, 1, size=(8, 16, 16, 1)).astype(np.float32)
  np.savez(tmp_path / 'unit.npz', arr_0=(x + 1) / 2)
  with pytest.raises(DemoDataError, match=r'unit.npz\[arr_0\]: float images have no value below 0'):
    evaluate_file(str(tmp_path / 'unit.npz'))
  data = open(tmp_path / 'unit.npz', 'rb').read()
  open(tmp_path / 'cut.npz', 'wb').write(data[:len(data) // 2])
  with pytest.raises(DemoDataError, match='cut.npz: not a readable .npz'):
    evaluate_file(str(tmp_path / 'cut.npz'))
  np.savez(tmp_path / 'other.npz', foo=x)
  with pytest.raises(DemoDataError, match=r"other.npz: holds no images \(keys \['foo'\]"):
    evaluate_file(str(tmp_path / 'other.npz'))


def test_demo_quality_of_few_samples_warns():
  """Issue 13 probe 4 for the demo's FID: 10 samples of the 64-d features give a biased FID, flagged."""
  model, params = _random_classifier()
  x = load_digits_16()[0][:10]
  q = demo_quality(x, model, params, name='few.npz')
  assert q['fid'] >= 0 and q['warnings'] == ['FID of few.npz from 10 samples of 64-d features is biased and not '
                                             'comparable: the covariance is singular (rank <= 9 < 64); use more '
                                             'than 64 samples']


def test_pretrain_and_classifier_flags_below_one_are_refused():
  from types import SimpleNamespace
  from tcaq_jax.demo import pretrain
  from tcaq_jax.demo.classifier import _check_flags
  from tcaq_jax.demo.data import DemoDataError
  ok = dict(steps=10, batch_size=8, log_every=5, ckpt_every=5, warmup=0, max_minutes=0.0)
  pretrain.check_flags(SimpleNamespace(**ok))
  for name, value, msg in (('ckpt_every', 0, 'must be a positive integer'),
                           ('batch_size', -1, 'must be a positive integer'), ('max_minutes', -1.0, 'must be >= 0')):
    with pytest.raises(pretrain.PretrainError, match=f'^--{name}={value}: {msg}'):
      pretrain.check_flags(SimpleNamespace(**dict(ok, **{name: value})))
  with pytest.raises(DemoDataError, match=r'^--num_test=0: must be in \[1, 1796\]'):
    _check_flags(SimpleNamespace(steps=10, num_test=0))
