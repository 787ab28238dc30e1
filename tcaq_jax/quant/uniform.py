"""Uniform affine (fake) quantization with STE / LSQ gradients.

Convention (PyTorch-style, integer zero point):
  codes = clip(round(x / scale) + zero_point, qmin, qmax)
  x_hat = (codes - zero_point) * scale
`scale` and `zero_point` broadcast against `x` (keepdims shapes: per tensor all-ones shape, per channel the
channel axis keeps its size). `zero_point` is expected to hold integer values (the range initialisers in
`ranges.py` round it); `bits` and `signed` are Python values (static under jit).

Gradients of `fake_quant` (LSQ, Esser et al. 2020, with v = x / scale):
  d x_hat / d x     = 1 if qmin <= v + zp <= qmax else 0                       (straight-through)
  d x_hat / d scale = round(v) - v inside; (qmin - zp) below; (qmax - zp) above
  d x_hat / d zp    = 0 inside; -scale outside
Optionally the scale gradient is multiplied by `grad_scale` (LSQ's g = 1 / sqrt(N * qmax); see
`lsq_grad_scale`), which leaves the forward value unchanged.
"""
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp


class QuantConfigError(ValueError):
  """Invalid quantizer configuration (bits, axis, kind)."""


def qrange(bits, signed=False):
  """Integer code range. Unsigned [0, 2^b - 1]; signed [-2^(b-1), 2^(b-1) - 1]. Returns python ints."""
  bits = int(bits)
  if not 1 <= bits <= 16:
    raise QuantConfigError(f'tcaq_jax/quant/uniform.py: bits must be in [1, 16], got {bits}')
  if signed:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


@functools.partial(jax.jit, static_argnames=('bits', 'signed'))
def quantize(x, scale, zero_point, bits, signed=False):
  """Integer codes (as float32 array) of x. x: any shape; scale, zero_point broadcastable to x."""
  qmin, qmax = qrange(bits, signed)
  x = jnp.asarray(x, jnp.float32)
  return jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax)


def dequantize(codes, scale, zero_point):
  """(codes - zero_point) * scale."""
  return (codes - zero_point) * scale


def _scale_grad(scale, g):
  """Identity in value; multiplies the gradient flowing into `scale` by g."""
  if g is None:
    return scale
  return jax.lax.stop_gradient(scale) + (scale * g - jax.lax.stop_gradient(scale * g))


def round_ste(v):
  """round(v) forward, identity gradient."""
  return v + jax.lax.stop_gradient(jnp.round(v) - v)


@functools.partial(jax.jit, static_argnames=('bits', 'signed', 'grad_scale'))
def fake_quant(x, scale, zero_point, bits, signed=False, grad_scale=None):
  """Quantize-dequantize with STE (x) and LSQ (scale) gradients.

  x: any shape, float32; scale, zero_point: broadcastable to x. grad_scale: optional float multiplying the
  scale gradient (LSQ gradient scaling). Returns x_hat with the shape of x.
  """
  qmin, qmax = qrange(bits, signed)
  x = jnp.asarray(x, jnp.float32)
  scale = _scale_grad(jnp.asarray(scale, jnp.float32), grad_scale)
  zero_point = jnp.asarray(zero_point, jnp.float32)
  v = x / scale
  u = v + zero_point
  inside = (u >= qmin) & (u <= qmax)
  below = u < qmin
  # Inside: codes - zp = round(v) with identity gradient in v -> d/dx = 1, d/ds = round(v) - v.
  # Outside: codes - zp = qmin/qmax - zp with no gradient in v -> d/dx = 0, d/ds = qmin/qmax - zp.
  clipped = jnp.where(below, qmin, qmax) - zero_point
  centered = jnp.where(inside, round_ste(v), clipped)
  return centered * scale


def lsq_grad_scale(x, bits, signed=False, channel_axis=None):
  """LSQ gradient scale g = 1 / sqrt(N * qmax), N = elements sharing one scale. Returns a python float."""
  _, qmax = qrange(bits, signed)
  n = x.size if channel_axis is None else x.size // x.shape[channel_axis]
  return 1.0 / math.sqrt(n * qmax)


@flax.struct.dataclass
class UniformQuantizer:
  """Uniform affine quantizer state (a pytree; scale/zero_point are leaves, bits/signed static).

  scale, zero_point: keepdims arrays broadcastable to the quantized tensor. For per-timestep activation
  quantizers, give them a leading [T] axis and use `select_step`.
  """
  scale: jax.Array
  zero_point: jax.Array
  bits: int = flax.struct.field(pytree_node=False, default=8)
  signed: bool = flax.struct.field(pytree_node=False, default=False)

  def select_step(self, step_index):
    """Quantizer of one timestep from a state whose arrays have a leading [T] axis (jit-safe index)."""
    return self.replace(scale=self.scale[step_index], zero_point=self.zero_point[step_index])


def fake_quant_with(x, q, grad_scale=None):
  """fake_quant(x, q.scale, q.zero_point, q.bits, q.signed)."""
  return fake_quant(x, q.scale, q.zero_point, q.bits, q.signed, grad_scale=grad_scale)


def quantize_with(x, q):
  """quantize(x, q.scale, q.zero_point, q.bits, q.signed)."""
  return quantize(x, q.scale, q.zero_point, q.bits, q.signed)
