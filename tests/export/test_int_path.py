"""The integer path against the fake-quant path it replaces (tcaq_jax/quant/intexec.py, tcaq_jax/export/).

Bound, per integer layer, on the inputs one full UNet forward gives it (fake path; the int path computes the
layer from the same input): with u = 2^-24, K the reduction size (kernel window x input channels), â the
fake-quantized input and ŵ the dequantized kernel,
    |y_int - y_fake| <= (K + 2) u max|â| sum_k |ŵ_k,o| + 2 u |y_fake|
(the int path is exact up to the rescale; the fake path's float32 sum of K products has the classic
(K + 2) u sum|â ŵ| error bound). Chained through a whole forward the two paths also agree except where such a
rounding difference moves a downstream activation across a rounding tie (one code step): measured in
`test_full_forward_differs_only_by_rare_code_flips` and in docs/results/export.md."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.models import family
from tcaq_jax.quant import intexec
from tcaq_jax.quant.apply import _at_slot, act_interceptor, slot_of
from tcaq_jax.quant.uniform import qrange

U = 2.0 ** -24


def _inputs(config, seed=1):
  x = jax.random.normal(jax.random.PRNGKey(seed), (2,) + family.sample_shape(config))
  return x, jnp.asarray([700, 20], jnp.int32)


def _layer_pairs(m, x, t, step):
  """({path: (y_fake, y_int, bound)} for every integer layer along one fake-quant forward, eps of that forward)."""
  fake = act_interceptor(m.qstate, m.policy, step)
  slot = slot_of(m.qstate, step)

  def run(params, qstate, int_layers, x, t):
    found = {}

    def icpt(next_fun, args, kwargs, ctx):
      path = '/'.join(ctx.module.path)
      y = fake(next_fun, args, kwargs, ctx)
      if ctx.method_name == '__call__' and path in int_layers and path not in found:
        st, spec, iw = qstate.layers[path], m.policy.layers[path], int_layers[path]
        y_int = intexec._int_layer(ctx.module, args[0], st, spec, iw, slot)
        qmin, qmax = qrange(spec.a_bits)
        s, z = _at_slot(st.a_scale, slot), _at_slot(st.a_zero, slot)
        a_max = jnp.max(s * jnp.maximum(jnp.abs(qmin - z), jnp.abs(qmax - z)))
        w = params
        for k in path.split('/'):
          w = w[k]
        w = w['kernel']
        bound = (np.prod(w.shape[:-1]) + 2) * U * a_max * jnp.sum(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
        found[path] = (y, y_int, bound + 2 * U * jnp.abs(y))
      return y

    with nn.intercept_methods(icpt):
      eps = m.model.apply({'params': params}, x, t)
    return found, eps

  return jax.jit(run)(m.params, m.qstate, m.int_layers, x, t)


@pytest.fixture(scope='module')
def pairs(exported):
  cache = {}

  def get(name):
    if name not in cache:
      m = exported(name)[1]
      x, t = _inputs(m.config)
      cache[name] = jax.device_get(_layer_pairs(m, x, t, STEP))
    return cache[name]
  return get


STEP = 3


@pytest.mark.parametrize('name', ['tiny', 'demo'])
def test_every_integer_layer_equals_fake_quant_to_float_rounding(exported, pairs, name):
  _, m, _ = exported(name)
  ints = [p for p, r in m.routes.items() if r == 'int']
  # every conv / linear is on the integer path, at both bit widths; only the attention points keep fake quant
  assert set(ints) == {p for p, s in m.policy.layers.items() if s.kind in ('conv', 'dense') and s.weights}
  assert {m.policy.layers[p].w_bits for p in ints} == {4, 8}
  assert any(m.policy.layers[p].split for p in ints)
  assert set(m.fallback()) == {p for p, s in m.policy.layers.items() if s.kind in ('matmul', 'softmax')}
  found, _ = pairs(name)
  assert set(found) == set(ints)
  worst = {4: 0.0, 8: 0.0}
  for path, (y_fake, y_int, bound) in found.items():
    assert np.all(np.isfinite(y_int)), path
    excess = np.abs(y_int - y_fake) / bound
    assert np.all(excess <= 1.0), (path, float(excess.max()))
    bits = m.policy.layers[path].w_bits
    worst[bits] = max(worst[bits], float(excess.max()))
  assert min(worst.values()) > 0         # the two paths are distinct computations (not the same float ops)


def _numpy_fake_quant_kernel(kernel, st, bits):
  """Independent NumPy reference of the run's hard-rounded weights: AdaRound codes of W diag(r); also where
  w / s is within float32 rounding of an integer (floor may then go either way in another float program)."""
  w = np.asarray(kernel, np.float32)
  if st.r is not None:
    w = w * np.asarray(st.r, np.float32)[:, None]
  s, z = np.asarray(st.w_scale, np.float32), np.asarray(st.w_zero, np.float32)
  v = w / s
  codes = np.clip(np.floor(v) + (np.asarray(st.alpha) >= 0) + z, 0, 2 ** bits - 1)
  return (codes - z) * s, np.abs(v - np.round(v)) <= 4e-7 * np.maximum(np.abs(v), 1)


def test_fake_backend_is_the_calibration_fake_path_and_int_is_close(exported, pairs):
  """The export's weights are the run's hard-rounded fake-quant weights (NumPy reference; bit for bit except one
  code step where w / s is a float32 rounding away from an integer); the
  'int' backend's eps differs from the 'fake' one only through rare code flips at rounding ties."""
  from tcaq_jax.export.synthetic import params_at
  q, m, _ = exported('demo')
  for p, spec in m.policy.layers.items():
    if spec.weights:
      want, tie = _numpy_fake_quant_kernel(params_at(q.params, p)['kernel'], q.qstate.layers[p], spec.w_bits)
      got = np.asarray(params_at(m.params, p)['kernel'])
      step = np.broadcast_to(np.asarray(q.qstate.layers[p].w_scale), got.shape)
      assert np.all((got == want) | (tie & np.isclose(np.abs(got - want), step, rtol=1e-6))), p
      assert (got != want).mean() < 1e-4, p
  x, t = _inputs(m.config)
  _, fake = pairs('demo')
  got = np.asarray(jax.jit(m.eps_fn('int'))(x, t, STEP, None))
  rel = np.linalg.norm(got - fake) / np.linalg.norm(fake)
  assert 0 < rel < 1e-2, rel


def test_int8_operands_reach_conv_and_dot_general(exported):
  _, m, _ = exported('tiny')
  x, t = _inputs(m.config)
  jaxpr = jax.make_jaxpr(m.eps_fn('int'))(x, t, 0, None)
  found = {'conv_general_dilated': 0, 'dot_general': 0}

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name in found and all(v.aval.dtype == jnp.int8 for v in eqn.invars):
        assert eqn.params['preferred_element_type'] == jnp.int32
        found[eqn.primitive.name] += 1
      for p in eqn.params.values():
        if hasattr(p, 'jaxpr'):
          walk(p.jaxpr if hasattr(p.jaxpr, 'eqns') else p.jaxpr.jaxpr)

  walk(jaxpr.jaxpr)
  specs = [m.policy.layers[p] for p, r in m.routes.items() if r == 'int']
  assert found['conv_general_dilated'] == sum(s.n_segments for s in specs if s.kind == 'conv')
  assert found['dot_general'] == sum(s.n_segments for s in specs if s.kind == 'dense') > 0
