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

  bias, scale, info = fit(setup.sampler(setup.fp_eps), make_error_sum(q_fwd, fp_fwd), (params, qstate), params,
                          num_samples, batch, seed, mode, cache=setup.eps_fit_cache)

The FP trajectories and FP eps of a fit depend only on the FP model, the seed and the sizes: `cache` (a dict the
caller keeps for one FP model) holds them, so that later fits (the gate fits one per reconstruction stage) run only
the quantized model (a third of the forwards).

--eps_scale also removes the part of the error that is proportional to eps itself (PTQD's "correlated noise",
section 3.2 of its paper: eps_q = (1 + k) eps_fp + noise). Per step i, on the same trajectories and calls, it
fits d = k[i] eps_fp + bias[i] + residual by least squares (k one scalar per step, bias at the mode's
granularity: its group means centre d and eps_fp), and corrects

  eps = (eps_q - bias[i]) * scale[i],   scale[i] = 1 / (1 + k[i])        `QState.out_bias`, `QState.out_scale`

which returns eps_fp exactly when the error is k eps_fp + bias (`scale_fit` from the sums the fit keeps; without
the scale the bias is the plain mean error, as before).

--eps_bias_rounds > 1 refits: round r > 0 measures the error left by the correction so far on trajectories of the
corrected quantized model (the inputs it meets when sampling; same noise) and adds it to the bias, divided by the
scale so that the corrected output moves by exactly that error (`fit_rounds`; the scale stays the first fit's).
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['MODES', 'SEED_OFFSET', 'CACHE_BYTES', 'ErrorFns', 'bias_shape', 'make_error_sum', 'reduce', 'scale_fit', 'fit', 'fit_rounds']

MODES = ('off', 'channel', 'pixel')
SEED_OFFSET = 2          # the trajectories' seed: --seed + 2 (the capture uses --seed, the sample grid --seed + 1)
CACHE_BYTES = 2 ** 31    # FP trajectories + eps are cached only below this size (host memory)


class ErrorFns(NamedTuple):
  """fp(fp_consts, x, t, step, cond) -> eps_fp (float32); err(q_consts, eps_fp, x, t, step, cond) -> the sums."""
  fp: Callable
  err: Callable


def make_error_sum(q_fwd: Callable, fp_fwd: Callable) -> ErrorFns:
  """`ErrorFns`, both jitted: err(q_consts, eps_fp [B,..], x [B,..], t [B], step [B], cond [B]) -> sums over B
  (float32) of {'d': d = eps_q - eps_fp [*sample], 'fp': eps_fp [*sample], 'd_fp': d * eps_fp [],
  'fp_fp': eps_fp^2 []}."""
  @jax.jit
  def fp(fp_consts, x, t, step, cond):
    return fp_fwd(fp_consts, x, t, step, cond).astype(jnp.float32)

  @jax.jit
  def err(q_consts, e_fp, x, t, step, cond):
    d = q_fwd(q_consts, x, t, step, cond).astype(jnp.float32) - e_fp
    return {'d': jnp.sum(d, axis=0), 'fp': jnp.sum(e_fp, axis=0), 'd_fp': jnp.sum(d * e_fp),
            'fp_fp': jnp.sum(e_fp * e_fp)}
  return ErrorFns(fp, err)


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


def scale_fit(sums: dict, count: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """(bias [n_steps, *stored], k [n_steps]): per step the least-squares fit of d = k eps_fp + bias from `fit`'s
  sums over `count` calls (leading axis: steps; 'd', 'fp' [*sample], 'd_fp', 'fp_fp' scalars), bias at the
  mode's granularity, float64."""
  n = sums['d'].shape[0]
  md_g, mf_g = reduce(sums['d'] / count, mode), reduce(sums['fp'] / count, mode)       # group means
  md, mf = np.broadcast_to(md_g, sums['d'].shape), np.broadcast_to(mf_g, sums['fp'].shape)
  flat = lambda a: a.reshape(n, -1).sum(1)                                            # noqa: E731
  cross = sums['d_fp'] - flat(md * sums['fp']) - flat(mf * sums['d']) + count * flat(md * mf)
  var = sums['fp_fp'] - 2.0 * flat(mf * sums['fp']) + count * flat(mf * mf)
  k = cross / np.maximum(var, 1e-30)
  return md_g - k.reshape((n,) + (1,) * (md_g.ndim - 1)) * mf_g, k


def fit(sampler, err_fn: ErrorFns, q_consts: Any, fp_consts: Any, num_samples: int, batch: int, seed: int,
        mode: str, cond_fn: Callable[[int], tuple] | None = None, scale: bool = False,
        cache: dict | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
  """(bias [n_steps, *sample] float32, scale [n_steps] float32 or None, report entry). sampler: the FP sampler
  (`sample(seed, start, b, cond, uncond, record='all')`); num_samples is rounded up to whole batches of `batch`
  (the size the sampler is compiled for). cond_fn(n) -> (cond [n], uncond [n]) or (None, None) for
  unconditional models; with an uncond (guidance) the error is averaged over conditional and unconditional
  calls. scale: also fit --eps_scale's 1 / (1 + k) per step (module docstring). cache: the caller's dict for
  this FP model (None: nothing kept); only pass it with the FP sampler (the entries are its trajectories)."""
  t0 = time.time()
  b = max(1, min(batch, num_samples))
  n_batches = -(-num_samples // b)
  cond, uncond = cond_fn(n_batches * b) if cond_fn is not None else (None, None)
  ts = np.asarray(sampler.consts['timesteps'], np.int32)
  entries = None
  if cache is not None:
    per_entry = len(ts) * b * int(np.prod(sampler.shape)) * 4 * (2 + (uncond is not None))
    if per_entry * n_batches <= CACHE_BYTES:
      entries = cache.setdefault((seed, b, n_batches, cond is not None, uncond is not None), {})
  total, count = None, 0
  for j in range(n_batches):
    sl = slice(j * b, (j + 1) * b)
    c = None if cond is None else cond[sl]
    u = None if uncond is None else uncond[sl]
    calls = [c if c is not None else np.zeros((b,), np.int32)] + ([u] if u is not None else [])
    t_all = [jnp.full((b,), ts[i], jnp.int32) for i in range(len(ts))]
    s_all = [jnp.full((b,), i, jnp.int32) for i in range(len(ts))]
    if entries is not None and j in entries:
      xs, fps = entries[j]
    else:
      xs = sampler.sample(seed, j * b, b, cond=c, uncond=u, record='all')['recorded']    # [steps, b, ...]
      fps = [[err_fn.fp(fp_consts, xs[i], t_all[i], s_all[i], jnp.asarray(cc)) for cc in calls]
             for i in range(len(ts))]
      if entries is not None:                        # kept on the host
        entries[j] = jax.device_get((xs, fps))
    sums = []
    for i in range(len(ts)):
      per_call = [err_fn.err(q_consts, e_fp, xs[i], t_all[i], s_all[i], jnp.asarray(cc))
                  for cc, e_fp in zip(calls, fps[i])]
      sums.append(jax.tree.map(lambda *v: sum(v), *per_call))
    s = {k: np.asarray(jnp.stack([e[k] for e in sums]), np.float64) for k in sums[0]}
    total = s if total is None else {k: total[k] + s[k] for k in s}
    count += b * len(calls)
  mean = total['d'] / count
  if not np.all(np.isfinite(mean)):
    raise FloatingPointError(f'the eps bias fit gave non-finite values at steps '
                             f'{np.flatnonzero(~np.isfinite(mean).reshape(len(ts), -1).all(1)).tolist()}')
  out_scale = None
  if scale:
    bias, k = scale_fit(total, count, mode)
    if not np.all(np.isfinite(k)) or np.any(k <= -1.0):
      raise FloatingPointError(f'the eps scale fit gave k <= -1 or non-finite at steps '
                               f'{np.flatnonzero(~np.isfinite(k) | (k <= -1.0)).tolist()}')
    out_scale = (1.0 / (1.0 + k)).astype(np.float32)
    bias = bias.astype(np.float32)
  else:
    bias = reduce(mean, mode).astype(np.float32)
  info = {'mode': mode, 'samples': n_batches * b, 'seed': seed, 'seconds': time.time() - t0, **_step_stats(bias)}
  if out_scale is not None:
    info['scale_per_step'] = [float(v) for v in out_scale]
  return bias, out_scale, info


def fit_rounds(fp_sampler, err_fn: ErrorFns, with_bias: Callable, fp_consts: Any, rounds: int, num_samples: int,
               batch: int, seed: int, mode: str, cond_fn: Callable | None = None, scale: bool = False,
               cache: dict | None = None) -> tuple[np.ndarray, np.ndarray | None, dict]:
  """`fit` on FP trajectories, then rounds - 1 refits on the corrected quantized model's own trajectories, each
  adding the mean error still left (divided by the scale). with_bias(bias or None, scale or None) -> (the
  quantized sampler with that correction, the quantized consts err_fn takes: its output corrected by it).
  Returns (bias, scale or None, report entry: the last bias's per-step mean and rms, and per round the mean
  |added| and seconds). cache: `fit`'s, for the first fit (the FP trajectories)."""
  t0 = time.time()
  _, q_consts = with_bias(None, None)
  bias, out_scale, info = fit(fp_sampler, err_fn, q_consts, fp_consts, num_samples, batch, seed, mode, cond_fn,
                              scale, cache)
  per_round = [{'trajectories': 'fp', 'mean_abs_added': float(np.mean(np.abs(bias))), 'seconds': info['seconds']}]
  for _ in range(1, rounds):
    sampler, q_consts = with_bias(bias, out_scale)
    delta, _, d_info = fit(sampler, err_fn, q_consts, fp_consts, num_samples, batch, seed, mode, cond_fn)
    if out_scale is not None:        # (y - bias - delta / s) * s = corrected - delta
      delta = delta / out_scale.reshape((-1,) + (1,) * (delta.ndim - 1))
    bias = bias + delta
    per_round.append({'trajectories': 'quantized, corrected', 'mean_abs_added': float(np.mean(np.abs(delta))),
                      'seconds': d_info['seconds']})
  info.update(seconds=time.time() - t0, rounds=per_round, **_step_stats(bias))
  return bias, out_scale, info
