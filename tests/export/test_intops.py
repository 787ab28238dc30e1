"""Integer kernels and weight storage (tcaq_jax/quant/intops.py, tcaq_jax/export/format.py) against float64 /
NumPy references: exact int32 results with asymmetric zero points on both operands, padding included."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.export.format import decode_codes, encode_codes, storage_of
from tcaq_jax.quant import intops


@pytest.mark.parametrize('shape', [(3, 3, 5, 7), (7,), (1,), (4, 6)])
def test_int4_pack_round_trip_two_codes_per_byte(shape):
  codes = np.random.default_rng(0).integers(0, 16, shape)
  packed = intops.pack_int4(codes)
  assert packed.dtype == np.uint8 and packed.size == (codes.size + 1) // 2
  np.testing.assert_array_equal(np.asarray(jax.jit(intops.unpack_int4, static_argnums=1)(packed, shape)), codes)
  with pytest.raises(ValueError, match=r'\[0, 15\]'):
    intops.pack_int4(np.full(shape, 16))


@pytest.mark.parametrize('bits', [2, 4, 6, 8, 12])
def test_weight_storage_round_trip(bits):
  codes = np.random.default_rng(bits).integers(0, 2 ** bits, (3, 5, 4))
  stored = encode_codes(codes, bits)
  assert stored.dtype == {'int4x2': np.uint8, 'int8': np.int8, 'int16': np.int16}[storage_of(bits)]
  np.testing.assert_array_equal(decode_codes(stored, bits, codes.shape), codes)


@pytest.mark.parametrize('a_bits,w_bits,strides,padding', [(8, 8, (1, 1), 'SAME'), (8, 4, (2, 2), [(0, 1), (0, 1)]),
                                                        (6, 5, (1, 1), 'VALID')])
def test_int_conv_and_dense_are_exact(a_bits, w_bits, strides, padding):
  rng = np.random.default_rng(a_bits * 10 + w_bits)
  oa, ow = intops.int8_offset(a_bits), intops.int8_offset(w_bits)
  qa, za = rng.integers(0, 2 ** a_bits, (2, 6, 7, 5)), int(rng.integers(0, 2 ** a_bits))
  qw, zw = rng.integers(0, 2 ** w_bits, (3, 3, 5, 4)), rng.integers(0, 2 ** w_bits, 4)
  ref = jax.lax.conv_general_dilated(jnp.asarray(qa - za, jnp.float32), jnp.asarray(qw - zw, jnp.float32), strides,
                                     padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest')
  pads = intops.conv_pads(padding, (6, 7), (3, 3), strides, (1, 1))
  got = intops.int_conv(jnp.asarray(qa - oa, jnp.int8), za - oa, jnp.asarray(qw - ow, jnp.int8),
                        jnp.asarray(zw - ow), strides, pads, (1, 1))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref).astype(np.int64))   # |values| < 2^24: exact
  xd, wd = rng.integers(0, 2 ** a_bits, (3, 2, 9)), rng.integers(0, 2 ** w_bits, (9, 4))
  got = intops.int_dense(jnp.asarray(xd - oa, jnp.int8), za - oa, jnp.asarray(wd - ow, jnp.int8),
                         jnp.asarray(zw - ow))
  np.testing.assert_array_equal(np.asarray(got), (xd - za) @ (wd - zw))


def test_act_codes_are_the_fake_quant_codes():
  from tcaq_jax.quant.uniform import fake_quant
  x = jnp.asarray(np.random.default_rng(1).normal(size=1000) * 3, jnp.float32)
  s, z = jnp.float32(0.02), jnp.float32(121.)
  codes = intops.act_codes(x, s, z, 8).astype(jnp.float32) + 128
  np.testing.assert_array_equal(np.asarray((codes - z) * s), np.asarray(fake_quant(x, s, z, 8)))
