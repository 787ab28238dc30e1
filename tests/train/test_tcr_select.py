"""Per-layer TCR selection (tcaq_jax/train/tcr_select.py, issue 14 part 2): the layer output errors against a
float64 NumPy reference, and the choice rule."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.quant.policy import LayerSpec
from tcaq_jax.train import tcr_select


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(5, (3, 3), padding='SAME', name='c')(x)
    return nn.Dense(2, name='d')(h)


def _fq(x, s, z, bits):
  return (np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


def _minmax(x, bits, axis=None):
  """Asymmetric min-max (scale, zero) in float64 (per tensor, or per row of axis)."""
  lo = np.minimum(x.min(axis=axis, keepdims=axis is not None), 0.)
  hi = np.maximum(x.max(axis=axis, keepdims=axis is not None), 0.)
  s = (hi - lo) / (2 ** bits - 1)
  return s, np.clip(-np.round(lo / s), 0, 2 ** bits - 1)


def _conv3x3(x, w):
  """SAME 3x3 conv, stride 1, NHWC x HWIO, float64."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, wd = x.shape[1:3]
  return sum(np.einsum('bhwc,co->bhwo', xp[:, i:i + h, j:j + wd], w[i, j]) for i in range(3) for j in range(3))


def test_layer_errors_match_a_float64_reference():
  bits = 4
  model = _Net()
  x = np.array(jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 3)), np.float32)
  x[..., 2] *= 8.0                                                    # one wide channel: TCR matters
  params = model.init(jax.random.PRNGKey(1), x)['params']
  policy = types.SimpleNamespace(layers={'c': LayerSpec('c', 'conv', 3, bits, bits),
                                         'd': LayerSpec('d', 'dense', 5, bits, bits)})
  rng = np.random.default_rng(0)
  base = {'c': jnp.asarray(rng.uniform(1, 6, 3), jnp.float32), 'd': jnp.asarray(rng.uniform(1, 3, 5), jnp.float32)}
  exps = (0.0, 0.5, 1.0)
  kernels = {p: np.asarray(params[p]['kernel'], np.float64) for p in ('c', 'd')}
  # weight quantizers per candidate: min-max per output channel of W diag(r^e)
  states = []
  for e in exps:
    st = {}
    for p, w in kernels.items():
      we = w * (np.asarray(base[p], np.float64) ** e)[:, None]
      s, z = _minmax(we.reshape(-1, we.shape[-1]).T, bits, axis=1)
      shape = (1,) * (w.ndim - 1) + (w.shape[-1],)
      st[p] = types.SimpleNamespace(w_scale=jnp.asarray(s.reshape(shape), jnp.float32),
                                    w_zero=jnp.asarray(z.reshape(shape), jnp.float32))
    states.append(st)
  fwd = lambda consts, xb: model.apply({'params': consts}, xb)
  fn = tcr_select.make_select(fwd, policy, ('c', 'd'), pcts=(100.0,))
  slots = np.array([0, 1, 0, 1, 1, 0])
  got = tcr_select.layer_errors(fn, base, states, exps, [x], slots, 2, batch=16, seed=0, consts=params)
  rel = tcr_select.layer_errors(fn, base, states, exps, [x], slots, 2, batch=16, seed=0, consts=params,
                                relative=True)

  x64 = x.astype(np.float64)
  b = {p: np.asarray(params[p]['bias'], np.float64) for p in ('c', 'd')}
  h = _conv3x3(x64, kernels['c']) + b['c']
  ops = {'c': (x64, lambda xin, w: _conv3x3(xin, w) + b['c']), 'd': (h, lambda xin, w: xin @ w + b['d'])}
  for p, (inp, op) in ops.items():
    want, want_rel = np.zeros(len(exps)), np.zeros(len(exps))
    for a, e in enumerate(exps):
      r = np.asarray(base[p], np.float64) ** e
      st = states[a][p]
      wq = _fq(kernels[p] * r[:, None], np.asarray(st.w_scale, np.float64), np.asarray(st.w_zero, np.float64), bits)
      for k in (0, 1):
        xk = inp[slots == k] / r
        s, z = _minmax(xk, bits)
        ref = op(inp[slots == k], kernels[p])
        err = np.mean((op(_fq(xk, s, z, bits), wq) - ref) ** 2)
        want[a] += err
        want_rel[a] += err / np.mean(ref ** 2)
    np.testing.assert_allclose(got[p], want, rtol=2e-4)
    np.testing.assert_allclose(rel[p], want_rel, rtol=2e-4)
  assert got['c'][0] != got['c'][2]                           # the candidates differ


def test_choose_takes_the_lowest_error_and_ties_go_to_the_smaller_exponent():
  errs = {'a': [3.0, 1.0, 2.0], 'b': [1.0, 1.0, 1.0], 'c': [5.0, 4.0, 0.5]}
  assert tcr_select.choose(errs, (0.0, 0.5, 1.0)) == {'a': 0.5, 'b': 0.0, 'c': 1.0}
  # exponents given in another order: ties still go to the smallest exponent
  assert tcr_select.choose({'b': [1.0, 1.0, 1.0]}, (1.0, 0.0, 0.5)) == {'b': 0.0}


def test_tempered_ratios():
  r = {'x': jnp.asarray([1.0, 4.0, 9.0])}
  np.testing.assert_allclose(tcr_select.tempered(r, 0.5)['x'], [1.0, 2.0, 3.0], rtol=1e-6)
  np.testing.assert_array_equal(tcr_select.tempered(r, 0.0)['x'], [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(tcr_select.tempered(r, 1.0)['x'], r['x'])
