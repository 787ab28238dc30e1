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


# ------------------------------------------------------------------ output-error rule (issue 14, part 3)
from tcaq_jax.quant.daq import choose_by_error, output_errors, powerlaw_vs_exponential_llr  # noqa: E402
from tcaq_jax.quant.log2 import log2_search_delta  # noqa: E402


def _np_log(p, delta, bits, k):
  """A float64 NumPy log quantizer (k = 1 log2, 2 log-sqrt2; underflow to 0) as RepQ-ViT defines it."""
  raw = np.round(-k * np.log2(np.where(p > 0, p, delta) / delta))
  codes = np.clip(raw, 0, 2 ** bits - 1)
  return np.where((p > 0) & (raw <= 2 ** bits - 1), delta * 2. ** (-codes / k), 0.)


def _attention(rng, spread, b=2, n=64, c=8):
  logits = rng.standard_normal((b, n, n)) * spread
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).astype(np.float32), rng.standard_normal((b, n, c)).astype(np.float32)


@pytest.mark.parametrize('bits', [8, 4])
def test_output_errors_match_a_float64_reference(bits):
  p, v = _attention(np.random.default_rng(1), 3.0)
  scale, d2, ds = float(p.max()) / (2 ** bits - 1), float(p.max()) * 0.9, float(p.max()) * 0.8
  got = np.asarray(output_errors(jnp.asarray(p), jnp.asarray(v), scale, d2, ds, bits))
  p64, v64 = p.astype(np.float64), v.astype(np.float64)
  cands = [np.clip(np.round(p64 / scale), 0, 2 ** bits - 1) * scale, _np_log(p64, d2, bits, 1),
           _np_log(p64, ds, bits, 2)]
  ref = p64 @ v64
  want = [np.mean((c @ v64 - ref) ** 2) for c in cands]
  np.testing.assert_allclose(got, want, rtol=2e-3)


def test_error_rule_picks_uniform_where_the_likelihood_ratio_picks_log2():
  """As measured on the demo (issue 14): peaked softmax rows look power-law-like (LLR > 0 -> log2), but log2's
  coarse steps near the large probabilities dominate the error of probs @ V; uniform is far better there."""
  p, v = _attention(np.random.default_rng(0), 4.0)
  assert float(powerlaw_vs_exponential_llr(p)) > 0                       # the LLR rule would choose log2
  scale = float(p.max()) / 255
  d2, ds = (log2_search_delta(jnp.asarray(p), 8, k) for k in ('log2', 'logsqrt2'))
  err = np.asarray(output_errors(jnp.asarray(p), jnp.asarray(v), scale, d2, ds, 8))
  assert choose_by_error(err[None])[0] == 0 and err[1] > 10 * err[0]
  # and where the output depends on many tiny probabilities at 4 bits, log2 wins (uniform rounds them to 0)
  q = np.full((1, 64, 64), 1e-3, np.float32)
  q[..., 0] = 1. - 63e-3
  w = np.ones((1, 64, 2), np.float32)
  e4 = np.asarray(output_errors(jnp.asarray(q), jnp.asarray(w), float(q.max()) / 15, float(q.max()),
                                float(q.max()), 4))
  assert choose_by_error(e4[None])[0] == 1 and e4[1] < e4[0] / 10
  assert list(choose_by_error(np.array([[1., 1., 2.], [3., 2., 1.]]))) == [0, 2]    # ties: uniform


def test_a_layer_using_both_log_kinds_selects_per_slot():
  """use_log2 0 / 1 / 2 with both deltas stored: uniform / log2 / log-sqrt2 at that slot (apply.act_fake_quant),
  and the report names them (act_search.daq_choices)."""
  import types
  from tcaq_jax.quant.apply import act_fake_quant
  from tcaq_jax.quant.log2 import log_fake_quant
  from tcaq_jax.quant.state import LayerQState
  from tcaq_jax.quant.uniform import fake_quant
  from tcaq_jax.train.act_search import daq_choices
  x = jnp.asarray(np.random.default_rng(3).dirichlet(np.ones(16), size=(2, 16)), jnp.float32)
  st = LayerQState(a_scale=jnp.full((3, 1), 1. / 255), a_zero=jnp.zeros((3, 1)), log2_delta=jnp.full((3,), .9),
                   logsqrt2_delta=jnp.full((3,), .8), use_log2=jnp.asarray([0., 1., 2.]))
  spec = types.SimpleNamespace(kind='softmax', a_bits=8, split=None)
  want = [fake_quant(x, 1. / 255, 0., 8), log_fake_quant(x, .9, 8, 'log2'), log_fake_quant(x, .8, 8, 'logsqrt2')]
  for slot in range(3):
    np.testing.assert_array_equal(np.asarray(act_fake_quant(x, st, spec, jnp.int32(slot))), np.asarray(want[slot]))
  policy = types.SimpleNamespace(layers={'a/attn_probs': spec, 'b/attn_probs': spec})
  only_sqrt2 = LayerQState(logsqrt2_delta=jnp.ones(2), use_log2=jnp.asarray([1., 0.]))
  assert daq_choices({'a/attn_probs': st, 'b/attn_probs': only_sqrt2}, policy) == {
      'a/attn_probs': ['uniform', 'log2', 'logsqrt2'], 'b/attn_probs': ['logsqrt2', 'uniform']}
