"""The output bias correction stage (--eps_bias): the quantized model's mean eps error per sampler step.

Quantization leaves a systematic part in the error of eps (the same sign at every step of a trajectory; ~2% of
its MSE, so the unit objectives do not see it), and the sampler integrates it along the trajectory. This stage
measures it after reconstruction, on FP sampling trajectories (x_t recorded at every sampler step i):

  bias[i] = mean over the trajectories of (eps_q(x_i, t_i, i) - eps_fp(x_i, t_i, i))     [n_steps, *sample]

averaged over the spatial axes too with 'channel', and stores it in `QState.out_bias`, which
`quant.apply.correct_output` subtracts from the quantized model's output at each step (sampling, export, the
integer path). With classifier-free guidance the mean runs over the conditional and the unconditional calls.
'channel' is close to the bias correction of PTQD (He et al., "PTQD: Accurate Post-Training Quantization for
Diffusion Models", NeurIPS 2023: the per-channel mean of the quantization noise at each step, subtracted from
the output), without PTQD's correlated-noise rescaling; 'pixel' (tcaq's default) keeps one value per pixel,
which measured much better on the demo (docs/results/fidelity.md). TCAQ-DM's paper does not correct the output
bias: `bench/demo_table.py`'s tcaq_paper rows keep it off.

  bias, info = fit(setup.sampler(setup.fp_eps), err_fn, (params, qstate), params, timesteps, ...)

--eps_bias_rounds > 1 refits: round r > 0 measures the error left by the correction so far on trajectories of the
corrected quantized model (the inputs it meets when sampling; same noise) and adds it (`fit_rounds`).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['MODES', 'SEED_OFFSET', 'bias_shape', 'make_error_sum', 'reduce', 'fit', 'fit_rounds']

MODES = ('off', 'channel', 'pixel')
SEED_OFFSET = 2          # the trajectories' seed: --seed + 2 (the capture uses --seed, the sample grid --seed + 1)


def make_error_sum(q_fwd: Callable, fp_fwd: Callable) -> Callable:
  """err(q_consts, fp_consts, x [B,..], t [B], step [B], cond [B]) -> sum over B of (eps_q - eps_fp), float32."""
  @jax.jit
  def err(q_consts, fp_consts, x, t, step, cond):
    d = q_fwd(q_consts, x, t, step, cond).astype(jnp.float32) - fp_fwd(fp_consts, x, t, step, cond)
    return jnp.sum(d, axis=0)
  return err


def bias_shape(num_steps: int, sample_shape, mode: str) -> tuple:
  """The stored bias's shape: [num_steps, *sample] ('pixel') or spatial axes of size 1 ('channel')."""
  shape = tuple(sample_shape)
  if mode == 'channel':
    shape = (1,) * (len(shape) - 1) + shape[-1:]
  elif mode != 'pixel':
    raise ValueError(f'--eps_bias={mode!r}: expected one of {list(MODES[1:])} for a fit')
  return (num_steps,) + shape


def _step_stats(bias: np.ndarray) -> dict:
  """Per-step mean and rms of a bias (report.json)."""
  flat = bias.reshape(bias.shape[0], -1).astype(np.float64)
  return {'mean_per_step': [float(v) for v in flat.mean(1)],
          'rms_per_step': [float(v) for v in np.sqrt((flat ** 2).mean(1))]}


def reduce(mean_error: np.ndarray, mode: str) -> np.ndarray:
  """The per-step mean error [n_steps, *sample] as the stored bias: as it is ('pixel'), or averaged over the
  spatial axes, keeping them as size 1 ('channel')."""
  bias_shape(mean_error.shape[0], mean_error.shape[1:], mode)            # checks the mode
  if mode == 'channel':
    return mean_error.mean(axis=tuple(range(1, mean_error.ndim - 1)), keepdims=True)
  return mean_error


def fit(sampler, err_fn: Callable, q_consts: Any, fp_consts: Any, num_samples: int, batch: int, seed: int,
        mode: str, cond_fn: Callable[[int], tuple] | None = None) -> tuple[np.ndarray, dict]:
  """(bias [n_steps, *sample] float32, report entry). sampler: the FP sampler (`sample(seed, start, b,
  cond, uncond, record='all')`); num_samples is rounded up to whole batches of `batch` (the size the sampler
  is compiled for). cond_fn(n) -> (cond [n], uncond [n]) or (None, None) for unconditional models; with an
  uncond (guidance) the error is averaged over conditional and unconditional calls."""
  t0 = time.time()
  b = max(1, min(batch, num_samples))
  n_batches = -(-num_samples // b)
  cond, uncond = cond_fn(n_batches * b) if cond_fn is not None else (None, None)
  ts = np.asarray(sampler.consts['timesteps'], np.int32)
  total, count = None, 0
  for j in range(n_batches):
    sl = slice(j * b, (j + 1) * b)
    c = None if cond is None else cond[sl]
    u = None if uncond is None else uncond[sl]
    xs = sampler.sample(seed, j * b, b, cond=c, uncond=u, record='all')['recorded']      # [steps, b, ...]
    calls = [c if c is not None else np.zeros((b,), np.int32)] + ([u] if u is not None else [])
    sums = []
    for i in range(len(ts)):
      t = jnp.full((b,), ts[i], jnp.int32)
      step = jnp.full((b,), i, jnp.int32)
      sums.append(sum(err_fn(q_consts, fp_consts, xs[i], t, step, jnp.asarray(cc)) for cc in calls))
    s = np.asarray(jnp.stack(sums), np.float64)
    total = s if total is None else total + s
    count += b * len(calls)
  mean = total / count
  if not np.all(np.isfinite(mean)):
    raise FloatingPointError(f'the eps bias fit gave non-finite values at steps '
                             f'{np.flatnonzero(~np.isfinite(mean).reshape(len(ts), -1).all(1)).tolist()}')
  bias = reduce(mean, mode).astype(np.float32)
  info = {'mode': mode, 'samples': n_batches * b, 'seed': seed, 'seconds': time.time() - t0, **_step_stats(bias)}
  return bias, info


def fit_rounds(fp_sampler, err_fn: Callable, with_bias: Callable, fp_consts: Any, rounds: int, num_samples: int,
               batch: int, seed: int, mode: str, cond_fn: Callable | None = None) -> tuple[np.ndarray, dict]:
  """`fit` on FP trajectories, then rounds - 1 refits on the corrected quantized model's own trajectories, each
  adding the mean error still left. with_bias(bias or None) -> (the quantized sampler with that correction, the
  quantized consts err_fn takes: its output corrected by it). Returns (bias, report entry: the last bias's
  per-step mean and rms, and per round the mean |added| and seconds)."""
  t0 = time.time()
  _, q_consts = with_bias(None)
  bias, info = fit(fp_sampler, err_fn, q_consts, fp_consts, num_samples, batch, seed, mode, cond_fn)
  per_round = [{'trajectories': 'fp', 'mean_abs_added': float(np.mean(np.abs(bias))), 'seconds': info['seconds']}]
  for _ in range(1, rounds):
    sampler, q_consts = with_bias(bias)
    delta, d_info = fit(sampler, err_fn, q_consts, fp_consts, num_samples, batch, seed, mode, cond_fn)
    bias = bias + delta
    per_round.append({'trajectories': 'quantized, corrected', 'mean_abs_added': float(np.mean(np.abs(delta))),
                      'seconds': d_info['seconds']})
  info.update(seconds=time.time() - t0, rounds=per_round, **_step_stats(bias))
  return bias, info
