"""Range initialisers for uniform quantizers: min-max, percentile, Lp grid search.

All return (scale, zero_point) as float32 keepdims arrays broadcastable to x: per tensor
(channel_axis=None) shape (1,) * x.ndim, per channel the channel axis keeps its size. Vectorised over channels
(no Python loop over channels); jit-safe with bits / channel_axis / flags static.

From a range [lo, hi]:
  asymmetric: lo <- min(lo, 0), hi <- max(hi, 0) (zero stays representable);
              scale = (hi - lo) / (qmax - qmin), zero_point = clip(qmin - round(lo / scale), qmin, qmax)
  symmetric:  zero_point = 0; signed: scale = max(|lo|, |hi|) / qmax; unsigned: scale = max(hi, 0) / qmax
"""
import functools

import jax
import jax.numpy as jnp

from tcaq_jax.quant.uniform import QuantConfigError, fake_quant, qrange

_EPS = 1e-8


def reduce_axes(ndim, channel_axis):
  """Axes reduced when computing stats: all axes (per tensor) or all but channel_axis."""
  if channel_axis is None:
    return tuple(range(ndim))
  if not -ndim <= channel_axis < ndim:
    raise QuantConfigError(f'tcaq_jax/quant/ranges.py: channel_axis {channel_axis} out of range for ndim {ndim}')
  ax = channel_axis % ndim
  return tuple(a for a in range(ndim) if a != ax)


@functools.partial(jax.jit, static_argnames=('bits', 'symmetric', 'signed'))
def params_from_range(lo, hi, bits, symmetric=False, signed=False):
  """(scale, zero_point) from range arrays lo, hi (same shape). See module docstring."""
  qmin, qmax = qrange(bits, signed)
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  if symmetric:
    if signed:
      scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / qmax
    else:
      scale = jnp.maximum(hi, 0.) / qmax
    scale = jnp.maximum(scale, _EPS)
    return scale, jnp.zeros_like(scale)
  lo = jnp.minimum(lo, 0.)
  hi = jnp.maximum(hi, 0.)
  scale = jnp.maximum((hi - lo) / (qmax - qmin), _EPS)
  zero_point = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)
  return scale, zero_point


@functools.partial(jax.jit, static_argnames=('bits', 'channel_axis', 'symmetric', 'signed'))
def minmax_params(x, bits, channel_axis=None, symmetric=False, signed=False):
  """Scale/zero point covering [min x, max x] (per tensor or per channel). x: any shape."""
  x = jnp.asarray(x, jnp.float32)
  axes = reduce_axes(x.ndim, channel_axis)
  lo = jnp.min(x, axis=axes, keepdims=True)
  hi = jnp.max(x, axis=axes, keepdims=True)
  return params_from_range(lo, hi, bits, symmetric, signed)


def _channel_rows(x, channel_axis):
  """x -> [C, N] rows per channel (C = 1 per tensor) and the keepdims shape of the stats."""
  if channel_axis is None:
    return x.reshape(1, -1), (1,) * x.ndim
  ax = channel_axis % x.ndim
  shape = [1] * x.ndim
  shape[ax] = x.shape[ax]
  return jnp.moveaxis(x, ax, 0).reshape(x.shape[ax], -1), tuple(shape)


@functools.partial(jax.jit, static_argnames=('bits', 'channel_axis', 'symmetric', 'signed'))
def percentile_params(x, bits, pct=99.99, channel_axis=None, symmetric=False, signed=False):
  """Scale/zero point covering the [100 - pct, pct] percentiles (per tensor or per channel)."""
  x = jnp.asarray(x, jnp.float32)
  rows, shape = _channel_rows(x, channel_axis)
  hi = jnp.percentile(rows, pct, axis=1).reshape(shape)
  lo = jnp.percentile(rows, 100. - pct, axis=1).reshape(shape)
  return params_from_range(lo, hi, bits, symmetric, signed)


def lp_error(x, x_hat, p=2.4, channel_axis=None):
  """mean |x - x_hat|^p over the non-channel axes (keepdims)."""
  axes = reduce_axes(x.ndim, channel_axis)
  return jnp.mean(jnp.abs(x - x_hat) ** p, axis=axes, keepdims=True)


@functools.partial(jax.jit, static_argnames=('bits', 'channel_axis', 'p', 'n_candidates', 'symmetric', 'signed', 'step'))
def lp_search_params(x, bits, channel_axis=None, p=2.4, n_candidates=80, symmetric=False, signed=False,
                     step=0.01):
  """BRECQ-style Lp grid search: candidates [lo, hi] * (1 - step * i), i = 0..n_candidates-1; keeps, per
  channel, the candidate with the lowest mean |x - fake_quant(x)|^p (first one on ties).

  x: any shape. A `lax.scan` over candidates keeps memory at O(x.size). Returns (scale, zero_point).
  """
  x = jnp.asarray(x, jnp.float32)
  axes = reduce_axes(x.ndim, channel_axis)
  lo = jnp.min(x, axis=axes, keepdims=True)
  hi = jnp.max(x, axis=axes, keepdims=True)

  def body(carry, i):
    best_err, best_s, best_z = carry
    f = 1. - step * i.astype(jnp.float32)
    s, z = params_from_range(lo * f, hi * f, bits, symmetric, signed)
    err = lp_error(x, fake_quant(x, s, z, bits, signed), p, channel_axis)
    better = err < best_err
    return (jnp.where(better, err, best_err), jnp.where(better, s, best_s), jnp.where(better, z, best_z)), None

  s0, z0 = params_from_range(lo, hi, bits, symmetric, signed)
  init = (jnp.full(s0.shape, jnp.inf, jnp.float32), s0, z0)
  (_, scale, zero_point), _ = jax.lax.scan(body, init, jnp.arange(n_candidates))
  return jax.lax.stop_gradient(scale), jax.lax.stop_gradient(zero_point)
