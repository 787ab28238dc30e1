"""log2 / log-sqrt2 quantizers vs a float64 NumPy reference; STE; delta search."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax import quant as Q


def _ref(x, delta, bits, k):
  x = np.asarray(x, np.float64)
  n = 2 ** bits
  with np.errstate(divide='ignore'):
    raw = np.round(-k * np.log2(x / delta))
  q = np.clip(raw, 0, n - 1)
  return np.where((x <= 0) | (raw > n - 1), 0., delta * 2. ** (-q / k))


def _softmax(seed, shape=(4, 32, 64), temp=3.):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=shape) * temp
  p = np.exp(z - z.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize('kind,k', [('log2', 1.), ('logsqrt2', 2.)])
@pytest.mark.parametrize('bits', [3, 8])
def test_matches_reference(kind, k, bits):
  p = _softmax(bits)
  p[0, 0, :3] = 0.                                    # exact zeros dequantize to 0
  delta = 0.7
  out = np.asarray(Q.log_fake_quant(p, delta, bits, kind))
  with np.errstate(divide='ignore', invalid='ignore'):
    lv = -k * np.log2(p.astype(np.float64) / delta)
    far = ~(np.abs(lv - np.floor(lv) - 0.5) < 1e-4)      # skip float32 near-ties of the rounding
  assert far.mean() > 0.99
  np.testing.assert_allclose(out[far], _ref(p, delta, bits, k)[far], rtol=2e-6, atol=0)
  fn = Q.log2_fake_quant if kind == 'log2' else Q.logsqrt2_fake_quant
  np.testing.assert_array_equal(np.asarray(fn(p, delta, bits)), out)
  codes, under = Q.log_codes(p, delta, bits, kind)
  assert float(codes.min()) >= 0 and float(codes.max()) <= 2 ** bits - 1
  assert bool(under[0, 0, 0])


def test_ste_gradient():
  delta, bits = 0.5, 3
  lo = delta * 2. ** (-7 / 2)                         # smallest logsqrt2 level
  x = jnp.array([0.49, 0.3, 0.1, lo * 1.01, 0.6, 0.9, lo * 0.5, 0.])
  g = jax.grad(lambda x: jnp.sum(Q.logsqrt2_fake_quant(x, delta, bits)))(x)
  np.testing.assert_array_equal(np.asarray(g), [1, 1, 1, 1, 0, 0, 0, 0])
  assert np.all(np.isfinite(np.asarray(jax.grad(lambda d: jnp.sum(Q.log2_fake_quant(x, d, bits)))(delta))))


@pytest.mark.parametrize('kind,k', [('log2', 1.), ('logsqrt2', 2.)])
def test_delta_search_is_best_candidate(kind, k):
  p = _softmax(7)
  bits = 4
  d = float(Q.log2_search_delta(p, bits, kind))
  flat = p.reshape(-1).astype(np.float64)
  cands = list(np.quantile(flat, [0.999, 0.9999, 0.99999, 1.0])) + [flat.max() * 2. ** (-j / 16) for j in range(16)]
  errs = [np.mean((flat - _ref(flat, c, bits, k)) ** 2) for c in cands]
  e = np.mean((flat - _ref(flat, d, bits, k)) ** 2)
  assert e <= min(errs) * (1 + 1e-4)
  assert e <= np.mean((flat - _ref(flat, flat.max(), bits, k)) ** 2)


def test_log_quantizer_beats_uniform_on_softmax():
  p = _softmax(3)
  bits = 4
  d = Q.log2_search_delta(p, bits, 'logsqrt2')
  s, z = Q.lp_search_params(p, bits, p=2., symmetric=True)
  # Relative error on the attention-relevant small values is far lower with the log grid.
  rel = lambda hat: float(jnp.mean(jnp.abs(hat - p) / (p + 1e-3)))
  assert rel(Q.logsqrt2_fake_quant(p, d, bits)) < 0.75 * rel(Q.fake_quant(p, s, z, bits))
  q = Q.LogQuantizer(delta=jnp.array([0.5, d]), bits=bits, kind='logsqrt2')
  np.testing.assert_array_equal(np.asarray(Q.log_fake_quant_with(p, q.select_step(1))),
                                np.asarray(Q.logsqrt2_fake_quant(p, d, bits)))
