"""TCR: ratio formula, truncation, exact reparameterization for conv / dense, quantization-error gain."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax import quant as Q


def _ref_ratio(m, r_tru=None):
  m = np.asarray(m, np.float64)
  num = np.zeros(m.shape[1]); den = np.zeros(m.shape[1])
  for t in range(m.shape[0]):
    s = m[t].min()
    num += m[t] * (m[t] / s)
    den += m[t]
  r = num / den
  return r if r_tru is None else np.minimum(r, r_tru)


def test_ratio_matches_formula_and_truncation():
  rng = np.random.default_rng(0)
  m = np.exp(rng.normal(size=(20, 32))).astype(np.float32)
  m[:, 5] *= 40.
  r = np.asarray(Q.tcr_ratio(m))
  np.testing.assert_allclose(r, _ref_ratio(m), rtol=1e-5)
  assert r.min() >= 1.
  rt = np.asarray(Q.tcr_ratio(m, r_tru=3.))
  assert rt.max() <= 3. and rt.min() >= 1.
  np.testing.assert_allclose(rt, _ref_ratio(m, 3.), rtol=1e-5)
  # 'mean' target: r_t = m_t / mean_c m_t.
  rm = np.asarray(Q.tcr_ratio(m, target='mean'))
  ref = (m.astype(np.float64) ** 2 / m.mean(1, keepdims=True)).sum(0) / m.sum(0)
  np.testing.assert_allclose(rm, ref, rtol=1e-5)
  # Dead channels do not break the min target.
  m2 = m.copy(); m2[:, 0] = 0.
  r2 = np.asarray(Q.tcr_ratio(m2))
  assert np.all(np.isfinite(r2)) and r2[0] == 1.
  with pytest.raises(Q.QuantConfigError):
    Q.tcr_ratio(m, target='max')


def _acts(seed, shape=(4, 8, 8, 16)):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  x[..., 3] *= 50.
  return x


def test_conv_and_dense_equivalence():
  x = _acts(1)
  r = Q.tcr_ratio(Q.channel_peaks(x)[None])
  rng = np.random.default_rng(2)
  k = rng.normal(size=(3, 3, 16, 8)).astype(np.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = conv(x, k)
  y2 = conv(Q.scale_activation(x, r), Q.scale_kernel_inputs(k, r))
  np.testing.assert_allclose(np.asarray(y2), np.asarray(y), rtol=1e-5, atol=1e-4 * float(jnp.max(jnp.abs(y))))
  # flax nn.Conv / nn.Dense through their params.
  for mod in [nn.Conv(8, (3, 3)), nn.Dense(8)]:
    params = mod.init(jax.random.PRNGKey(0), x)['params']
    p2 = dict(params, kernel=Q.scale_kernel_inputs(params['kernel'], r))
    ya = mod.apply({'params': params}, x)
    yb = mod.apply({'params': p2}, Q.scale_activation(x, r))
    np.testing.assert_allclose(np.asarray(yb), np.asarray(ya), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ya))))
  with pytest.raises(Q.QuantConfigError):
    Q.scale_kernel_inputs(k, jnp.ones(5))


def test_outlier_channel_quantization_error_drops():
  # 20 timesteps of 64-channel activations with one outlier channel whose size drifts over time.
  rng = np.random.default_rng(3)
  xs = []
  for t in range(20):
    x = rng.normal(size=(2, 8, 8, 64)).astype(np.float32)
    x[..., 3] *= 20. + t
    xs.append(x)
  peaks = jnp.stack([Q.channel_peaks(x) for x in xs])
  r = Q.tcr_ratio(peaks)
  e_plain, e_tcr = 0., 0.
  for x in xs:
    s, z = Q.minmax_params(x, 4)
    e_plain += float(jnp.mean((Q.fake_quant(x, s, z, 4) - x) ** 2))
    xr = Q.scale_activation(x, r)
    s, z = Q.minmax_params(xr, 4)
    # Error of the quantized x / r, measured in the original units (r is folded into W): (Q(x/r) r - x).
    e_tcr += float(jnp.mean((Q.fake_quant(xr, s, z, 4) * r - x) ** 2))
  assert e_tcr * 3. <= e_plain, (e_plain, e_tcr)
