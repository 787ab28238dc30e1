"""TCR: timestep-channel joint reparameterization (METHOD.md section 2).

For a layer Y = W X with input channel c and calibration timestep t:
  m_t[c] = max |X_t[:, c]|                         (peaks: [T, C], see `channel_peaks`)
  s_t    = min_c m_t[c]   (target='min')  or mean_c m_t[c] (target='mean')
  r_t[c] = m_t[c] / s_t
  r[c]   = sum_t m_t[c] r_t[c] / sum_t m_t[c]
  r[c]   = min(r[c], R_tru)                        (optional truncation)
  Y = (W diag(r)) (X / r)
Channels that are exactly zero at a timestep are ignored by the min target (they would make s_t = 0) and get
weight 0 in the average; a channel that is zero at every timestep gets r = 1.
Kernels: flax Conv HWIO [..., in, out] and Dense [in, out] both have the input channel on axis -2.
"""
import functools

import jax
import jax.numpy as jnp

from tcaq_jax.quant.uniform import QuantConfigError


def channel_peaks(x, channel_axis=-1):
  """m[c] = max |x| over all axes but channel_axis. x: [B, H, W, C] (or any) -> [C]."""
  x = jnp.asarray(x, jnp.float32)
  ax = channel_axis % x.ndim
  return jnp.max(jnp.abs(x), axis=tuple(a for a in range(x.ndim) if a != ax))


@functools.partial(jax.jit, static_argnames=('target',))
def tcr_ratio(peaks, r_tru=None, target='min'):
  """Joint TCR ratio. peaks: [T, C] non-negative per-timestep per-channel peaks -> r: [C] float32.

  target 'min' gives r >= 1; 'mean' centres the ranges on the channel mean (r may be < 1).
  r_tru: optional upper bound (R_tru; 3 at W4A8 in the paper).
  """
  m = jnp.asarray(peaks, jnp.float32)
  if m.ndim == 1:
    m = m[None]
  if m.ndim != 2:
    raise QuantConfigError(f'tcaq_jax/quant/tcr.py: peaks must be [T, C], got shape {m.shape}')
  live = m > 0
  if target == 'min':
    s = jnp.min(jnp.where(live, m, jnp.inf), axis=1, keepdims=True)
  elif target == 'mean':
    s = jnp.sum(m, axis=1, keepdims=True) / jnp.maximum(jnp.sum(live, axis=1, keepdims=True), 1)
  else:
    raise QuantConfigError(f"tcaq_jax/quant/tcr.py: target must be 'min' or 'mean', got {target!r}")
  s = jnp.where(jnp.isfinite(s) & (s > 0), s, 1.)
  r_t = m / s
  wsum = jnp.sum(m, axis=0)
  r = jnp.where(wsum > 0, jnp.sum(m * r_t, axis=0) / jnp.where(wsum > 0, wsum, 1.), 1.)
  if r_tru is not None:
    r = jnp.minimum(r, r_tru)
  return r


def scale_kernel_inputs(kernel, r):
  """kernel * r along the input-channel axis (-2): conv HWIO [kh, kw, in, out] or dense [in, out]."""
  kernel = jnp.asarray(kernel)
  r = jnp.asarray(r, kernel.dtype)
  if kernel.ndim < 2 or kernel.shape[-2] != r.shape[-1]:
    raise QuantConfigError(
        f'tcaq_jax/quant/tcr.py: kernel shape {kernel.shape} has no input axis (-2) of size {r.shape[-1]}')
  return kernel * r[:, None]


def scale_activation(x, r, channel_axis=-1):
  """x / r along channel_axis (channels-last by default). x: [B, H, W, C]; r: [C]."""
  x = jnp.asarray(x)
  shape = [1] * x.ndim
  shape[channel_axis % x.ndim] = r.shape[-1]
  return x / jnp.asarray(r, x.dtype).reshape(shape)
