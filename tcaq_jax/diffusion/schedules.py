"""Noise schedules, DDIM step sequences and the per-step DDIM coefficients (NumPy, float64).

Two conventions exist in the public code and both are reproduced exactly:

  'ddim' (ermongroup/ddim runners/diffusion.py, functions/denoising.py):
    uniform: skip = T // S; seq = range(0, T, skip)
    quad:    seq = [int(s) for s in np.linspace(0, sqrt(0.8 T), S) ** 2]   (starts 0, 0, 0, 0 for S=100)
    the step after seq[0] goes to "t = -1" whose alpha_bar is 1 (the sample is the final x0 prediction).
  'ldm' (CompVis/latent-diffusion ldm/modules/diffusionmodules/util.py make_ddim_timesteps, ddim.py):
    uniform: c = T // S; seq = np.asarray(range(0, T, c)) + 1
    quad:    seq = (np.linspace(0, sqrt(0.8 T), S) ** 2).astype(int) + 1
    the step after seq[0] goes to alpha_bar[0] (make_ddim_sampling_parameters' alphas_prev).
  Note: LDM's uniform rule does not always give S steps (its assert is commented out): T=1000, S=400 gives
  c = 2 and 500 steps. We reproduce that, not a corrected count.

Step sequences are returned ascending (as the originals build them); the sampler walks them in reverse.
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ['ScheduleError', 'beta_schedule', 'alphas_cumprod', 'ddim_timesteps', 'DDIMCoefficients',
           'ddim_coefficients', 'schedule_from_config']

SKIP_TYPES = ('uniform', 'quad')
STYLES = ('ddim', 'ldm')


class ScheduleError(ValueError):
  """An unknown schedule / skip type / style, or an impossible number of steps."""


def beta_schedule(name: str, beta_start: float, beta_end: float, num_timesteps: int) -> np.ndarray:
  """Betas [T] float64.

  'linear'     : linspace(b0, b1, T)                      (DDPM / DDIM CIFAR-10)
  'ldm_linear' : linspace(sqrt(b0), sqrt(b1), T) ** 2     (latent diffusion's "linear"; DDIM's "quad")
  'quad'       : alias of 'ldm_linear' (the ddim repo's name for the same formula)
  'const'      : b1 * ones(T)
  """
  if num_timesteps < 1:
    raise ScheduleError(f'num_timesteps must be >= 1, got {num_timesteps}')
  if name == 'linear':
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name in ('ldm_linear', 'quad'):
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  elif name == 'const':
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  else:
    raise ScheduleError(f'unknown beta schedule {name!r} (known: linear, ldm_linear, quad, const)')
  return betas


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
  """alpha_bar_t = prod_{s<=t} (1 - beta_s), [T] float64."""
  return np.cumprod(1.0 - np.asarray(betas, np.float64))


def ddim_timesteps(num_timesteps: int, num_steps: int, skip_type: str = 'uniform',
                   style: str = 'ddim') -> np.ndarray:
  """Model timesteps visited by DDIM, ascending, int64 [S'] (S' = num_steps except LDM-uniform corner cases)."""
  if skip_type not in SKIP_TYPES:
    raise ScheduleError(f'unknown skip_type {skip_type!r} (known: {SKIP_TYPES})')
  if style not in STYLES:
    raise ScheduleError(f'unknown sampler style {style!r} (known: {STYLES})')
  if not 1 <= num_steps <= num_timesteps:
    raise ScheduleError(f'num_steps must be in [1, {num_timesteps}], got {num_steps}')
  if skip_type == 'uniform':
    skip = num_timesteps // num_steps
    seq = np.asarray(list(range(0, num_timesteps, skip)), dtype=np.int64)
  else:
    seq = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int64)
  if style == 'ldm':
    seq = seq + 1
  return seq


@dataclasses.dataclass(frozen=True)
class DDIMCoefficients:
  """Per-step DDIM constants in *sampling order* (index 0 = first, noisiest step), all [S].

  timesteps : int32, the model's t at each step
  alphas    : alpha_bar at t
  alphas_prev : alpha_bar at the next (less noisy) step
  sigmas    : eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  """
  timesteps: np.ndarray
  alphas: np.ndarray
  alphas_prev: np.ndarray
  sigmas: np.ndarray

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])


def ddim_coefficients(alpha_bar: np.ndarray, timesteps: np.ndarray, eta: float = 0.0,
                      style: str = 'ddim') -> DDIMCoefficients:
  """DDIM constants for an ascending step sequence.

  alpha_bar: [T] float64; timesteps: ascending ints [S]. style 'ddim': the last step lands on alpha_bar = 1;
  'ldm': on alpha_bar[0]. Returned in sampling order (descending t).
  """
  if style not in STYLES:
    raise ScheduleError(f'unknown sampler style {style!r} (known: {STYLES})')
  alpha_bar = np.asarray(alpha_bar, np.float64)
  seq = np.asarray(timesteps, np.int64)
  if seq.min() < 0 or seq.max() >= alpha_bar.shape[0]:
    raise ScheduleError(f'timesteps out of range [0, {alpha_bar.shape[0]}): {seq.min()}..{seq.max()}')
  if eta < 0:
    raise ScheduleError(f'eta must be >= 0, got {eta}')
  a = alpha_bar[seq]
  final = 1.0 if style == 'ddim' else alpha_bar[0]
  a_prev = np.concatenate([[final], alpha_bar[seq[:-1]]])
  # (1 - a / a_prev) is 0 for repeated timesteps (quad starts 0, 0, 0, 0): sigma = 0 there.
  sigmas = eta * np.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
  rev = slice(None, None, -1)
  return DDIMCoefficients(timesteps=seq[rev].astype(np.int32), alphas=a[rev], alphas_prev=a_prev[rev],
                          sigmas=sigmas[rev])


def schedule_from_config(config: dict) -> np.ndarray:
  """alpha_bar [T] from a model config's `diffusion` sub-dict (beta_schedule, beta_start, beta_end,
  num_timesteps)."""
  d = config.get('diffusion')
  if d is None:
    raise ScheduleError(f'config {config.get("name")!r} has no "diffusion" sub-dict')
  try:
    betas = beta_schedule(d['beta_schedule'], d['beta_start'], d['beta_end'], d['num_timesteps'])
  except KeyError as e:
    raise ScheduleError(f'config {config.get("name")!r} diffusion sub-dict lacks key {e}') from e
  return alphas_cumprod(betas)
