"""Logarithmic quantizers for post-Softmax values (x >= 0).

  log2      q = clamp(round(-log2(x / delta)), 0, 2^b - 1),      x_hat = delta 2^(-q)
  logsqrt2  q = clamp(round(-2 log2(x / delta)), 0, 2^b - 1),    x_hat = delta 2^(-q/2)   (RepQ-ViT)
As in RepQ-ViT, values whose unclamped code exceeds 2^b - 1 (and x <= 0) dequantize to 0 (`zero_underflow`,
default True); values above delta clamp to code 0 (x_hat = delta).
Gradients: straight-through for x inside [delta 2^(-(2^b-1)/k), delta] (k = 1 log2, 2 logsqrt2), zero outside;
delta receives the gradient of the clamped/underflowed values only.
"""
import functools

import flax.struct
import jax
import jax.numpy as jnp

from tcaq_jax.quant.uniform import QuantConfigError

_KIND_K = {'log2': 1., 'logsqrt2': 2.}


def _k(kind):
  if kind not in _KIND_K:
    raise QuantConfigError(f"tcaq_jax/quant/log2.py: kind must be 'log2' or 'logsqrt2', got {kind!r}")
  return _KIND_K[kind]


def log_codes(x, delta, bits, kind='log2'):
  """(codes float32 in [0, 2^b - 1], underflow bool) of x >= 0. x: any shape; delta: broadcastable."""
  k = _k(kind)
  n = 2 ** int(bits)
  x = jnp.asarray(x, jnp.float32)
  pos = x > 0
  safe = jnp.where(pos, x, delta)
  raw = jnp.round(-k * jnp.log2(safe / delta))
  underflow = (~pos) | (raw > n - 1)
  return jnp.clip(raw, 0, n - 1), underflow


def log_dequantize(codes, delta, kind='log2', underflow=None):
  """delta 2^(-codes / k); zero where underflow."""
  v = delta * jnp.exp2(-codes / _k(kind))
  return v if underflow is None else jnp.where(underflow, 0., v)


@functools.partial(jax.jit, static_argnames=('bits', 'kind', 'zero_underflow'))
def log_fake_quant(x, delta, bits, kind='log2', zero_underflow=True):
  """Quantize-dequantize with a log2 or log-sqrt2 grid; STE inside the representable range."""
  k = _k(kind)
  n = 2 ** int(bits)
  x = jnp.asarray(x, jnp.float32)
  delta = jnp.asarray(delta, jnp.float32)
  codes, underflow = log_codes(x, jax.lax.stop_gradient(delta), bits, kind)
  value = log_dequantize(codes, delta, kind, underflow if zero_underflow else None)
  pos = x > 0
  lv = -k * jnp.log2(jnp.where(pos, x, delta) / jax.lax.stop_gradient(delta))
  inside = pos & (lv >= 0) & (lv <= n - 1)
  return jnp.where(inside, x + jax.lax.stop_gradient(value - x), value)


def log2_fake_quant(x, delta, bits, zero_underflow=True):
  """Base-2 log quantizer; x >= 0 any shape; delta scalar or broadcastable."""
  return log_fake_quant(x, delta, bits, 'log2', zero_underflow)


def logsqrt2_fake_quant(x, delta, bits, zero_underflow=True):
  """Base-sqrt2 log quantizer (RepQ-ViT); x >= 0 any shape; delta scalar or broadcastable."""
  return log_fake_quant(x, delta, bits, 'logsqrt2', zero_underflow)


@functools.partial(jax.jit, static_argnames=('bits', 'kind', 'pcts', 'n_grid', 'p'))
def log2_search_delta(x, bits, kind='log2', pcts=(0.999, 0.9999, 0.99999, 1.0), n_grid=16, p=2.0):
  """Per-tensor delta minimising mean |x - x_hat|^p (MSE by default) over the candidates:
  RepQ-ViT's quantiles of x at `pcts`, plus max(x) * 2^(-j / n_grid), j = 0..n_grid-1 (one octave below max).
  x: any shape, >= 0. Returns a float32 scalar."""
  x = jnp.asarray(x, jnp.float32)
  flat = x.reshape(-1)
  xmax = jnp.maximum(jnp.max(flat), 1e-12)
  cands = [jnp.quantile(flat, jnp.asarray(pcts, jnp.float32))]
  cands.append(xmax * jnp.exp2(-jnp.arange(n_grid, dtype=jnp.float32) / n_grid))
  cands = jnp.maximum(jnp.concatenate(cands), 1e-12)

  def err(d):
    return jnp.mean(jnp.abs(x - log_fake_quant(x, d, bits, kind)) ** p)

  errs = jax.lax.map(err, cands)
  return jax.lax.stop_gradient(cands[jnp.argmin(errs)])


@flax.struct.dataclass
class LogQuantizer:
  """Log quantizer state (pytree): delta array (scalar, or [T] per timestep); bits, kind static."""
  delta: jax.Array
  bits: int = flax.struct.field(pytree_node=False, default=8)
  kind: str = flax.struct.field(pytree_node=False, default='log2')

  def select_step(self, step_index):
    return self.replace(delta=self.delta[step_index])


def log_fake_quant_with(x, q):
  """log_fake_quant(x, q.delta, q.bits, q.kind)."""
  return log_fake_quant(x, q.delta, q.bits, q.kind)
