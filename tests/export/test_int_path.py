"""The integer path against the fake-quant path it replaces (tcaq_jax/quant/intexec.py, tcaq_jax/export/), on
synthetic calibration state (tests/export/conftest.py).

Per integer layer and attention matmul, on the inputs one full UNet forward gives it, the float32 summation bound of
tests/export/int_check.py holds. Chained through a whole forward the two paths also agree except where such a
rounding difference moves a downstream activation across a rounding tie (one code step): measured in
`test_fake_backend_is_the_calibration_fake_path_and_int_is_close` and in docs/results/export.md."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.quant.intexec import IntMatmul

from int_check import assert_same_state, inputs, layer_pairs, rel_l2, worst_excess  # noqa: E402  (int_check.py)


@pytest.fixture(scope='module')
def pairs(exported):
  cache = {}

  def get(name):
    if name not in cache:
      m = exported(name)[1]
      x, t, cond = inputs(m.config)
      cache[name] = layer_pairs(m, x, t, cond, STEP)
    return cache[name]
  return get


STEP = 3


@pytest.mark.parametrize('name', ['tiny', 'demo'])
def test_every_integer_layer_equals_fake_quant_to_float_rounding(exported, pairs, name):
  _, m, _ = exported(name)
  ints = {p for p, r in m.routes.items() if r == 'int'}
  # every conv / linear is on the integer path, at both bit widths, and so is every attention matmul (its
  # operand points route 'int'); nothing keeps fake quant (log post-Softmax slots do, inside int_matmul)
  layers = {p for p, s in m.policy.layers.items() if s.kind in ('conv', 'dense') and s.weights}
  points = {p for p, s in m.policy.layers.items() if s.kind in ('matmul', 'softmax')}
  assert ints == layers | points and not m.fallback()
  assert {m.policy.layers[p].w_bits for p in layers} == {4, 8}
  assert any(m.policy.layers[p].split for p in layers)
  matmuls = {p: op for p, op in m.int_layers.items() if isinstance(op, IntMatmul)}
  assert {q for op in matmuls.values() for q in (op.a, op.b)} == points and len(matmuls) == len(points) // 2
  found, fake, int_eps = pairs(name)
  assert set(found) == set(m.int_layers) == layers | set(matmuls)
  worst = worst_excess(m, found)
  assert set(worst) == {4, 8, 'matmul'} and min(worst.values()) > 0   # distinct computations (not the same ops)
  assert 0 < rel_l2(int_eps, fake) < 5e-2     # whole forward: rounding-tie flips only (docs/results/export.md)


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
  _, fake, int_eps = pairs('demo')
  rel = rel_l2(int_eps, fake)
  assert 0 < rel < 1e-2, rel


def test_three_way_daq_state_is_exported_bit_for_bit(exported):
  """The output-error DAQ's state (both log deltas, use_log2 0 / 1 / 2 per slot) and all other quantizer state
  of the synthetic tiny model come back from the exported dir unchanged."""
  q, m, _ = exported('tiny')
  assert_same_state(q, m)
  softmax = [s.path for s in m.policy.quantized() if s.kind == 'softmax']
  assert softmax
  for p in softmax:
    st = m.qstate.layers[p]
    assert st.has('log2_delta') and st.has('logsqrt2_delta')
    assert sorted(np.asarray(st.use_log2).tolist()) == [0., 1., 2.]


def test_int8_operands_reach_conv_and_dot_general(exported):
  _, m, _ = exported('tiny')
  x, t, cond = inputs(m.config)
  jaxpr = jax.make_jaxpr(m.eps_fn('int'))(x, t, 0, cond)
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
  specs = [m.policy.layers[p] for p, r in m.routes.items() if r == 'int' and p in m.int_layers]
  matmuls = sum(isinstance(op, IntMatmul) for op in m.int_layers.values())
  assert found['conv_general_dilated'] == sum(s.n_segments for s in specs if s.kind == 'conv')
  assert found['dot_general'] == sum(s.n_segments for s in specs if s.kind == 'dense') + matmuls
  assert matmuls > 0 and any(s.kind == 'dense' for s in specs)
