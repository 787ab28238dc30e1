"""Isolated-pixel noise ("speckle") of generated images, measured against FP samples.

A feature-space FID can be blind to speckle: isolated bright or dark pixels that quantized diffusion models put on
otherwise clean samples (issue 14, part 6). This module measures it in pixel space.

Definitions (images `x` are `[N, H, W, C]` arrays, e.g. samples in [-1, 1]; every channel is filtered on its own):

- `median3(x)`: the 3x3 median filter of each image, the border edge-replicated (a pixel outside the image takes
  the value of the nearest pixel inside; `scipy.ndimage.median_filter(x, size=(1, 3, 3, 1), mode='nearest')`).
- `isolated_residual(x) = x - median3(x)`: what a 3x3 median removes. It is 0 on constant regions, inside
  linear ramps (away from the image corners) and on straight horizontal / vertical edges between two flat
  regions; an isolated pixel of height h on a flat background keeps exactly h (its window, the replicated border
  included, holds at most 4 copies of it among 9, so the median is the background), and the background around it
  keeps 0.
- `speckle_energy(x)`: the mean over images of the mean squared residual per pixel,
  (1/N) sum_n (1/(H W C)) sum_{h,w,c} r[n,h,w,c]^2. A flat image with one pixel of height h: h^2 / (H W C).
- `speckle_ratio(x, fp) = speckle_energy(x) / speckle_energy(fp)`: above 1 = more isolated-pixel energy than the
  FP samples. The ratio compares sets (sample i of `x` need not correspond to sample i of `fp`, and N may differ);
  it is not a paired difference. The FP energy is not 0 on digits: a 3x3 median also trims stroke ends, corners
  and 1-pixel-wide strokes, which is why the measure is reported against FP samples rather than in absolute units.
- `speckle_share(x, threshold=0.5)`: the share of pixels with |residual| > threshold (0.5 = a quarter of the
  [-1, 1] range), a count-style companion: how many pixels are speckle rather than how much energy they carry.

Bad input raises ValueError: not a 4-d array, an empty batch or image, non-finite values, or (for the ratio)
image sizes that differ or FP samples with zero speckle energy (the ratio is then undefined).
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage

__all__ = ['median3', 'isolated_residual', 'speckle_energy', 'speckle_share', 'speckle_ratio']


def _images(x, name: str = 'images') -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 4:
    raise ValueError(f'{name}: expected an [N, H, W, C] array, got shape {x.shape}')
  if min(x.shape) == 0:
    raise ValueError(f'{name}: empty array of shape {x.shape}')
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise ValueError(f'{name}: expected real numbers, got dtype {x.dtype}')
  x = x.astype(np.float64)
  if not np.isfinite(x).all():
    raise ValueError(f'{name}: {int((~np.isfinite(x)).sum())} non-finite value(s)')
  return x


def median3(images) -> np.ndarray:
  """The 3x3 median filter of every image and channel, edge-replicated border ([N, H, W, C], float64)."""
  return scipy.ndimage.median_filter(_images(images), size=(1, 3, 3, 1), mode='nearest')


def isolated_residual(images) -> np.ndarray:
  """images - median3(images): the isolated-pixel part of each image ([N, H, W, C], float64)."""
  x = _images(images)
  return x - median3(x)


def speckle_energy(images) -> float:
  """Mean over images of the mean squared isolated-pixel residual."""
  return float(np.mean(isolated_residual(images) ** 2))


def speckle_share(images, threshold: float = 0.5) -> float:
  """Share of pixels whose |isolated-pixel residual| exceeds `threshold` (in the images' units)."""
  if not np.isfinite(threshold) or threshold < 0:
    raise ValueError(f'threshold: expected a finite value >= 0, got {threshold}')
  return float(np.mean(np.abs(isolated_residual(images)) > threshold))


def speckle_ratio(images, fp_images) -> float:
  """speckle_energy(images) / speckle_energy(fp_images): > 1 = more isolated-pixel noise than FP."""
  x, fp = _images(images), _images(fp_images, 'fp_images')
  if x.shape[1:] != fp.shape[1:]:
    raise ValueError(f'images of shape {x.shape[1:]} vs fp_images of shape {fp.shape[1:]}: the same [H, W, C] '
                     'is needed')
  ref = speckle_energy(fp)
  if ref == 0.0:
    raise ValueError('fp_images have zero speckle energy: the ratio is undefined')
  return speckle_energy(x) / ref
