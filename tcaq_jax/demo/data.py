"""The demo's data: scikit-learn's bundled 8x8 digits at 16x16, and the checked image input of its classifier.

  images, labels = load_digits_16()               # [1797, 16, 16, 1] float32 in [-1, 1], [1797] int32
  x = to_model_input(images, name)                # uint8 or float in [-1, 1] -> float32 [N, 16, 16, 1], checked
  images = load_images_npz(path)                  # an .npz of samples (arr_0 / images / samples), checked

Accepted images (the rule `to_model_input` checks; anything else raises DemoDataError naming the file / array):
uint8 0..255, or floating point in [-1, 1] (finite; values up to FLOAT_TOL outside are clipped). Shapes:
[N, 16, 16] or [N, 16, 16, 1]. A file (`load_images_npz`, the classifier's --evaluate) of float images with no
value below 0 is refused too: it is [0, 1] data (the digits' background is -1), which the classifier would
score as washed-out digits (FID ~390 instead of ~9). In-memory arrays skip that last check (`refuse_unit_range`
False): a collapsed model's samples can legitimately be all >= 0.
"""
from __future__ import annotations

import zipfile

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['DemoDataError', 'FLOAT_TOL', 'IMAGE_KEYS', 'load_digits_16', 'from_uint8', 'to_model_input',
           'load_images_npz']

FLOAT_TOL = 1e-3
IMAGE_KEYS = ('arr_0', 'images', 'samples')


class DemoDataError(ValueError):
  """Demo images of the wrong dtype, range or shape, or an unreadable images file (the message names it)."""


def load_digits_16() -> tuple[np.ndarray, np.ndarray]:
  """sklearn's digits (no download), 8x8 in 0..16, bilinearly upsampled to 16x16 and scaled to [-1, 1].

  Returns images [1797, 16, 16, 1] float32 and labels [1797] int32.
  """
  from sklearn.datasets import load_digits
  d = load_digits()
  x = d.images.astype(np.float32) / 16.0                      # [N, 8, 8] in [0, 1]
  x = jax.image.resize(jnp.asarray(x), (x.shape[0], 16, 16), method='linear')
  x = np.clip(np.asarray(x) * 2.0 - 1.0, -1.0, 1.0)[..., None]
  return x.astype(np.float32), d.target.astype(np.int32)


def from_uint8(x) -> np.ndarray:
  return np.asarray(x, np.float32) / 127.5 - 1.0


def _check_shape(x: np.ndarray, name: str, resolution: int) -> np.ndarray:
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[1:] != (resolution, resolution, 1) or x.shape[0] < 1:
    raise DemoDataError(f'{name}: expected grey images [N, {resolution}, {resolution}] or '
                        f'[N, {resolution}, {resolution}, 1], got shape {x.shape}')
  return x


def _check_float(x: np.ndarray, name: str, refuse_unit_range: bool) -> np.ndarray:
  if not np.isfinite(x).all():
    raise DemoDataError(f'{name}: {int(x.size - np.count_nonzero(np.isfinite(x)))} non-finite pixel value(s)')
  lo, hi = float(x.min()), float(x.max())
  if lo < -1 - FLOAT_TOL or hi > 1 + FLOAT_TOL:
    raise DemoDataError(f'{name}: float images must lie in [-1, 1], got [{lo:.4g}, {hi:.4g}] (clip them, or '
                        f'pass uint8 0..255)')
  if refuse_unit_range and lo >= 0:
    raise DemoDataError(f'{name}: float images have no value below 0 (range [{lo:.4g}, {hi:.4g}]): [0, 1] data? '
                        f'The float range is [-1, 1] (convert with x * 2 - 1) or pass uint8 0..255')
  return np.clip(x, -1.0, 1.0)


def to_model_input(images, name: str = 'images', resolution: int = 16,
                   refuse_unit_range: bool = False) -> np.ndarray:
  """uint8 or float [-1, 1] images [N, R, R(, 1)] -> float32 [N, R, R, 1] in [-1, 1] (rule: module docstring).

  refuse_unit_range: also refuse float images with no value below 0 (they look like [0, 1] data).
  """
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return from_uint8(_check_shape(x, name, resolution))
  if not np.issubdtype(x.dtype, np.floating):
    raise DemoDataError(f'{name}: expected uint8 (0..255) or float images in [-1, 1], got {x.dtype}')
  return _check_float(_check_shape(x, name, resolution), name, refuse_unit_range).astype(np.float32)


def load_images_npz(path: str, resolution: int = 16) -> np.ndarray:
  """The images of an .npz (first of IMAGE_KEYS), as stored, after `to_model_input`'s checks (naming the file;
  [0, 1] float data refused)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      key = next((k for k in IMAGE_KEYS if k in z.files), None)
      if key is None:
        raise DemoDataError(f'{path}: holds no images (keys {z.files}; expected one of {IMAGE_KEYS})')
      images = np.asarray(z[key])
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    if isinstance(e, (DemoDataError, FileNotFoundError)):
      raise
    raise DemoDataError(f'{path}: not a readable .npz ({type(e).__name__}: {e})') from e
  to_model_input(images, f'{path}[{key}]', resolution, refuse_unit_range=True)
  return images
