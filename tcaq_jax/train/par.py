"""PAR (progressively aligned reconstruction, METHOD.md section 4): regenerate the calibration set with the
*quantized* model, so the next reconstruction round trains on the error-carrying inputs the quantized model
really sees at inference.

  d = recapture(sampler_factory, quant_eps_fn, out_dir, num_samples=256, num_select=20, seed=0)

The recapture uses the same sampler (steps, eta, guidance), the same seeds (so x_T and the per-step noise match
the FP capture sample by sample) and the same selected steps; only eps_fn changes. Targets of the following
reconstruction come from the FP model evaluated on these x_t (asymmetric reconstruction, done by the caller).

Calibration-set helpers of every round: `flat_data(capture)` -> {'x', 't', 'step', 'cond'} flat arrays (uncond
copies with guidance), `recon_subset(data, size, seed)` -> a random subset for reconstruction.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from tcaq_jax.diffusion.capture import CalibData, capture

__all__ = ['recapture', 'round_dir', 'flat_data', 'recon_subset', 'step_absmax', 'in_range']


def round_dir(out_dir: str, rnd: int) -> str:
  """Where round `rnd`'s calibration set lives (round 0 = the FP capture)."""
  return os.path.join(out_dir, f'calib_round{rnd}')


def recapture(sampler_factory: Callable, eps_fn: Any, out_dir: str, num_samples: int, num_select: int,
              seed: int, batch_size: int = 64, cond: Any = None, uncond: Any = None,
              meta: dict | None = None) -> CalibData:
  """One sampling pass with `sampler_factory(eps_fn)` recording x_t at `num_select` evenly spaced steps.

  Reuses a complete capture already in out_dir (a resumed run). Returns the CalibData.
  """
  if not os.path.isfile(os.path.join(out_dir, 'index.json')):
    capture(sampler_factory(eps_fn), out_dir, num_samples=num_samples, num_select=num_select, seed=seed,
            batch_size=batch_size, cond=cond, uncond=uncond, meta=meta)
  return CalibData(out_dir)


def flat_data(cd: CalibData, guidance: bool) -> dict:
  """A capture -> flat arrays {'x' [N,...], 't' [N], 'step' [N], 'cond' [N]} (plus uncond copies with CFG)."""
  k, n = cd.num_steps, cd.num_samples
  x = np.asarray(cd.x, np.float32).reshape((k * n,) + cd.x.shape[2:])
  t = np.repeat(cd.t.astype(np.int32), n)
  s = np.repeat(cd.step_index.astype(np.int32), n)
  c = np.tile(np.asarray(cd.cond, np.int32), k) if cd.cond is not None else np.zeros((k * n,), np.int32)
  data = {'x': x, 't': t, 'step': s, 'cond': c}
  if guidance and cd.uncond is not None:
    u = np.tile(np.asarray(cd.uncond, np.int32), k)
    data = {'x': np.concatenate([x, x]), 't': np.concatenate([t, t]), 'step': np.concatenate([s, s]),
            'cond': np.concatenate([c, u])}
  return data


def recon_subset(data: dict, size: int, seed: int) -> dict:
  """A random subset of `size` samples of a flat data dict (all when size is 0 or not smaller)."""
  n = data['x'].shape[0]
  if not size or size >= n:
    return data
  idx = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
  return {k: v[idx] for k, v in data.items()}


def split_holdout(data: dict, size: int, holdout: int, seed: int) -> tuple[dict, dict | None]:
  """(reconstruction set, held-out set or None). The reconstruction set is `recon_subset(data, size, seed)` when
  `holdout` samples are left outside it (so holding out changes nothing else); otherwise the missing held-out
  samples come from it, at most a quarter of it."""
  n = data['x'].shape[0]
  idx = (np.sort(np.random.default_rng(seed).choice(n, size, replace=False)) if size and size < n
         else np.arange(n))
  if holdout <= 0:
    return {k: v[idx] for k, v in data.items()}, None
  rng = np.random.default_rng(seed + 1)
  rest = np.setdiff1d(np.arange(n), idx)
  if len(rest) >= holdout:
    hold = np.sort(rng.choice(rest, holdout, replace=False))
  else:
    pick = np.sort(rng.choice(len(idx), min(holdout - len(rest), len(idx) // 4), replace=False))
    hold = np.sort(np.concatenate([rest, idx[pick]]))
    idx = np.delete(idx, pick)
  train = {k: v[idx] for k, v in data.items()}
  return train, ({k: v[hold] for k, v in data.items()} if len(hold) else None)


def _input_absmax(data: dict) -> np.ndarray:
  """[N]: max |x| of each input of the flat data."""
  return np.abs(np.asarray(data['x'], np.float32)).reshape(len(data['x']), -1).max(axis=1)


def step_absmax(data: dict) -> dict:
  """{sampler step: max |x| over the flat data's inputs at that step}."""
  x = _input_absmax(data)
  steps = np.asarray(data['step'])
  return {int(s): float(x[steps == s].max()) for s in np.unique(steps)}


def in_range(data: dict, fp_absmax: dict, factor: float) -> np.ndarray:
  """[N] bool: the recaptured inputs (flat `data`) whose max |x| is at most `factor` times the FP capture's max
  |x| at the same sampler step (`step_absmax` of the FP capture; --par_x_range). A step whose inputs would all be
  dropped keeps them all; a step the FP capture lacks keeps its inputs."""
  x = _input_absmax(data)
  steps = np.asarray(data['step'])
  keep = np.ones(x.shape, bool)
  for s in np.unique(steps):
    if int(s) not in fp_absmax:
      continue
    at = steps == s
    ok = x[at] <= factor * fp_absmax[int(s)]
    if ok.any():
      keep[at] = ok
  return keep
