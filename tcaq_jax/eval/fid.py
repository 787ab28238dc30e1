"""FID / sFID / IS / precision-recall of a sample set against a reference: streaming feature extraction.

  python -m tcaq_jax.eval.fid --samples S.npz --ref R.npz --inception_dir DIR [--json out.json]
  python -m tcaq_jax.eval.fid --samples S.npz --ref R.npz --feature=digits      # the demo's classifier features

Image sources (`--samples`, `--ref`): an `.npz` holding uint8 images [N, H, W, 3] (key `arr_0`, `images` or
`samples`; [N, H, W] / [N, H, W, 1] grey images are repeated to 3 channels), or a folder of PNG/JPEG files. A
reference may instead be a statistics `.npz` with `mu`, `sigma` (and optionally `mu_s`, `sigma_s` for sFID,
`features` for precision/recall), as written by `python -m tcaq_jax.eval.ref_stats`; when an npz holds both
images and statistics, the images are used so both sides come from this network.

Feature networks are pluggable: a `FeatureFn` maps uint8 images [B, H, W, 3] to a dict with 'pool3' [B, D]
(the FID features) and optionally 'spatial' [B, Ds] (sFID) and 'logits' [B, C] (Inception Score). Register
more with `register_feature(name, factory)`; factories take the parsed options dict.

Extraction is one jitted call per fixed-size batch, sharded over all local devices on the batch axis (the last
batch is padded and the padding dropped); mean/covariance accumulate in float64 running sums
(`metrics.StatsAccumulator`), so 50k images never sit in memory; only IS logits (and pool3 features when
precision/recall is asked for) are kept, as float32.

Bad inputs end in one line (FidError, the CLI prints `error: ...` and exits 2) naming the file or flag: an
unreadable / truncated npz or image file, statistics holding NaN/inf or mis-shaped (`mu` [D], `sigma` [D, D]),
`--batch_size` / `--num_samples` / `--is_splits` below 1. Small samples (rule in `tcaq_jax.eval.metrics`): fewer
than 2 images are refused; N <= D images of D-d features (either side) still give an FID, but the report's
'warnings' list says it is biased and the CLI prints each warning as `warning: ...` on stderr; a negative FID
within rounding is reported as 0.0. The Inception Score needs 2 samples per split (else it is left out, with a
warning) and is flagged when N / splits is below the number of classes (the score is capped there). The CLI
prints the report before writing `--json`, so a failed write loses nothing.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from tcaq_jax import atomic_io
from tcaq_jax.diffusion import sharding
from tcaq_jax.eval import metrics
from tcaq_jax.eval.image_files import (IMAGE_KEYS, FidError, ImageSource, npz_arrays, npz_files,  # noqa: F401
                                       open_images)

__all__ = ['FidError', 'check_positive', 'check_stats', 'FeatureFn', 'register_feature', 'make_feature_fn',
           'ImageSource', 'open_images', 'FeatureStats', 'extract', 'reference_stats', 'evaluate', 'IMAGE_KEYS']

FeatureFn = Callable[[Any], dict]
def check_positive(name: str, value: int | None, optional: bool = False) -> None:
  """Refuses a size below 1 (None passes when optional): FidError naming it (pass '--flag' for a flag)."""
  if value is None and optional:
    return
  if value is None or value < 1:
    raise FidError(f'{name}={value}: must be a positive integer')


def check_stats(name: str, stats: dict) -> None:
  """Refuses statistics (mu, sigma[, mu_s, sigma_s, features]) that are mis-shaped or hold NaN/inf."""
  for mk, sk in (('mu', 'sigma'), ('mu_s', 'sigma_s')):
    if mk not in stats:
      continue
    mu, sigma = np.asarray(stats[mk]), np.asarray(stats.get(sk, np.zeros(0)))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
      raise FidError(f'{name}: {mk!r} {mu.shape} and {sk!r} {sigma.shape} are not [D] and [D, D]')
  for key in ('mu', 'sigma', 'mu_s', 'sigma_s', 'features'):
    if key in stats:
      a = np.asarray(stats[key], np.float64)
      bad = int(a.size - np.count_nonzero(np.isfinite(a)))
      if bad:
        raise FidError(f'{name}: {key!r} has {bad} non-finite value(s) (NaN/inf) of {a.size}; recompute it '
                       f'with python -m tcaq_jax.eval.ref_stats')


# ------------------------------------------------------------------------------------------ feature networks

_FEATURES: dict[str, Callable[[dict], FeatureFn]] = {}


def register_feature(name: str, factory: Callable[[dict], FeatureFn]) -> None:
  """Makes `--feature=name` available; `factory(options) -> FeatureFn`."""
  _FEATURES[name] = factory


def make_feature_fn(name: str, **options) -> FeatureFn:
  if name not in _FEATURES:
    raise FidError(f'--feature={name!r} is unknown; registered: {sorted(_FEATURES)}')
  return _FEATURES[name](options)


def _inception_factory(options: dict) -> FeatureFn:
  from tcaq_jax.eval import inception
  directory = options.get('inception_dir')
  if not directory:
    raise FidError('--feature=inception needs --inception_dir (convert the weights with '
                   '`python -m tcaq_jax.eval.inception --weights pt_inception-2015-12-05-*.pth --out DIR`)')
  params = inception.load(directory)
  precision = options.get('precision') or 'highest'
  if isinstance(precision, str):
    if precision not in ('highest', 'high', 'default'):
      raise FidError(f'--inception_precision={precision!r}: expected highest, high or default')
    precision = jax.lax.Precision[precision.upper()]
  return _with_params(lambda p, x: inception.features(p, x, precision=precision), params)


def _digits_factory(options: dict) -> FeatureFn:
  """The demo's digit classifier (tcaq_jax.demo.classifier): 'pool3' = its 64-d penultimate features, 'logits'."""
  try:  # the demo registers as a plug-in feature network: imported only when --feature=digits is asked for
    from tcaq_jax.assets import CLASSIFIER_DIR
    from tcaq_jax.demo import classifier
  except ImportError as e:
    raise FidError(f'--feature=digits needs tcaq_jax.demo.classifier ({e})') from e
  model, params = classifier.load_classifier(options.get('digits_dir') or CLASSIFIER_DIR)
  res = model.config['resolution']

  @jax.jit
  def fn(p, images):
    if images.shape[1:3] != (res, res):
      raise FidError(f'--feature=digits expects {res}x{res} images, got {images.shape[1:3]}')
    x = images.astype(jnp.float32).mean(axis=-1, keepdims=True) / 127.5 - 1.0   # grey, [-1, 1]
    feats, logits = model.apply({'params': p}, x)
    return {'pool3': feats, 'logits': logits}
  return _with_params(fn, params)


def _with_params(fn: Callable, params: Any) -> FeatureFn:
  """Binds params, replicated over the batch mesh, to fn(params, images)."""
  mesh = sharding.batch_mesh()
  params = sharding.replicate(params, mesh)
  feature_fn = lambda images: fn(params, images)  # noqa: E731
  feature_fn.mesh = mesh
  return feature_fn


register_feature('inception', _inception_factory)
register_feature('digits', _digits_factory)


# ----------------------------------------------------------------------------------------------- extraction

class FeatureStats:
  """Running statistics of the outputs of a FeatureFn (float64 sums; IS logits / pool3 kept if asked)."""

  def __init__(self, keep_features: bool = False, keep_logits: bool = True):
    self.pool3 = metrics.StatsAccumulator()
    self.spatial = metrics.StatsAccumulator()
    self.keep_features, self.keep_logits = keep_features, keep_logits
    self._logits: list[np.ndarray] = []
    self._features: list[np.ndarray] = []

  def update(self, out: dict) -> None:
    self.pool3.update(out['pool3'])
    if 'spatial' in out:
      self.spatial.update(out['spatial'])
    if self.keep_logits and 'logits' in out:
      self._logits.append(np.asarray(out['logits'], np.float32))
    if self.keep_features:
      self._features.append(np.asarray(out['pool3'], np.float32))

  @property
  def n(self) -> int:
    return self.pool3.n

  def logits(self) -> np.ndarray | None:
    return np.concatenate(self._logits) if self._logits else None

  def features(self) -> np.ndarray | None:
    return np.concatenate(self._features) if self._features else None

  def as_npz_dict(self) -> dict:
    out = {'n': np.int64(self.n)}
    out['mu'], out['sigma'] = self.pool3.stats()
    if self.spatial.n:
      out['mu_s'], out['sigma_s'] = self.spatial.stats()
    if self._features:
      out['features'] = self.features()
    return out


def extract(feature_fn: FeatureFn, source: ImageSource, batch_size: int = 250, limit: int | None = None,
            keep_features: bool = False, progress: bool = True, desc: str | None = None) -> FeatureStats:
  """Streams `source` through `feature_fn` in fixed-size batches sharded over the local devices."""
  check_positive('batch_size', batch_size)
  check_positive('limit', limit, optional=True)
  mesh = getattr(feature_fn, 'mesh', None) or sharding.batch_mesh()
  n_dev = mesh.devices.size
  padded = sharding.pad_to_multiple(batch_size, n_dev)
  stats = FeatureStats(keep_features=keep_features)
  total = len(source) if limit is None else min(limit, len(source))
  bar = tqdm(total=total, desc=desc or source.name, unit='img', disable=not progress)
  for images in source.batches(batch_size, limit):
    n = images.shape[0]
    if n < padded:   # one compiled shape: pad with copies of the last image, drop them after
      images = np.concatenate([images, np.repeat(images[-1:], padded - n, axis=0)])
    out = feature_fn(sharding.shard_batch(images, mesh))
    stats.update({k: np.asarray(v)[:n] for k, v in out.items()})
    bar.update(n)
  bar.close()
  if stats.n < 2:
    raise FidError(f'{source.name}: need at least 2 images, got {stats.n}')
  return stats


def reference_stats(path: str, feature_fn: FeatureFn | None, batch_size: int = 250, limit: int | None = None,
                    keep_features: bool = False, progress: bool = True, feature_name: str | None = None) -> dict:
  """Reference as a dict {'mu', 'sigma', optional 'mu_s', 'sigma_s', 'features', 'n', 'source'}.

  A statistics npz is checked (`check_stats`): NaN/inf or mis-shaped entries raise FidError naming the file.
  """
  if path.endswith('.npz') and os.path.isfile(path):
    files = npz_files(path)
    if not any(k in files for k in IMAGE_KEYS):
      if 'mu' not in files or 'sigma' not in files:
        raise FidError(f'reference {path!r} holds neither images ({IMAGE_KEYS}) nor statistics (mu, sigma); '
                       f'keys: {files}')
      keys = [k for k in ('mu', 'sigma', 'mu_s', 'sigma_s', 'features', 'n', 'feature') if k in files]
      ref = npz_arrays(path, keys)
      stored = str(ref.pop('feature')) if 'feature' in ref else None
      if feature_name and stored and stored != feature_name:
        raise FidError(f'reference statistics {path!r} were computed with --feature={stored}, not {feature_name}')
      check_stats(f'reference statistics {path!r}', ref)
      ref['source'] = 'statistics'
      return ref
  stats = extract(feature_fn, open_images(path), batch_size, limit, keep_features, progress, desc='reference')
  ref = stats.as_npz_dict()
  ref['source'] = 'images'
  return ref


def evaluate(samples: str, ref: str, feature_fn: FeatureFn, batch_size: int = 250, limit: int | None = None,
             is_splits: int = 10, precision_recall: bool = False, k: int = 3, progress: bool = True,
             feature_name: str | None = None) -> dict:
  """-> JSON-ready report: fid, sfid (when both sides have spatial features), is_mean/is_std, precision/recall.

  report['warnings'] lists (one line each) what makes a number not comparable: N <= D samples on either side
  (FID / sFID), too few samples per Inception Score split (IS left out, or capped). A metric that cannot be
  computed (non-finite result, shapes that differ between samples and reference, ...) raises FidError naming
  both files.
  """
  check_positive('is_splits', is_splits)
  sample_stats = extract(feature_fn, open_images(samples), batch_size, limit, precision_recall, progress,
                         desc='samples')
  ref_d = reference_stats(ref, feature_fn, batch_size, None, precision_recall, progress, feature_name)
  report: dict[str, Any] = {'samples': samples, 'ref': ref, 'n_samples': sample_stats.n,
                            'ref_source': ref_d['source']}
  if 'n' in ref_d:
    report['n_ref'] = int(ref_d['n'])
  if precision_recall and 'features' not in ref_d:
    raise FidError(f'--precision_recall needs reference features: {ref!r} holds statistics only '
                   f'(write them with ref_stats --save_features)')
  report['warnings'] = []
  try:
    _metrics(report, sample_stats, ref_d, is_splits, precision_recall, k)
  except metrics.MetricError as e:
    raise FidError(f'{samples} vs {ref}: {e}') from e
  return report


def _size_warnings(report: dict, what: str, n_samples: int, n_ref: int | None, dim: int) -> None:
  for name, n in ((f'{what} of {report["samples"]}', n_samples), (f'{what} reference {report["ref"]}', n_ref)):
    msg = None if n is None else metrics.sample_size_warning(n, dim, name)
    if msg:
      report['warnings'].append(msg)


def _metrics(report: dict, sample_stats: FeatureStats, ref_d: dict, is_splits: int, precision_recall: bool,
             k: int) -> None:
  """Fills report's metrics and warnings (the rules in the module docstring)."""
  n_ref = int(ref_d['n']) if 'n' in ref_d else None
  mu, sigma = sample_stats.pool3.stats()
  _size_warnings(report, 'FID', sample_stats.n, n_ref, mu.shape[0])
  report['fid'] = metrics.frechet_distance(mu, sigma, ref_d['mu'], ref_d['sigma'])
  if sample_stats.spatial.n and 'mu_s' in ref_d:
    mu_s, sigma_s = sample_stats.spatial.stats()
    _size_warnings(report, 'sFID', sample_stats.spatial.n, n_ref, mu_s.shape[0])
    report['sfid'] = metrics.frechet_distance(mu_s, sigma_s, ref_d['mu_s'], ref_d['sigma_s'])
  logits = sample_stats.logits()
  if logits is not None:
    _inception_score(report, logits, is_splits)
  if precision_recall:
    report['precision'], report['recall'] = metrics.precision_recall(ref_d['features'], sample_stats.features(), k)


def _inception_score(report: dict, logits: np.ndarray, splits: int) -> None:
  n, classes = logits.shape
  if n < 2 * splits:
    report['warnings'].append(f'Inception Score left out: {n} samples give fewer than 2 per split '
                              f'(--is_splits={splits})')
    return
  if n // splits < classes:
    report['warnings'].append(f'Inception Score is capped at {n // splits} ({n} samples / --is_splits={splits}) '
                              f'< {classes} classes: not comparable; use more samples')
  report['is_mean'], report['is_std'] = metrics.inception_score(logits, splits)


def _emit(report: dict, json_path: str | None) -> None:
  """Prints the warnings (stderr) and the report (stdout) first, then writes --json: a failed write loses nothing."""
  for w in report.get('warnings', []):
    print(f'warning: {w}', file=sys.stderr)
  text = json.dumps(report, indent=2, sort_keys=True, allow_nan=False)
  print(text, flush=True)
  if not json_path:
    return
  try:
    atomic_io.write_text(json_path, text + '\n')
  except OSError as e:
    raise FidError(f'--json={json_path}: cannot write the report ({e.strerror or e}); it is printed above') from e


def main(argv):
  del argv
  from tcaq_jax.checkpoint import quiet_orbax_logs
  quiet_orbax_logs()
  from absl import flags, logging
  f = flags.FLAGS
  check_positive('--batch_size', f.batch_size)
  check_positive('--num_samples', f.num_samples, optional=True)
  check_positive('--is_splits', f.is_splits)
  feature_fn = make_feature_fn(f.feature, inception_dir=f.inception_dir, precision=f.inception_precision,
                               digits_dir=f.digits_dir)
  report = evaluate(f.samples, f.ref, feature_fn, f.batch_size, f.num_samples, f.is_splits, f.precision_recall,
                    progress=not f.no_progress, feature_name=f.feature)
  report['feature'] = f.feature
  _emit(report, f.json)
  if f.json:
    logging.info('wrote %s', f.json)


def define_flags():
  from absl import flags
  flags.DEFINE_string('samples', None, 'generated images: .npz (arr_0 / images / samples) or image folder')
  flags.DEFINE_string('ref', None, 'reference: image .npz, image folder, or statistics .npz (mu, sigma, ...)')
  flags.DEFINE_string('feature', 'inception', f'feature network: {sorted(_FEATURES)}')
  flags.DEFINE_string('inception_dir', None, 'converted FID Inception (python -m tcaq_jax.eval.inception)')
  flags.DEFINE_string('digits_dir', None, '--feature=digits: classifier directory (default: the shipped asset)')
  flags.DEFINE_enum('inception_precision', 'highest', ['highest', 'high', 'default'],
                    'conv precision on GPU/TPU: highest = float32 (reference); default may use TF32/bf16 passes')
  flags.DEFINE_integer('batch_size', 250, 'images per jitted batch (all devices together)')
  flags.DEFINE_integer('num_samples', None, 'use only the first N samples')
  flags.DEFINE_integer('is_splits', 10, 'Inception Score splits')
  flags.DEFINE_bool('precision_recall', False, 'also improved precision/recall (k=3); keeps pool3 features')
  flags.DEFINE_string('json', None, 'also write the JSON report here')
  flags.DEFINE_bool('no_progress', False, 'hide the progress bars')
  flags.mark_flags_as_required(['samples', 'ref'])


if __name__ == '__main__':   # run the package module's main: its error classes are then tcaq_jax's, not __main__'s
  from tcaq_jax import cli
  from tcaq_jax.eval import fid as _fid
  _fid.define_flags()
  cli.run(_fid.main)
