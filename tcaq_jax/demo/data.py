"""The demo's data: scikit-learn's bundled 8x8 digits at 16x16.

  images, labels = load_digits_16()               # [1797, 16, 16, 1] float32 in [-1, 1], [1797] int32
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['load_digits_16', 'from_uint8']


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
