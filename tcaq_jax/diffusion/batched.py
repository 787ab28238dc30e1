"""The one batched-sampling loop: N samples from a sampler in batches, sample i depending only on (seed, i).

  for sl, out in sample_batches(sampler, num_samples=1000, batch_size=64, seed=0):
    images[sl] = out['images']
  images = sample_all(sampler, 1000, 64, seed=0)           # float images [N, ...] concatenated

sampler: a `DDIMSampler` or `HostLoopSampler` (same `sample(seed, start, batch_size, cond, uncond, record)`).
cond / uncond: arrays with leading axis num_samples, or None.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

__all__ = ['sample_batches', 'sample_all']


def sample_batches(sampler, num_samples: int, batch_size: int, seed: int = 0, cond: Any = None,
                   uncond: Any = None, record=None, progress: bool = False, desc: str = 'sampling',
                   first: int = 0, pad: bool = False) -> Iterator[tuple[slice, dict]]:
  """Yields (slice into this call's num_samples, the sampler's output dict) per batch, in order. Sample j of
  the call is global sample index first + j (hosts of a multi-host run each take their own `first`).
  pad: a last partial batch is sampled at the full batch_size (the extra samples are dropped from the output),
  so every call runs the one program compiled for batch_size; the kept samples are the same either way."""
  if num_samples < 0 or batch_size < 1:
    raise ValueError(f'num_samples ({num_samples}) must be >= 0 and batch_size ({batch_size}) >= 1')
  starts = range(0, num_samples, batch_size)
  if progress:
    from tqdm import tqdm
    starts = tqdm(starts, desc=desc, unit='batch')
  for start in starts:
    bs = min(batch_size, num_samples - start)
    sl = slice(start, start + bs)
    c = None if cond is None else np.asarray(cond)[sl]
    u = None if uncond is None else np.asarray(uncond)[sl]
    if not pad or bs == batch_size:
      yield sl, sampler.sample(seed, first + start, bs, cond=c, uncond=u, record=record)
      continue
    extra = batch_size - bs
    c, u = (None if a is None else np.concatenate([a, np.repeat(a[-1:], extra, 0)]) for a in (c, u))
    out = sampler.sample(seed, first + start, batch_size, cond=c, uncond=u, record=record)
    yield sl, {k: None if v is None else v[:, :bs] if k == 'recorded' else v[:bs] for k, v in out.items()}


def sample_all(sampler, num_samples: int, batch_size: int, seed: int = 0, cond: Any = None, uncond: Any = None,
               progress: bool = False, key: str = 'images', convert=np.asarray, pad: bool = False) -> np.ndarray:
  """convert(out[key]) of every batch, concatenated along axis 0 (pad: as in `sample_batches`)."""
  return np.concatenate([convert(out[key]) for _, out in
                         sample_batches(sampler, num_samples, batch_size, seed, cond, uncond, progress=progress,
                                        pad=pad)])
