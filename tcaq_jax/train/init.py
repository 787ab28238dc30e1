"""Initialisation of the quantizer state: step slots, TCR ratios, weight scales, AdaRound alphas.

  step_slot, k = step_slots(n_steps, calib_steps, per_step=True)
  peaks = collect_peaks(forward, paths, data, slot_ids, k)          # {path: [K, C]} per-slot channel peaks
  r = tcr_ratios(peaks, r_tru=3.0)                                  # {path: [C]}
  layers = init_weights(params, policy, r, method='lp', adaround=True)
Activation scales and DAQ come from `act_search.py`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.quant.adaround import init_alpha
from tcaq_jax.quant.intercept import collect_calls
from tcaq_jax.quant.ranges import lp_error, lp_search_params, minmax_params, params_from_range
from tcaq_jax.quant.uniform import fake_quant
from tcaq_jax.quant.state import LayerQState
from tcaq_jax.quant.tcr import scale_kernel_inputs, tcr_ratio

__all__ = ['InitError', 'step_slots', 'collect_peaks', 'tcr_ratios', 'init_weights', 'get_kernel']


class InitError(ValueError):
  """Calibration statistics are missing or not finite (names the layer)."""


def step_slots(n_steps: int, calib_steps: Sequence[int], per_step: bool = True) -> tuple[np.ndarray, int]:
  """Maps every sampler step index 0..n_steps-1 to a calibration slot.

  calib_steps: the sampler step indices that were captured (K of them, any order). per_step=False gives one
  slot for all steps. Returns (step_slot int32 [n_steps], K). Steps between captured ones take the nearest.
  """
  if not per_step:
    return np.zeros(n_steps, np.int32), 1
  cs = np.asarray(sorted(set(int(s) for s in calib_steps)))
  if cs.size == 0:
    raise InitError('step_slots: no calibration steps')
  slot = np.abs(np.arange(n_steps)[:, None] - cs[None, :]).argmin(axis=1).astype(np.int32)
  return slot, int(cs.size)


def calib_slot_ids(step_slot: np.ndarray, step_index: np.ndarray) -> np.ndarray:
  """Slot of every calibration sample. step_index: [N] int -> [N] int32."""
  return np.asarray(step_slot)[np.asarray(step_index, np.int64)].astype(np.int32)


def collect_peaks(forward: Callable, paths: Sequence[str], data: Sequence[np.ndarray], slot_ids: np.ndarray,
                  num_slots: int, batch: int = 64, consts: Any = None) -> dict:
  """Per-slot per-channel peaks max|x| of the inputs of the layers at `paths`.

  forward(consts, *data_batch) runs the (FP) model (consts: params, passed as jit arguments); data: arrays [N, ...]; slot_ids: [N]. Returns {path: [K, C]}.
  """
  paths = set(paths)

  def peaks(slots, call):
    x = jnp.abs(call.args[0].astype(jnp.float32))
    per = jnp.max(x.reshape(x.shape[0], -1, x.shape[-1]), axis=1)          # [B, C]
    return jax.ops.segment_max(per, slots, num_segments=num_slots)

  def run(consts, slots, *d):
    return collect_calls(lambda: forward(consts, *d), select=lambda path, m: path in paths,
                         record=functools.partial(peaks, slots), need_args=True)[1]

  fn = jax.jit(run)
  acc: dict = {}
  n = int(data[0].shape[0])
  for i in range(0, n, batch):
    res = fn(consts, jnp.asarray(slot_ids[i:i + batch]), *[jnp.asarray(a[i:i + batch]) for a in data])
    for p, v in res.items():
      v = np.maximum(np.asarray(v), 0.)
      acc[p] = v if p not in acc else np.maximum(acc[p], v)
  missing = paths - set(acc)
  if missing:
    raise InitError(f'collect_peaks: layers never called in the forward pass: {sorted(missing)[:5]}')
  for p, v in acc.items():
    if not np.all(np.isfinite(v)):
      raise InitError(f'collect_peaks: non-finite activation peaks at layer {p!r}')
  return acc


def tcr_ratios(peaks: dict, r_tru: float | None = None, target: str = 'min') -> dict:
  """{path: [K, C]} peaks -> {path: r [C] float32} (METHOD.md section 2). r_tru <= 0 or None: no truncation."""
  r_tru = r_tru if r_tru and r_tru > 0 else None
  return {p: jnp.asarray(tcr_ratio(m, r_tru=r_tru, target=target), jnp.float32) for p, m in peaks.items()}


def get_kernel(params: Any, path: str):
  node = params
  for seg in path.split('/'):
    node = node[seg]
  return node['kernel']


def _rows(w):
  """kernel [..., in, out] -> [out, fan_in]."""
  return w.reshape(-1, w.shape[-1]).T


@functools.partial(jax.jit, static_argnames=('bits', 'p'))
def _lp_candidate(x, lo, hi, f, best_err, best_s, best_z, bits, p):
  s, z = params_from_range(lo * f, hi * f, bits)
  err = lp_error(x, fake_quant(x, s, z, bits), p, channel_axis=0)
  better = err < best_err
  return jnp.where(better, err, best_err), jnp.where(better, s, best_s), jnp.where(better, z, best_z)


def _lp_search_host(x, bits: int, p: float, n_candidates: int, step: float = 0.01):
  """`ranges.lp_search_params(x, bits, channel_axis=0, p, n_candidates)` with the candidate loop on the host
  (XLA:CPU runs while-loop bodies single-threaded and much slower than top-level ops). Same candidates, same
  strict-improvement tie rule."""
  lo = jnp.min(x, axis=1, keepdims=True)
  hi = jnp.max(x, axis=1, keepdims=True)
  s0, z0 = params_from_range(lo, hi, bits)
  best = (jnp.full(s0.shape, jnp.inf, jnp.float32), s0, z0)
  for i in range(n_candidates):
    best = _lp_candidate(x, lo, hi, jnp.float32(1. - step * i), *best, bits=bits, p=p)
  return best[1], best[2]


def _lp_search_packed(mats: list, bits: int, p: float, n_candidates: int, max_elems: int = 1 << 24):
  """Per-row Lp search over many [rows_i, len_i] matrices with few compiled shapes.

  Rows of equal length are stacked (CPU: one group per length, the candidate loop on the host); on accelerators
  all rows are zero-padded to the longest length and searched by one compiled `lp_search_params` (zero is
  exactly representable, the range always contains 0, so padding adds no error and only rescales a row's
  mean error: the argmin is unchanged). Returns a list of (scale [rows_i], zero [rows_i]).
  """
  host = jax.default_backend() == 'cpu'
  if host:
    fn = functools.partial(_lp_search_host, bits=bits, p=p, n_candidates=n_candidates)
    groups = {}
    for k, m in enumerate(mats):
      groups.setdefault(m.shape[1], []).append(k)
  else:
    fn = jax.jit(lambda x: lp_search_params(x, bits, channel_axis=0, p=p, n_candidates=n_candidates))
    groups = {max(m.shape[1] for m in mats): list(range(len(mats)))}
  out = [None] * len(mats)
  for length, ks in groups.items():
    total = sum(mats[k].shape[0] for k in ks)
    chunk = max(64, min(max_elems // length, total))
    chunk = int(-(-chunk // 64) * 64)
    packed = np.zeros((-(-total // chunk) * chunk, length), np.float32)
    r = 0
    for k in ks:
      packed[r:r + mats[k].shape[0], :mats[k].shape[1]] = np.asarray(mats[k])
      r += mats[k].shape[0]
    scales, zeros = [], []
    for i in range(0, packed.shape[0], chunk):
      s, z = fn(jnp.asarray(packed[i:i + chunk]))
      scales.append(np.asarray(s).reshape(-1))
      zeros.append(np.asarray(z).reshape(-1))
    scales, zeros = np.concatenate(scales), np.concatenate(zeros)
    r = 0
    for k in ks:
      out[k] = (scales[r:r + mats[k].shape[0]], zeros[r:r + mats[k].shape[0]])
      r += mats[k].shape[0]
  return out


def init_weights(params: Any, policy, ratios: dict | None = None, method: str = 'lp', adaround: bool = True,
                 p: float = 2.4, n_candidates: int = 80, split: bool = False) -> dict:
  """Weight quantizer state for every layer whose weights the policy quantizes (plus TCR-only layers).

  Scales per output channel (axis -1) of W diag(r): 'lp' (BRECQ Lp search, all layers of one bit width in
  one compiled call) or 'minmax'. split: a layer whose input is split at a concatenation (spec.split) gets one
  per-output-channel quantizer per input segment, as Q-Diffusion's `weight_quantizer` / `weight_quantizer_0`;
  its w_scale / w_zero are then kernel-shaped but one ([1, .., Cin, Cout], constant over each segment's input
  rows). Returns {path: LayerQState(w_scale, w_zero (keepdims [1, .., Cout]), [alpha], [r])}.
  """
  if method not in ('lp', 'minmax'):
    raise InitError(f'unknown weight init method {method!r} (lp | minmax)')
  ratios = ratios or {}
  out, kernels, parts = {}, {}, {}
  for spec in policy.layers.values():
    st = {}
    if spec.path in ratios and spec.acts:
      st['r'] = jnp.asarray(ratios[spec.path], jnp.float32)
    if spec.weights:
      w = jnp.asarray(get_kernel(params, spec.path), jnp.float32)
      w = scale_kernel_inputs(w, st['r']) if 'r' in st else w
      kernels[spec.path] = w
      if split and spec.split:
        parts[(spec.path, 0)] = w[..., :spec.split, :]
        parts[(spec.path, 1)] = w[..., spec.split:, :]
      else:
        parts[(spec.path, None)] = w
    if st or spec.weights:
      out[spec.path] = st
  by_bits: dict = {}
  for key in parts:
    by_bits.setdefault(policy.layers[key[0]].w_bits, []).append(key)
  found = {}
  for bits, keys in by_bits.items():
    if method == 'lp':
      res = _lp_search_packed([_rows(parts[k]) for k in keys], bits, p, n_candidates)
    else:
      res = [tuple(np.asarray(a).reshape(-1) for a in minmax_params(_rows(parts[k]), bits, channel_axis=0))
             for k in keys]
    found.update(zip(keys, res))
  for q, w in kernels.items():
    shape = (1,) * (w.ndim - 1) + (w.shape[-1],)
    if (q, None) in found:
      scale, zero = (jnp.asarray(a, jnp.float32).reshape(shape) for a in found[(q, None)])
    else:
      seg_shapes = [parts[(q, i)].shape[:-1] for i in (0, 1)]
      scale, zero = (jnp.concatenate([jnp.broadcast_to(jnp.asarray(found[(q, i)][j], jnp.float32).reshape(shape),
                                                       (1,) * (w.ndim - 2) + (seg_shapes[i][-1], w.shape[-1]))
                                      for i in (0, 1)], axis=-2) for j in (0, 1))
    st = out[q]
    st['w_scale'], st['w_zero'] = scale, zero
    if adaround:
      st['alpha'] = init_alpha(w, scale, zero)
  return {path: LayerQState(**st) for path, st in out.items()}
