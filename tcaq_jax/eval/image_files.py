"""Image sources of the FID tool: an .npz of uint8 images (key arr_0, images or samples; grey repeated to 3
channels) or a folder of PNG/JPEG files, read in batches; `FidError` for everything the FID tool refuses (the
message names the file or flag).

  src = open_images('samples/x.npz')          # ImageSource: len(src), src.batches(250) -> uint8 [<=250, H, W, 3]
"""
from __future__ import annotations

import glob
import os
import zipfile
from typing import Callable, Iterator

import numpy as np

__all__ = ['IMAGE_KEYS', 'FidError', 'ImageSource', 'open_images', 'npz_files', 'npz_arrays']

IMAGE_KEYS = ('arr_0', 'images', 'samples')
_IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


class FidError(ValueError):
  """Bad image source, reference file or feature network option (the message names the file / flag)."""



class ImageSource:
  """A sized, re-iterable source of uint8 images [N, H, W, 3]; `batches(b)` yields [<=b, H, W, 3] arrays."""

  def __init__(self, name: str, n: int, get: Callable[[int, int], np.ndarray]):
    self.name, self.n, self._get = name, n, get

  def __len__(self):
    return self.n

  def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    n = self.n if limit is None else min(limit, self.n)
    for lo in range(0, n, batch_size):
      yield _as_rgb_uint8(self._get(lo, min(lo + batch_size, n)), self.name)


def _as_rgb_uint8(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise FidError(f'{name}: expected images [N, H, W, 3] (or grey [N, H, W]), got shape {x.shape}')
  if x.dtype != np.uint8:
    raise FidError(f'{name}: expected uint8 images, got {x.dtype} (convert samples with '
                   f'clip(round((x + 1) * 127.5), 0, 255) first)')
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def npz_files(path: str) -> list[str]:
  """The array names in an .npz; a truncated / corrupt / non-npz file -> FidError naming it."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return list(z.files)
  except _NPZ_ERRORS as e:
    raise FidError(f'{path}: not a readable .npz ({type(e).__name__}: {e})') from e


def npz_arrays(path: str, keys) -> dict[str, np.ndarray]:
  """Reads `keys` of an .npz in full; a truncated or corrupt member -> FidError naming the file and key."""
  out, k = {}, None
  try:
    with np.load(path, allow_pickle=False) as z:
      for k in keys:
        out[k] = np.asarray(z[k])
  except _NPZ_ERRORS as e:
    raise FidError(f'{path}: cannot read {k!r} ({type(e).__name__}: {e})') from e
  return out


def _npz_images(path: str) -> ImageSource | None:
  key = next((k for k in IMAGE_KEYS if k in npz_files(path)), None)
  if key is None:
    return None
  arr = npz_arrays(path, [key])[key]
  if arr.ndim < 1:
    raise FidError(f'{path}: {key!r} is a scalar, expected images [N, H, W, 3]')
  return ImageSource(f'{path}[{key}]', arr.shape[0], lambda lo, hi: np.asarray(arr[lo:hi]))


def _read_image(path: str) -> np.ndarray:
  """One image file -> uint8 [H, W, 3]; an unreadable / truncated file -> FidError naming it."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except (OSError, ValueError, SyntaxError) as e:    # PIL's UnidentifiedImageError is an OSError
    raise FidError(f'{path}: cannot read the image ({type(e).__name__}: {e})') from e


def _folder_images(path: str) -> ImageSource:
  files = sorted(f for f in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                 if f.lower().endswith(_IMAGE_EXTS))
  if not files:
    raise FidError(f'image folder {path!r} holds no {"/".join(_IMAGE_EXTS)} files')

  def get(lo, hi):
    imgs = [_read_image(f) for f in files[lo:hi]]
    shapes = {a.shape for a in imgs}
    if len(shapes) > 1:
      raise FidError(f'{path}: images of different sizes {sorted(shapes)} (e.g. {files[lo]}); resize them first')
    return np.stack(imgs)
  return ImageSource(path, len(files), get)


def open_images(path: str) -> ImageSource:
  """An image npz or an image folder -> ImageSource."""
  if os.path.isdir(path):
    return _folder_images(path)
  if not os.path.isfile(path):
    raise FidError(f'{path!r} does not exist')
  if not path.endswith('.npz'):
    raise FidError(f'{path!r}: expected an .npz of images or a folder of images')
  src = _npz_images(path)
  if src is None:
    raise FidError(f'{path!r} holds no images (keys {npz_files(path)}; expected one of {IMAGE_KEYS})')
  return src
