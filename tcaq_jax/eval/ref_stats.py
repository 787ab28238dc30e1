"""Reference statistics (mu, sigma, mu_s, sigma_s[, features]) of a data set on disk, for `tcaq_jax.eval.fid`.

  python -m tcaq_jax.eval.ref_stats --data cifar10:/path/cifar-10-batches-py --inception_dir DIR --out ref.npz
  python -m tcaq_jax.eval.ref_stats --data /path/to/png_folder --inception_dir DIR --out ref.npz
  python -m tcaq_jax.eval.ref_stats --data images.npz --feature=digits --out ref.npz

CIFAR-10 python batches (`data_batch_1..5`, optionally `test_batch` with --cifar_split=test) are pickles of a
plain dict; they are read by a restricted unpickler whose `find_class` resolves only numpy's array-rebuilding
globals and refuses everything else (no code from the file runs). Data layout: b'data' uint8 [N, 3072] rows of
1024 R, 1024 G, 1024 B values, each a row-major 32x32 plane.

Errors end in one line naming the file or flag (`--batch_size` / `--num_images` below 1, a missing `--out`
folder: checked before any image is read; an unreadable image or npz; statistics holding NaN/inf are not
written). Fewer images than feature dimensions (N <= D) still give statistics, with a `warning: ...` line on
stderr: an FID against them is biased (see `tcaq_jax.eval.metrics`).
"""
from __future__ import annotations

import glob
import os
import pickle
import sys

import numpy as np

from tcaq_jax.eval import fid, metrics

__all__ = ['UnsafePickleError', 'safe_pickle_load', 'load_cifar10', 'cifar10_source', 'data_source']

def _allowed_globals() -> dict:
  import codecs
  from numpy._core import multiarray
  out = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype,
         ('_codecs', 'encode'): codecs.encode}   # bytes pickled by Python 3 with protocol <= 2
  for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    out[(mod, '_reconstruct')] = multiarray._reconstruct
    out[(mod, 'scalar')] = multiarray.scalar
  return out


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a global outside the numpy allow-list (names module.name and the file)."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
  def __init__(self, f, path: str):
    super().__init__(f, encoding='bytes')
    self._path = path

  def find_class(self, module, name):
    obj = _allowed_globals().get((module, name))
    if obj is not None:
      return obj
    raise UnsafePickleError(f'{self._path}: refusing to load global {module}.{name} (only numpy array '
                            f'reconstruction is allowed)')


def safe_pickle_load(path: str):
  """Unpickles plain containers / bytes / numpy arrays only; a truncated / corrupt file -> FidError naming it."""
  with open(path, 'rb') as f:
    try:
      return _NumpyOnlyUnpickler(f, path).load()
    except UnsafePickleError:
      raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError) as e:
      raise fid.FidError(f'{path}: not a readable pickle ({type(e).__name__}: {e})') from e


def _key(d: dict, name: str):
  for k in (name, name.encode()):
    if k in d:
      return d[k]
  raise fid.FidError(f'CIFAR-10 batch has no {name!r} entry (keys {list(d)[:6]})')


def load_cifar10(directory: str, split: str = 'train') -> tuple[np.ndarray, np.ndarray]:
  """-> (images uint8 [N, 32, 32, 3], labels int64 [N]) from `cifar-10-batches-py`."""
  pattern = 'data_batch_*' if split == 'train' else 'test_batch'
  files = sorted(glob.glob(os.path.join(directory, pattern)))
  if not files:
    raise fid.FidError(f'no CIFAR-10 {pattern} files in {directory!r}')
  images, labels = [], []
  for path in files:
    d = safe_pickle_load(path)
    if not isinstance(d, dict):
      raise fid.FidError(f'{path}: expected a dict, got {type(d).__name__}')
    data = np.asarray(_key(d, 'data'), np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
      raise fid.FidError(f'{path}: data has shape {data.shape}, expected [N, 3072]')
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(np.asarray(_key(d, 'labels'), np.int64))
  return np.concatenate(images), np.concatenate(labels)


def cifar10_source(directory: str, split: str = 'train') -> fid.ImageSource:
  images, _ = load_cifar10(directory, split)
  return fid.ImageSource(f'cifar10:{directory}', len(images), lambda lo, hi: images[lo:hi])


def data_source(spec: str, cifar_split: str = 'train') -> fid.ImageSource:
  """'cifar10:DIR' | image folder | image .npz -> ImageSource."""
  if spec.startswith('cifar10:'):
    return cifar10_source(spec[len('cifar10:'):], cifar_split)
  if os.path.isdir(spec) and glob.glob(os.path.join(spec, 'data_batch_*')):
    return cifar10_source(spec, cifar_split)
  return fid.open_images(spec)


def check_out(path: str | None) -> None:
  """--out must be given and its folder must exist (checked before the extraction, not after)."""
  if not path:
    raise fid.FidError('--out is required')
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise fid.FidError(f'--out={path}: folder {folder!r} does not exist')


def main(argv):
  del argv
  from absl import flags, logging
  f = flags.FLAGS
  fid.check_positive('--batch_size', f.batch_size)
  fid.check_positive('--num_images', f.num_images, optional=True)
  check_out(f.out)
  feature_fn = fid.make_feature_fn(f.feature, inception_dir=f.inception_dir, digits_dir=f.digits_dir)
  source = data_source(f.data, f.cifar_split)
  stats = fid.extract(feature_fn, source, f.batch_size, f.num_images, keep_features=f.save_features,
                      progress=not f.no_progress, desc='reference')
  out = stats.as_npz_dict()
  fid.check_stats(f'statistics of {source.name}', out)
  msg = metrics.sample_size_warning(stats.n, out['mu'].shape[0], f'FID reference {source.name}')
  if msg:
    print(f'warning: {msg}', file=sys.stderr)
  out['feature'] = np.asarray(f.feature)
  tmp = f.out + '.tmp.npz'
  np.savez(tmp, **out)
  os.replace(tmp, f.out)
  logging.info('wrote statistics of %d images of %s (%s features) to %s', stats.n, source.name, f.feature, f.out)


def define_flags():
  from absl import flags
  flags.DEFINE_string('data', None, "data set: 'cifar10:DIR' (cifar-10-batches-py), an image folder or an npz")
  flags.DEFINE_enum('cifar_split', 'train', ['train', 'test'], 'CIFAR-10 split (train = 50k data_batch_*)')
  flags.DEFINE_string('feature', 'inception', 'feature network (see tcaq_jax.eval.fid)')
  flags.DEFINE_string('inception_dir', None, 'converted FID Inception directory')
  flags.DEFINE_string('digits_dir', None, '--feature=digits: classifier directory (default: the shipped asset)')
  flags.DEFINE_integer('batch_size', 250, 'images per jitted batch')
  flags.DEFINE_integer('num_images', None, 'use only the first N images')
  flags.DEFINE_bool('save_features', False, 'also store pool3 features (for precision/recall)')
  flags.DEFINE_string('out', None, 'output .npz')
  flags.DEFINE_bool('no_progress', False, 'hide the progress bar')
  flags.mark_flags_as_required(['data', 'out'])


if __name__ == '__main__':   # run the package module's main: its error classes are then tcaq_jax's, not __main__'s
  from tcaq_jax import cli
  from tcaq_jax.eval import ref_stats as _ref_stats
  _ref_stats.define_flags()
  cli.run(_ref_stats.main)
