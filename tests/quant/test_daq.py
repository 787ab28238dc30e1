"""DAQ: log-likelihood ratio vs scipy reference; distribution-driven choice; per-step quantizer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax import quant as Q


def _pareto(rng, shape, a=1.5, xmin=1e-3):
  return xmin * (1. - rng.random(shape)) ** (-1. / a)     # density ~ x^-(a+1)


def test_llr_matches_scipy_reference():
  stats = pytest.importorskip('scipy.stats')
  rng = np.random.default_rng(0)
  x = _pareto(rng, 4000)
  xmin = float(np.quantile(x, 0.2))
  r = float(Q.powerlaw_vs_exponential_llr(x, x_min=xmin))
  t = x[x >= xmin].astype(np.float64)
  alpha = 1 + t.size / np.sum(np.log(t / xmin))
  lam = 1 / np.mean(t - xmin)
  ref = (stats.pareto(b=alpha - 1, scale=xmin).logpdf(t).sum() - stats.expon(loc=xmin, scale=1 / lam).logpdf(t).sum())
  np.testing.assert_allclose(r, ref, rtol=1e-3)
  # Default x_min is the 0.1 quantile of the positive values.
  np.testing.assert_allclose(float(Q.default_x_min(np.concatenate([x, np.zeros(50)]))), np.quantile(x, 0.1),
                             rtol=1e-5)
  z = float(Q.powerlaw_vs_exponential_llr(x, x_min=xmin, normalized=True))
  assert z > 2.


def test_choice_follows_distribution():
  rng = np.random.default_rng(1)
  n = 3000
  steps = np.stack([_pareto(rng, n, 1.2), _pareto(rng, n, 2.5), rng.random(n), rng.exponential(0.01, n),
                    rng.uniform(0.2, 0.9, n), _pareto(rng, n, 0.8)]).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(Q.choose_log2(steps)), [True, True, False, False, False, True])
  table = Q.choice_table({'down/attn/softmax': steps[:3], 'mid/attn/softmax': steps[3:]})
  np.testing.assert_array_equal(table['down/attn/softmax'], [True, True, False])
  np.testing.assert_array_equal(table['mid/attn/softmax'], [False, False, True])


def test_daq_quantizer_selects_per_step():
  rng = np.random.default_rng(2)
  n = 2048
  vals = np.stack([_pareto(rng, n, 1.2), rng.random(n)]).astype(np.float32)
  vals = vals / vals.max(1, keepdims=True)
  q = Q.init_daq_quantizer(vals, bits=4, log_kind='logsqrt2')
  np.testing.assert_array_equal(np.asarray(q.use_log2), [True, False])
  f = jax.jit(Q.daq_fake_quant)
  x = jnp.asarray(vals[0])
  np.testing.assert_array_equal(np.asarray(f(x, q, 0)), np.asarray(Q.logsqrt2_fake_quant(x, q.delta[0], 4)))
  np.testing.assert_array_equal(np.asarray(f(x, q, 1)), np.asarray(Q.fake_quant(x, q.scale[1], 0., 4)))
  assert len(jax.tree_util.tree_leaves(q)) == 3
