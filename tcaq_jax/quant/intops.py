"""Integer kernels for uniform affine quantized layers: int8 x int8 -> int32 conv / matmul, then one rescale.

Codes (uniform.py convention, unsigned): a = s_a (q_a - z_a), w = s_w[o] (q_w - z_w[o]), q in [0, 2^b - 1].
Operands are carried as int8 with an offset (`int8_offset`): 128 for 8-bit codes, 0 below (codes up to 127
already fit), so q' = q - offset and z' = z - offset keep q - z = q' - z'. For one output o, with K the
reduction size (kernel window x input channels):
  sum_k (q'a_k - z'a)(q'w_ko - z'w_o)
    = sum_k q'a_k q'w_ko  -  z'w_o sum_k q'a_k  -  z'a sum_k q'w_ko  +  K z'a z'w_o          (all int32, exact)
  y_o = s_a s_w[o] * that + bias_o
The first term is the int8 conv / dot_general (preferred_element_type int32), the second a window sum of the
activation codes (reduce_window), the third a per-output constant. Zero padding of a float input is padding
with the code z'a (its float value is exactly 0), so the conv pads explicitly with z'a and runs VALID: every
window then holds K codes.

int32 range (`accumulator_bound`, checked by `intexec.int_plan`): with D_x = 2^b_x - 1 (b_x the bits of operand
x) and every code and zero point in the unsigned code range [0, D_x] (ranges.py clips zero points into it;
symmetric ones are 2^(b-1)), every int32 value the kernels form is a sum over the K reduced elements, or K times
a constant, of one per-element term:
  q'a q'w (the int8 product; any partial sum of the accumulation), q'a, q'w (window / row / kernel sums),
  q'a z'w, z'a q'w, z'a, z'a z'w (the corrections, K z'a z'w evaluated as (K z'a) z'w),
  q'a (q'w - z'w) and q'a q'w - q'a z'w - z'a q'w (the partial results of the correction sequence),
  (q'a - z'a)(q'w - z'w) (the result).
|q'| and |z'| are at most max(offset, D - offset) <= D (128 <= 255 at 8 bits), |q - z| <= D, and the
next-to-last term is at most D_a D_w in magnitude too (its largest value over the code box is 48,896 < 255^2 at
8/8 bits; tests/quant/test_int_overflow.py maximizes every term exhaustively). So every value is at most
  K D_a D_w = K (2^b_a - 1)(2^b_w - 1),
the result's own worst case (attained when every code of both operands is D against zero points 0). So the
kernels are exact for every input, without relying on int32 wraparound, when that is <= 2^31 - 1 (K <= 33,025
at 8/8 bits, 561,433 at 8/4, 9,544,371 at 4/4), and some input overflows the result when it is not.

Attention matmuls (`int_einsum`): the same expansion for a two-operand einsum with per-tensor zero points on both
operands (q k^T: both activations; probs @ v: the uniform post-Softmax codes and v); the two zero-point terms are
sums of one operand over the contracted axes, broadcast into the output's layout.

W4 storage: two 4-bit codes per byte (`pack_int4` / `unpack_int4`, low nibble first, row-major), unpacked to
int8 inside the jitted forward. Imports nothing from the rest of tcaq_jax except its sibling quantizers.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.quant.uniform import qrange

__all__ = ['INT32_MAX', 'accumulator_bound', 'int8_offset', 'pack_int4', 'unpack_int4', 'act_codes', 'conv_pads',
           'int_conv', 'int_dense', 'contracted_size', 'int_einsum']

INT32_MAX = 2 ** 31 - 1


def accumulator_bound(k: int, a_bits: int, b_bits: int) -> int:
  """Largest |int32 value| that int_conv / int_dense / int_einsum can form for reduction size k and b-bit
  unsigned operand codes with zero points in the code range: k (2^a_bits - 1)(2^b_bits - 1) (module docstring).
  Exact Python int; the kernels are exact iff it is <= INT32_MAX."""
  return int(k) * (2 ** int(a_bits) - 1) * (2 ** int(b_bits) - 1)


def int8_offset(bits: int) -> int:
  """Offset subtracted from unsigned b-bit codes to carry them as int8 (128 for 8 bits, 0 for fewer)."""
  if not 1 <= int(bits) <= 8:
    raise ValueError(f'tcaq_jax/quant/intops.py: int8 operands need 1..8-bit codes, got {bits}')
  return 128 if int(bits) == 8 else 0


def pack_int4(codes) -> np.ndarray:
  """Unsigned 4-bit codes (any shape, values 0..15) -> uint8 [ceil(n / 2)], low nibble = even element."""
  flat = np.asarray(codes).reshape(-1)
  if flat.size and (flat.min() < 0 or flat.max() > 15):
    raise ValueError(f'tcaq_jax/quant/intops.py: 4-bit codes must be in [0, 15], got [{flat.min()}, {flat.max()}]')
  flat = flat.astype(np.uint8)
  if flat.size % 2:
    flat = np.concatenate([flat, np.zeros(1, np.uint8)])
  return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed, shape: Sequence[int]) -> jax.Array:
  """Inverse of pack_int4 (jit-safe): uint8 [ceil(n / 2)] -> int8 codes of `shape` (values 0..15)."""
  p = jnp.asarray(packed, jnp.uint8)
  both = jnp.stack([p & 0x0F, p >> 4], axis=-1).reshape(-1)
  n = int(np.prod(shape))
  return both[:n].reshape(tuple(shape)).astype(jnp.int8)


def act_codes(x, scale, zero, bits: int) -> jax.Array:
  """int8 codes q - offset of x (the codes `uniform.quantize` / `fake_quant` give). scale, zero broadcastable."""
  qmin, qmax = qrange(bits)
  q = jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) / scale) + zero, qmin, qmax)
  return (q - int8_offset(bits)).astype(jnp.int8)


def conv_pads(padding, in_spatial: Sequence[int], kernel_spatial: Sequence[int], strides: Sequence[int],
              dilation: Sequence[int]) -> list[tuple[int, int]]:
  """Explicit (lo, hi) pads per spatial axis for 'SAME' / 'VALID' or a list of pairs (flax canonical form)."""
  if isinstance(padding, str):
    eff = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, dilation)]
    return [tuple(p) for p in jax.lax.padtype_to_pads(tuple(in_spatial), eff, tuple(strides), padding)]
  return [tuple(int(v) for v in p) for p in padding]


def int_conv(xq, za, wq, zw, strides: Sequence[int], pads: Sequence[tuple[int, int]],
             dilation: Sequence[int]) -> jax.Array:
  """Exact int32 sum_k (xq - za)(wq - zw) of a channels-last conv.

  xq: int8 [B, *spatial, Cin]; za: int32 scalar (the activation zero point, offset applied);
  wq: int8 [*kernel, Cin, Cout]; zw: int32 [Cout]; pads: (lo, hi) per spatial axis (zero padding of the float
  input). Returns int32 [B, *out_spatial, Cout].
  """
  nsp = xq.ndim - 2
  za = jnp.asarray(za, jnp.int32)
  config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
  xp = jax.lax.pad(xq, za.astype(jnp.int8), config)
  spec = ('N' + 'HWD'[:nsp] + 'C', 'HWD'[:nsp] + 'IO', 'N' + 'HWD'[:nsp] + 'C')
  acc = jax.lax.conv_general_dilated(xp, wq, tuple(strides), 'VALID', rhs_dilation=tuple(dilation),
                                     dimension_numbers=spec, preferred_element_type=jnp.int32)
  kernel = wq.shape[:nsp]
  box = jax.lax.reduce_window(jnp.sum(xp, axis=-1, dtype=jnp.int32), jnp.int32(0), jax.lax.add,
                              (1,) + tuple(kernel), (1,) + tuple(strides), 'VALID',
                              window_dilation=(1,) + tuple(dilation))
  w_sum = jnp.sum(wq, axis=tuple(range(wq.ndim - 1)), dtype=jnp.int32)                 # [Cout]
  k = int(np.prod(wq.shape[:-1]))
  zw = jnp.asarray(zw, jnp.int32)
  return acc - box[..., None] * zw - za * w_sum + k * za * zw


def int_dense(xq, za, wq, zw) -> jax.Array:
  """Exact int32 sum_k (xq - za)(wq - zw) of x @ w. xq: int8 [..., K]; wq: int8 [K, N]; zw: int32 [N]."""
  za = jnp.asarray(za, jnp.int32)
  acc = jax.lax.dot_general(xq, wq, (((xq.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  row = jnp.sum(xq, axis=-1, dtype=jnp.int32)
  w_sum = jnp.sum(wq, axis=0, dtype=jnp.int32)
  zw = jnp.asarray(zw, jnp.int32)
  return acc - row[..., None] * zw - za * w_sum + wq.shape[0] * za * zw


def _parse_einsum(equation: str) -> tuple[str, str, str]:
  """'ab,bc->ac' -> ('ab', 'bc', 'ac'); explicit two-operand equations with single-letter labels only."""
  eq = equation.replace(' ', '')
  if '->' not in eq or eq.count(',') != 1 or '.' in eq:
    raise ValueError(f'tcaq_jax/quant/intops.py: int_einsum needs an explicit two-operand equation without '
                     f'ellipsis, got {equation!r}')
  ins, out = eq.split('->')
  la, lb = ins.split(',')
  if any(len(set(x)) != len(x) for x in (la, lb, out)) or not set(out) <= set(la) | set(lb):
    raise ValueError(f'tcaq_jax/quant/intops.py: int_einsum: repeated or unknown labels in {equation!r}')
  return la, lb, out


def contracted_size(equation: str, shape_a, shape_b) -> int:
  """K of a two-operand einsum: the product of the sizes of its contracted labels (in both inputs, not in the
  output)."""
  la, lb, out = _parse_einsum(equation)
  sizes = dict(zip(la, shape_a)) | dict(zip(lb, shape_b))
  return int(np.prod([sizes[c] for c in (set(la) & set(lb)) - set(out)]))


def _sum_into(x, labels: str, contracted: set, out: str) -> jax.Array:
  """x (axes named by `labels`) summed over `contracted` (int32), laid out to broadcast against `out`."""
  keep = ''.join(c for c in labels if c not in contracted)
  s = jnp.sum(x, axis=tuple(i for i, c in enumerate(labels) if c in contracted), dtype=jnp.int32)
  s = jnp.transpose(s, [keep.index(c) for c in out if c in keep])
  return jnp.expand_dims(s, tuple(i for i, c in enumerate(out) if c not in keep))


def int_einsum(equation: str, aq, za, bq, zb) -> jax.Array:
  """Exact int32 einsum(equation, aq - za, bq - zb) of two int8 operands with scalar zero points.

  aq, bq: int8 codes - offset; za, zb: int32 scalars (offset applied). Every contracted label (in both inputs,
  not in the output) is summed; labels of one input only must appear in the output. With K the product of the
  contracted sizes:
    sum (aq - za)(bq - zb) = einsum(aq, bq) - zb sum_K aq - za sum_K bq + K za zb
  exact while accumulator_bound(K, bits of a, bits of b) <= INT32_MAX (K <= 33,025 at 8/8 bits).
  """
  la, lb, out = _parse_einsum(equation)
  contracted = (set(la) & set(lb)) - set(out)
  if (set(la) ^ set(lb)) - set(out):
    raise ValueError(f'tcaq_jax/quant/intops.py: int_einsum: a label of one input only is summed in {equation!r}')
  k = contracted_size(equation, aq.shape, bq.shape)
  za, zb = jnp.asarray(za, jnp.int32), jnp.asarray(zb, jnp.int32)
  acc = jnp.einsum(equation, aq, bq, preferred_element_type=jnp.int32)
  return (acc - zb * _sum_into(aq, la, contracted, out) - za * _sum_into(bq, lb, contracted, out)
          + k * za * zb)
