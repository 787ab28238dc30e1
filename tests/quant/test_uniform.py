"""Uniform quantizer: properties (hypothesis), STE / LSQ gradients vs float64 NumPy."""
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax import quant as Q

SETTINGS = hypothesis.settings(max_examples=50, deadline=None, derandomize=True)
SHAPES = [(5, 7), (2, 3, 6)]


@st.composite
def cases(draw):
  shape = draw(st.sampled_from(SHAPES))
  axis = draw(st.sampled_from([None] + list(range(-len(shape), len(shape)))))
  bits = draw(st.integers(2, 8))
  signed = draw(st.booleans())
  symmetric = draw(st.booleans())
  seed = draw(st.integers(0, 2 ** 31 - 1))
  heavy = draw(st.booleans())
  rng = np.random.default_rng(seed)
  x = rng.standard_t(2, size=shape) if heavy else rng.normal(size=shape) * 3 + rng.normal()
  return x.astype(np.float32), axis, bits, signed, symmetric


def _params(x, axis, bits, signed, symmetric, shrink=0.7):
  """Float32 (scale, zero_point) from a shrunken [min, max] (so some values fall outside), in NumPy."""
  qmin, qmax = Q.qrange(bits, signed)
  axes = Q.reduce_axes(x.ndim, axis)
  lo = np.min(x, axis=axes, keepdims=True) * shrink
  hi = np.max(x, axis=axes, keepdims=True) * shrink
  if symmetric:
    s = np.maximum((np.maximum(np.abs(lo), np.abs(hi)) if signed else np.maximum(hi, 0.)) / qmax, 1e-8)
    return s.astype(np.float32), np.zeros_like(s, np.float32)
  lo, hi = np.minimum(lo, 0.), np.maximum(hi, 0.)
  s = np.maximum((hi - lo) / (qmax - qmin), 1e-8).astype(np.float32)
  return s, np.clip(qmin - np.round(lo / s), qmin, qmax).astype(np.float32)


@SETTINGS
@hypothesis.given(cases())
def test_uniform_properties(case):
  """Codes in [qmin, qmax]; |error| <= scale/2 inside the range; idempotent."""
  x, axis, bits, signed, symmetric = case
  qmin, qmax = Q.qrange(bits, signed)
  s, z = _params(x, axis, bits, signed, symmetric)
  codes = np.asarray(Q.quantize(x, s, z, bits, signed))
  assert codes.min() >= qmin and codes.max() <= qmax
  np.testing.assert_array_equal(codes, np.round(codes))
  s64, z64 = np.asarray(s, np.float64), np.asarray(z, np.float64)
  u = x / s64 + z64
  inside = (u >= qmin) & (u <= qmax)
  once = Q.fake_quant(x, s, z, bits, signed)
  err = np.abs(np.asarray(once, np.float64) - x)
  bound = np.broadcast_to(s64 / 2, x.shape) * (1 + 1e-5) + 1e-7
  assert np.all(err[inside] <= bound[inside])
  # Idempotent.
  np.testing.assert_array_equal(np.asarray(once), np.asarray(Q.fake_quant(once, s, z, bits, signed)))


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
@hypothesis.given(cases())
def test_jit_equals_eager(case):
  """The library functions are jitted; under jax.disable_jit() the same code runs op by op (eager)."""
  x, axis, bits, signed, symmetric = case
  s, z = _params(x, axis, bits, signed, symmetric)
  with jax.disable_jit():
    eager_codes = np.asarray(Q.quantize(x, s, z, bits, signed))
    eager_fq = np.asarray(Q.fake_quant(x, s, z, bits, signed))
  np.testing.assert_array_equal(eager_codes, np.asarray(Q.quantize(x, s, z, bits, signed)))
  np.testing.assert_array_equal(eager_fq, np.asarray(Q.fake_quant(x, s, z, bits, signed)))


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
@hypothesis.given(cases())
def test_per_channel_equals_per_tensor_by_channel(case):
  x, axis, bits, signed, symmetric = case
  if axis is None:
    axis = 0
  s, z = Q.minmax_params(x, bits, channel_axis=axis, symmetric=symmetric, signed=signed)
  full = np.asarray(Q.quantize(x, s, z, bits, signed))
  for c in range(x.shape[axis]):
    xc = np.take(x, c, axis=axis)
    sc, zc = Q.minmax_params(xc, bits, channel_axis=None, symmetric=symmetric, signed=signed)
    np.testing.assert_array_equal(np.take(full, c, axis=axis), np.asarray(Q.quantize(xc, sc, zc, bits, signed)))


def test_qrange():
  assert Q.qrange(4, False) == (0, 15) and Q.qrange(4, True) == (-8, 7) and Q.qrange(8, True) == (-128, 127)
  with pytest.raises(Q.QuantConfigError):
    Q.qrange(0)


@pytest.mark.parametrize('signed', [False, True])
def test_ste_gradient_inside_and_outside(signed):
  bits = 4
  qmin, qmax = Q.qrange(bits, signed)
  s, z = np.float32(0.1), np.float32(0. if signed else 3.)
  lo, hi = (qmin - z) * s, (qmax - z) * s
  x = np.concatenate([np.linspace(lo + 1e-3, hi - 1e-3, 50), [lo - 0.3, lo - 0.07, hi + 0.07, hi + 2.]])
  x = x.astype(np.float32)
  g = np.asarray(jax.grad(lambda x: jnp.sum(Q.fake_quant(x, s, z, bits, signed)))(x))
  np.testing.assert_array_equal(g[:50], 1.)
  np.testing.assert_array_equal(g[50:], 0.)


def _lsq_ref(x, s, z, cot, bits, signed, axes):
  """LSQ d/ds sum(cot * x_hat) in float64: round(v)-v inside, (qmin|qmax) - z outside."""
  qmin, qmax = Q.qrange(bits, signed)
  x, s, z, cot = (np.asarray(a, np.float64) for a in (x, s, z, cot))
  v = x / s
  u = v + z
  d = np.where(u < qmin, qmin - z, np.where(u > qmax, qmax - z, np.round(v) - v))
  return np.sum(cot * d, axis=axes, keepdims=True)


@pytest.mark.parametrize('axis,signed,bits', [(None, False, 4), (None, True, 8), (-1, False, 3), (1, True, 2)])
def test_lsq_scale_gradient_matches_float64_formula(axis, signed, bits):
  rng = np.random.default_rng(1)
  x = (rng.standard_t(3, size=(6, 5, 8)) * 0.7).astype(np.float32)
  cot = rng.normal(size=x.shape).astype(np.float32)
  s, z = _params(x, axis, bits, signed, symmetric=signed, shrink=0.6)
  gs = jax.grad(lambda s: jnp.sum(cot * Q.fake_quant(x, s, z, bits, signed)))(s)
  ref = _lsq_ref(x, s, z, cot, bits, signed, Q.reduce_axes(x.ndim, axis))
  np.testing.assert_allclose(np.asarray(gs), ref, rtol=1e-4, atol=1e-4)
  # Optional LSQ gradient scaling multiplies the scale gradient and leaves the forward value alone.
  g = Q.lsq_grad_scale(x, bits, signed, axis)
  gs2 = jax.grad(lambda s: jnp.sum(cot * Q.fake_quant(x, s, z, bits, signed, grad_scale=g)))(s)
  np.testing.assert_allclose(np.asarray(gs2), ref * g, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(Q.fake_quant(x, s, z, bits, signed, grad_scale=g)),
                                np.asarray(Q.fake_quant(x, s, z, bits, signed)))


def test_quantizer_state_is_pytree_and_dequantize():
  q = Q.UniformQuantizer(scale=jnp.full((1, 4), 0.5), zero_point=jnp.full((1, 4), 2.), bits=4, signed=False)
  leaves = jax.tree_util.tree_leaves(q)
  assert len(leaves) == 2
  x = jnp.asarray([[0.26, -1.0, 7.0, 0.74]] * 2)
  codes = Q.quantize_with(x, q)
  np.testing.assert_array_equal(np.asarray(codes[0]), [3., 0., 15., 3.])
  np.testing.assert_allclose(np.asarray(Q.dequantize(codes, q.scale, q.zero_point))[0], [0.5, -1., 6.5, 0.5])
  np.testing.assert_allclose(np.asarray(jax.jit(Q.fake_quant_with)(x, q)), np.asarray(Q.dequantize(codes, 0.5, 2.)))
  qt = Q.UniformQuantizer(scale=jnp.arange(1., 4.)[:, None], zero_point=jnp.zeros((3, 1)), bits=8, signed=True)
  assert float(qt.select_step(2).scale[0]) == 3.
