"""PAR (progressively aligned reconstruction, METHOD.md section 4): regenerate the calibration set with the
*quantized* model, so the next reconstruction round trains on the error-carrying inputs the quantized model
really sees at inference.

  d = recapture(sampler_factory, quant_eps_fn, out_dir, num_samples=256, num_select=20, seed=0)

The recapture uses the same sampler (steps, eta, guidance), the same seeds (so x_T and the per-step noise match
the FP capture sample by sample) and the same selected steps; only eps_fn changes. Targets of the following
reconstruction come from the FP model evaluated on these x_t (asymmetric reconstruction, done by the caller).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from tcaq_jax.diffusion.capture import CalibData, capture

__all__ = ['recapture', 'round_dir']


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
