"""Range initialisers vs float64 NumPy references (min-max, percentile, brute-force Lp search)."""
import numpy as np
import pytest

from tcaq_jax import quant as Q


def _np_params(lo, hi, bits, symmetric, signed):
  qmin, qmax = Q.qrange(bits, signed)
  if symmetric:
    s = (np.maximum(np.abs(lo), np.abs(hi)) if signed else np.maximum(hi, 0.)) / qmax
    return np.maximum(s, 1e-8), np.zeros_like(s)
  lo, hi = np.minimum(lo, 0.), np.maximum(hi, 0.)
  s = np.maximum((hi - lo) / (qmax - qmin), 1e-8)
  return s, np.clip(qmin - np.round(lo / s), qmin, qmax)


def _np_fq(x, s, z, bits, signed):
  qmin, qmax = Q.qrange(bits, signed)
  return (np.clip(np.round(x / s) + z, qmin, qmax) - z) * s


def _brute_lp(x, bits, p, n, symmetric, signed):
  """Per row of x [C, N]: loop over candidates (1 - 0.01 i) [min, max] in float64; first minimum wins."""
  out_s, out_z, out_e = [], [], []
  for row in x.astype(np.float64):
    best = (np.inf, None, None)
    for i in range(n):
      f = 1. - 0.01 * i
      s, z = _np_params(row.min() * f, row.max() * f, bits, symmetric, signed)
      e = np.mean(np.abs(row - _np_fq(row, s, z, bits, signed)) ** p)
      if e < best[0]:
        best = (e, s, z)
    out_e.append(best[0]); out_s.append(best[1]); out_z.append(best[2])
  return np.array(out_s), np.array(out_z), np.array(out_e)


@pytest.mark.parametrize('axis', [None, 0, -1])
@pytest.mark.parametrize('symmetric,signed', [(False, False), (True, True)])
def test_minmax_and_percentile_match_numpy(axis, symmetric, signed):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 50)).astype(np.float32) * np.arange(1, 51, dtype=np.float32)
  axes = Q.reduce_axes(x.ndim, axis)
  s, z = Q.minmax_params(x, 4, axis, symmetric, signed)
  rs, rz = _np_params(x.min(axes, keepdims=True), x.max(axes, keepdims=True), 4, symmetric, signed)
  np.testing.assert_allclose(np.asarray(s), rs, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(z), rz)
  s, z = Q.percentile_params(x, 4, 90., axis, symmetric, signed)
  rs, rz = _np_params(np.percentile(x, 10., axis=axes, keepdims=True),
                      np.percentile(x, 90., axis=axes, keepdims=True), 4, symmetric, signed)
  np.testing.assert_allclose(np.asarray(s), rs, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(z), rz)


@pytest.mark.parametrize('bits,symmetric,signed', [(4, False, False), (3, True, True), (8, False, True)])
def test_lp_search_equals_bruteforce_and_beats_minmax(bits, symmetric, signed):
  rng = np.random.default_rng(bits)
  # Heavy-tailed weights, per-output-channel (axis -1 of a [in, out] kernel).
  w = (rng.standard_t(2, size=(1152, 12)) * 0.05).astype(np.float32)
  s, z = Q.lp_search_params(w, bits, channel_axis=-1, p=2.4, n_candidates=80, symmetric=symmetric, signed=signed)
  rs, rz, re = _brute_lp(w.T, bits, 2.4, 80, symmetric, signed)
  s, z = np.asarray(s)[0], np.asarray(z)[0]
  # Lp error of the returned params, in float64.
  e = np.array([np.mean(np.abs(w[:, c] - _np_fq(w[:, c].astype(np.float64), s[c], z[c], bits, signed)) ** 2.4)
                for c in range(w.shape[1])])
  np.testing.assert_allclose(e, re, rtol=1e-4)
  np.testing.assert_allclose(s, rs, rtol=1e-5)
  np.testing.assert_array_equal(z, rz)
  # No worse than min-max (errors in float64).
  ms, mz = (np.asarray(a)[0] for a in Q.minmax_params(w, bits, -1, symmetric, signed))
  em = np.array([np.mean(np.abs(w[:, c] - _np_fq(w[:, c].astype(np.float64), ms[c], mz[c], bits, signed)) ** 2.4)
                 for c in range(w.shape[1])])
  assert np.all(e <= em * (1 + 1e-5))
  if bits <= 4:
    assert np.mean(e) < 0.95 * np.mean(em)   # heavy tails at low bits: clipping helps


def test_lp_search_per_tensor_conv_kernel_shape():
  rng = np.random.default_rng(3)
  k = rng.standard_t(3, size=(3, 3, 8, 16)).astype(np.float32)
  s, z = Q.lp_search_params(k, 4)
  assert s.shape == (1, 1, 1, 1) and z.shape == (1, 1, 1, 1)
  rs, rz, _ = _brute_lp(k.reshape(1, -1), 4, 2.4, 80, False, False)
  np.testing.assert_allclose(float(s.reshape(())), rs[0], rtol=1e-5)
  s, z = Q.lp_search_params(k, 4, channel_axis=-1)
  assert s.shape == (1, 1, 1, 16)


def test_docs_example_quantizes_kernels_of_a_flax_model():
  """The docs/quant.md recipe: per-output-channel Lp search on every 'kernel' leaf, other leaves untouched."""
  import flax.linen as nn
  import jax

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5)(nn.GroupNorm(2)(nn.Conv(6, (3, 3))(x)))

  x = np.ones((1, 4, 4, 3), np.float32)
  params = Net().init(jax.random.PRNGKey(0), x)['params']

  def quantize_kernels(params, bits=4):
    def fq(path, w):
      if getattr(path[-1], 'key', None) != 'kernel':
        return w
      s, z = Q.lp_search_params(w, bits, channel_axis=-1)
      return Q.fake_quant(w, s, z, bits)
    return jax.tree_util.tree_map_with_path(fq, params)

  pq = jax.jit(quantize_kernels, static_argnums=1)(params, 4)
  for name in ['Conv_0', 'Dense_0']:
    k, kq = np.asarray(params[name]['kernel']), np.asarray(pq[name]['kernel'])
    assert not np.array_equal(k, kq)
    for c in range(k.shape[-1]):
      assert len(np.unique(kq[..., c])) <= 16
    np.testing.assert_array_equal(np.asarray(pq[name]['bias']), np.asarray(params[name]['bias']))
  np.testing.assert_array_equal(np.asarray(pq['GroupNorm_0']['scale']), np.asarray(params['GroupNorm_0']['scale']))
  assert Net().apply({'params': pq}, x).shape == (1, 4, 4, 5)
