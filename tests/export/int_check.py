"""Checks shared by the export tests: every integer layer and attention matmul against the fake-quant op it
replaces, on the inputs one full fake-quant forward gives it, with the float32 summation bound (tests/export/
test_int_path.py's docstring); and the whole-forward difference of the two backends.

Bound, per integer layer and output element: with u = 2^-24, K the reduction size (kernel window x input
channels), â the fake-quantized input and ŵ the dequantized kernel,
    |y_int - y_fake| <= (K + 2) u max|â| sum_k |ŵ_k,o| + 2 u |y_fake|
(the int path is exact up to the rescale; the fake path's float32 sum of K products has the classic
(K + 2) u sum|â ŵ| error bound). Per attention matmul (q k^T, probs @ v) of fake-quantized operands â, b̂ with
K contracted elements: |y_int - y_fake| <= (K + 5) u einsum(|â|, |b̂|) (the same sum bound plus the int
path's two rescale roundings, 3 u |y|); a slot whose post-Softmax DAQ choice is log2 / log-sqrt2 runs the fake
einsum itself."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.export.synthetic import params_at
from tcaq_jax.export.writer import ACT_FIELDS
from tcaq_jax.models import family
from tcaq_jax.quant import intexec, intops
from tcaq_jax.quant.apply import _at_slot, act_interceptor, quantize_weights, slot_of
from tcaq_jax.quant.uniform import qrange

U = 2.0 ** -24


def inputs(config, seed=1):
  """(x [2, *sample_shape], t [2], cond [2] or None): one early and one late timestep."""
  x = jax.random.normal(jax.random.PRNGKey(seed), (2,) + family.sample_shape(config))
  cond, _ = family.cond_arrays(config, 2, seed)
  return x, jnp.asarray([700, 20], jnp.int32), None if cond is None else jnp.asarray(cond)


def layer_pairs(m, x, t, cond, step):
  """({path: (y_fake, y_int, bound)} for every integer layer and attention matmul (IntMatmul) of the
  ExportedModel m along one fake-quant forward, eps of that forward, eps of the 'int' backend), as NumPy; one
  compiled call (CI's CPUs: the compile is most of the time)."""
  fake = act_interceptor(m.qstate, m.policy, step)
  slot = slot_of(m.qstate, step)
  kw = family.model_kwargs(m.config, cond)
  operands = {p for op in m.int_layers.values() if isinstance(op, intexec.IntMatmul) for p in (op.a, op.b)}

  def run(params, int_params, qstate, int_layers, x, t, kw):
    found, raw = {}, {}

    def icpt(next_fun, args, kwargs, ctx):
      path = '/'.join(ctx.module.path)
      if ctx.method_name == '__call__' and path in operands:
        raw.setdefault(path, args[0])
      y = fake(next_fun, args, kwargs, ctx)
      if ctx.method_name != '__call__' or path not in int_layers or path in found:
        return y
      op = int_layers[path]
      if isinstance(op, intexec.IntMatmul):
        a, b = raw[op.a], raw[op.b]
        y_int = intexec.int_matmul(op.equation, a, qstate.layers[op.a], m.policy.layers[op.a],
                                   b, qstate.layers[op.b], m.policy.layers[op.b], slot)
        k = intops.contracted_size(op.equation, a.shape, b.shape)
        found[path] = (y, y_int, (k + 5) * U * jnp.einsum(op.equation, jnp.abs(args[0]), jnp.abs(args[1])))
        return y
      st, spec = qstate.layers[path], m.policy.layers[path]
      y_int = intexec._int_layer(ctx.module, args[0], st, spec, op, slot)
      qmin, qmax = qrange(spec.a_bits)
      s, z = _at_slot(st.a_scale, slot), _at_slot(st.a_zero, slot)
      a_max = jnp.max(s * jnp.maximum(jnp.abs(qmin - z), jnp.abs(qmax - z)))
      w = params_at(params, path)['kernel']
      bound = (np.prod(w.shape[:-1]) + 2) * U * a_max * jnp.sum(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
      found[path] = (y, y_int, bound + 2 * U * jnp.abs(y))
      return y

    with nn.intercept_methods(icpt):
      eps = m.model.apply({'params': params}, x, t, **kw)
    eps_int = intexec.int_apply(m.model, {'params': int_params}, qstate, m.policy, int_layers, x, t,
                                step_index=step, **kw)
    return found, eps, eps_int

  return jax.device_get(jax.jit(run)(m.params, m.int_params, m.qstate, m.int_layers, x, t, kw))


def worst_excess(m, found) -> dict:
  """{w_bits of a layer, or 'matmul' for the attention matmuls: max over them and their elements of
  |y_int - y_fake| / bound}; asserts each one is finite and within its bound (<= 1)."""
  worst = {}
  for path, (y_fake, y_int, bound) in found.items():
    assert np.all(np.isfinite(y_int)), path
    excess = float(np.max(np.abs(y_int - y_fake) / np.maximum(bound, np.finfo(np.float32).tiny)))
    assert excess <= 1.0, (path, excess)
    key = m.policy.layers[path].w_bits if path in m.policy.layers else 'matmul'
    worst[key] = max(worst.get(key, 0.0), excess)
  return worst


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_same_state(q, m):
  """The ExportedModel m holds the QuantizedModel q's activation state (TCR r, scales, zero points, DAQ
  deltas and choices), its output bias correction and its hard-rounded fake-quant weights, bit for bit."""
  hard = quantize_weights(q.params, q.qstate, q.policy, 'hard')
  assert (m.qstate.out_bias is None) == (q.qstate.out_bias is None)
  if q.qstate.out_bias is not None:
    np.testing.assert_array_equal(np.asarray(m.qstate.out_bias), np.asarray(q.qstate.out_bias))
  assert (m.qstate.out_scale is None) == (q.qstate.out_scale is None)
  if q.qstate.out_scale is not None:
    np.testing.assert_array_equal(np.asarray(m.qstate.out_scale), np.asarray(q.qstate.out_scale))
  for spec in q.policy.quantized():
    want, got = q.qstate.layers[spec.path], m.qstate.layers.get(spec.path)
    for name in ACT_FIELDS:
      if spec.acts and want.has(name):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)),
                                      err_msg=f'{spec.path}:{name}')
    if spec.weights:
      np.testing.assert_array_equal(np.asarray(params_at(m.params, spec.path)['kernel']),
                                    np.asarray(params_at(hard, spec.path)['kernel']), err_msg=spec.path)
