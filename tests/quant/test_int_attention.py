"""Integer attention matmuls (tcaq_jax/quant/intops.py `int_einsum`, tcaq_jax/quant/intexec.py `int_matmul`):
exact int32 einsums against NumPy int64, and q k^T / probs @ v against a float64 NumPy reference of the quantized
operands (bound: the final rescale's two roundings) and against the fake-quant path (bound: float32 summation).
The einsum equations are the models' (tcaq_jax/models/layers.py, ldm_layers.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.quant import intops
from tcaq_jax.quant.apply import act_fake_quant
from tcaq_jax.quant.intexec import int_matmul
from tcaq_jax.quant.policy import LayerSpec
from tcaq_jax.quant.state import LayerQState

U = 2.0 ** -24
EQUATIONS = {  # equation: (shape of a, shape of b), q k^T then probs @ v of each attention form
    'bic,bjc->bij': ((2, 9, 8), (2, 7, 8)), 'bij,bjc->bic': ((2, 9, 7), (2, 7, 8)),
    'bthd,bshd->bhts': ((2, 9, 2, 4), (2, 7, 2, 4)), 'bhts,bshd->bthd': ((2, 2, 9, 7), (2, 7, 2, 4)),
    'bnhd,bmhd->bhnm': ((2, 9, 2, 4), (2, 1, 2, 4)), 'bhnm,bmhd->bnhd': ((2, 2, 9, 1), (2, 1, 2, 4)),
}


@pytest.mark.parametrize('equation', list(EQUATIONS))
@pytest.mark.parametrize('a_bits,b_bits', [(8, 8), (4, 6)])
def test_int_einsum_is_exact(equation, a_bits, b_bits):
  rng = np.random.default_rng(a_bits + 3 * b_bits)
  sa, sb = EQUATIONS[equation]
  qa, qb = rng.integers(0, 2 ** a_bits, sa), rng.integers(0, 2 ** b_bits, sb)
  za, zb = int(rng.integers(0, 2 ** a_bits)), int(rng.integers(0, 2 ** b_bits))
  oa, ob = intops.int8_offset(a_bits), intops.int8_offset(b_bits)
  got = jax.jit(intops.int_einsum, static_argnums=0)(equation, jnp.asarray(qa - oa, jnp.int8), za - oa,
                                                     jnp.asarray(qb - ob, jnp.int8), zb - ob)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), np.einsum(equation, qa - za, qb - zb))


@pytest.mark.parametrize('equation', ['bc,cd', 'b...c,cd->b...d', 'bc,cd->bd,', 'bc,de->be'])
def test_int_einsum_refuses_equations_it_cannot_do_exactly(equation):
  a = jnp.zeros((2, 3), jnp.int8)
  with pytest.raises(ValueError, match='int_einsum'):
    intops.int_einsum(equation, a, 0, jnp.zeros((3, 3), jnp.int8), 0)


def _state(x, bits, num_slots=2, symmetric=False):
  """LayerQState of a per-tensor quantizer per slot covering x's range (slot k shrinks it by 1 - k / 8), zero
  point 2^(b-1) when symmetric (Q-Diffusion's activations), else asymmetric."""
  lo, hi = float(np.min(x)), float(np.max(x))
  shrink = 1 - np.arange(num_slots) / 8
  if symmetric:
    scale = np.maximum(abs(lo), abs(hi)) * shrink / (2 ** (bits - 1) - 1)
    zero = np.full(num_slots, 2 ** (bits - 1))
  else:
    scale = (hi - min(lo, 0.)) * shrink / (2 ** bits - 1)
    zero = np.round(-min(lo, 0.) / scale)
  return LayerQState(a_scale=jnp.asarray(scale[:, None], jnp.float32), a_zero=jnp.asarray(zero[:, None], jnp.float32))


def _spec(path, kind, bits):
  return LayerSpec(path=path, kind=kind, in_features=0, w_bits=None, a_bits=bits)


def _np_dequant(x, st, bits, slot):
  """Float64 values of the codes (the codes by the quantizer's own float32 formula, as stored)."""
  s, z = np.float32(np.asarray(st.a_scale)[slot, 0]), np.float32(np.asarray(st.a_zero)[slot, 0])
  codes = np.clip(np.round(np.asarray(x, np.float32) / s) + z, 0, 2 ** bits - 1)
  return (codes.astype(np.float64) - float(z)), float(s)


def _operands(equation, probs_first):
  rng = np.random.default_rng(len(equation))
  sa, sb = EQUATIONS[equation]
  a = rng.standard_normal(sa).astype(np.float32) * 2 + 0.3
  if probs_first:                                  # the contracted axis is the last one of probs
    a = np.asarray(jax.nn.softmax(jnp.asarray(a) * 2, axis=-1))
  return a, rng.standard_normal(sb).astype(np.float32) * 1.5 - 0.2


@pytest.mark.parametrize('equation', list(EQUATIONS))
@pytest.mark.parametrize('symmetric', [False, True])
def test_int_matmul_equals_float64_reference_and_fake_quant(equation, symmetric):
  probs_first = list(EQUATIONS).index(equation) % 2 == 1        # probs @ v (else q k^T)
  a, b = _operands(equation, probs_first)
  bits_a, bits_b = (8, 8) if symmetric else (6, 8)
  st_a, st_b = _state(a, bits_a, symmetric=symmetric), _state(b, bits_b, symmetric=symmetric)
  spec_a = _spec('attn/attn_probs' if probs_first else 'attn/qk_q', 'softmax' if probs_first else 'matmul', bits_a)
  spec_b = _spec('attn/av_v' if probs_first else 'attn/qk_k', 'matmul', bits_b)
  fn = jax.jit(lambda a, b, slot: int_matmul(equation, a, st_a, spec_a, b, st_b, spec_b, slot))
  for slot in (0, 1):
    got = np.asarray(fn(a, b, slot), np.float64)
    (ca, sa), (cb, sb) = _np_dequant(a, st_a, bits_a, slot), _np_dequant(b, st_b, bits_b, slot)
    ref = np.einsum(equation, ca, cb) * (sa * sb)                 # float64, exact integer sums
    np.testing.assert_array_less(np.abs(got - ref), 3 * U * np.abs(ref) + 1e-30)
    fa, fb = (act_fake_quant(x, st, sp, slot) for x, st, sp in ((a, st_a, spec_a), (b, st_b, spec_b)))
    fake = np.asarray(jnp.einsum(equation, fa, fb), np.float64)
    bound = (intops.contracted_size(equation, a.shape, b.shape) + 2) * U * np.einsum(equation, np.abs(ca) * sa,
                                                                             np.abs(cb) * sb) + 3 * U * np.abs(ref)
    assert np.all(np.abs(got - fake) <= bound)


def test_log_post_softmax_slots_keep_fake_quant_and_uniform_slots_run_on_integers():
  equation = 'bij,bjc->bic'
  probs, v = _operands(equation, probs_first=True)
  st_v, spec_v = _state(v, 8), _spec('attn/av_v', 'matmul', 8)
  spec_p = _spec('attn/attn_probs', 'softmax', 8)
  st_p = _state(probs, 8).replace(use_log2=jnp.asarray([0., 1.]), log2_delta=jnp.asarray([1., 0.5]))
  fn = jax.jit(lambda slot: int_matmul(equation, probs, st_p, spec_p, v, st_v, spec_v, slot))
  fake = jax.jit(lambda slot: jnp.einsum(equation, act_fake_quant(probs, st_p, spec_p, slot),
                                         act_fake_quant(v, st_v, spec_v, slot)))
  np.testing.assert_array_equal(np.asarray(fn(1)), np.asarray(fake(1)))      # log2 slot: the fake path itself
  uniform = int_matmul(equation, probs, st_p.replace(use_log2=None), spec_p, v, st_v, spec_v, 0)
  np.testing.assert_array_equal(np.asarray(fn(0)), np.asarray(uniform))     # uniform slot: the integer path
  assert np.all(np.isnan(np.asarray(fn(5))))                                # uncalibrated slot: NaN


def test_int_matmul_refuses_what_it_cannot_run():
  x = jnp.ones((1, 2, 3))
  st = _state(np.asarray(x), 8)
  with pytest.raises(ValueError, match='<= 8 bits'):
    int_matmul('bic,bjc->bij', x, st, _spec('q', 'matmul', 12), x, st, _spec('k', 'matmul', 8), 0)
  with pytest.raises(ValueError, match='attention operand'):
    int_matmul('bic,bjc->bij', x, st, _spec('q', 'conv', 8), x, st, _spec('k', 'matmul', 8), 0)
