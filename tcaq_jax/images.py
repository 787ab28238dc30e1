"""Image files: [-1, 1] floats -> uint8 exactly like the DDIM repository, the evaluator's .npz, PNG grids.

  u8 = to_uint8(images)                          # float [-1, 1] [N, H, W, C] -> uint8
  save_npz('samples/x.npz', u8)                  # arr_0 uint8 [N, H, W, C] (guided-diffusion's evaluator format)
  save_grid('samples/grid.png', u8, scale=4)     # one PNG, tiles upscaled by `scale`
"""
from __future__ import annotations

import math
import os

import numpy as np

__all__ = ['to_uint8', 'save_npz', 'save_grid', 'grid_scale']


def to_uint8(x) -> np.ndarray:
  """[-1, 1] float -> uint8 exactly like the DDIM repo: clamp((x + 1) / 2, 0, 1) * 255 + 0.5, floored."""
  x01 = np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return np.floor(x01 * 255.0 + 0.5).astype(np.uint8)


def save_npz(path: str, images: np.ndarray) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, arr_0=images)


def grid_scale(width: int, target: int = 128) -> int:
  """Upscale factor that makes tiles of `width` pixels about `target` pixels wide."""
  return max(1, target // int(width))


def save_grid(path: str, images: np.ndarray, nrow: int | None = None, pad: int = 1, scale: int = 1) -> None:
  """images: uint8 [N, H, W, C] (C 1 or 3) -> one PNG, nrow per row, `pad` black pixels between tiles."""
  from PIL import Image
  n, h, w, c = images.shape
  nrow = nrow or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / nrow))
  grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
  for k in range(n):
    r, q = divmod(k, nrow)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[k]
  img = Image.fromarray(grid[..., 0] if c == 1 else grid)
  if scale != 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
