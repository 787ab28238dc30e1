"""int32 accumulator guard of the integer path (tcaq_jax/quant/intops.py `accumulator_bound`,
tcaq_jax/quant/intexec.py `int_plan`): the closed form K (2^a - 1)(2^b - 1) against brute-force maxima of every
int32 value the kernels form (Python / NumPy int64), the kernel exact up to it and wrong one step past it, layers
and attention matmuls just below / above it routed 'int' / fake, and the shipped models' W8A8 plans unchanged."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.assets import DEMO_UNET_DIR
from tcaq_jax.export.synthetic import random_params
from tcaq_jax.models import configs, family
from tcaq_jax.models.qpoint import QuantMatmul, QuantPoint
from tcaq_jax.quant import intops
from tcaq_jax.quant.apply import ApplyError
from tcaq_jax.quant.intexec import IntMatmul, int_matmul, int_plan
from tcaq_jax.quant.policy import LayerSpec, build_policy
from tcaq_jax.quant.state import LayerQState

INT32_MAX = 2 ** 31 - 1


def _carried(bits):
  """(codes - offset, all values) of b-bit unsigned codes as the kernels carry them in int8."""
  off = 128 if bits == 8 else 0
  return np.arange(2 ** bits, dtype=np.int64) - off


def _element_terms(qa, za, qb, zb):
  """Per reduced element, every int32 value int_dense / int_conv / int_einsum form (intops.py; their sums over
  the K elements, or K times them, are the kernel's values): product, row / kernel sums, the corrections, the
  two partial results of `acc - row zb - za b_sum + K za zb`, the result."""
  return [qa * qb, qa, qb, qa * zb, za * qb, za, za * zb, qa * qb - qa * zb, qa * qb - qa * zb - za * qb,
          (qa - za) * (qb - zb)]


@pytest.mark.parametrize('a_bits,b_bits', [(8, 8), (8, 4), (4, 8), (5, 5), (2, 8), (3, 6)])
def test_bound_is_the_largest_value_any_kernel_term_takes(a_bits, b_bits):
  ca, cb = _carried(a_bits), _carried(b_bits)
  # Every code q' and zero point z' of both operands; z'b over its full range where the 4-D grid stays
  # <= 2^22 points, else its two ends (each term is affine in z'b, so |term| is largest at an end).
  zbs = cb if ca.size ** 2 * cb.size ** 2 <= 2 ** 22 else cb[[0, -1]]
  worst = np.zeros(10, np.int64)
  for chunk in np.array_split(ca, max(1, ca.size // 32)):       # chunks over q'a keep arrays at a few MB
    qa, za, qb, zb = np.ix_(chunk, ca, cb, zbs)
    worst = np.maximum(worst, [np.abs(t).max() for t in _element_terms(qa, za, qb, zb)])
  closed = (2 ** a_bits - 1) * (2 ** b_bits - 1)
  assert intops.accumulator_bound(1, a_bits, b_bits) == closed
  assert worst.max() == worst[-1] == closed              # the result's worst case bounds every other value
  if (a_bits, b_bits) == (8, 8):
    assert worst[-2] == 48896                            # the docstring's next-to-last term
  assert intops.accumulator_bound(1000, a_bits, b_bits) == 1000 * closed


@pytest.mark.parametrize('k,a_bits,b_bits', [(1, 2, 3), (2, 2, 2), (3, 2, 2), (2, 3, 2)])
def test_bound_is_the_brute_force_worst_case_of_small_layers(k, a_bits, b_bits):
  """Every code vector, zero point pair of a K-element reduction; the kernel's int32 values in Python ints,
  in its order (prefix sums of the product accumulation included)."""
  ca, cb = range(2 ** a_bits), range(2 ** b_bits)
  worst = 0
  for qa in itertools.product(ca, repeat=k):
    for qb in itertools.product(cb, repeat=k):
      acc = list(itertools.accumulate(x * y for x, y in zip(qa, qb)))
      row, b_sum = sum(qa), sum(qb)
      for za, zb in itertools.product(ca, cb):
        r1 = acc[-1] - row * zb
        r2 = r1 - za * b_sum
        vals = acc + [row, b_sum, row * zb, za * b_sum, k * za, k * za * zb, r1, r2, r2 + k * za * zb]
        assert r2 + k * za * zb == sum((x - za) * (y - zb) for x, y in zip(qa, qb))
        worst = max(worst, max(abs(v) for v in vals))
  assert worst == intops.accumulator_bound(k, a_bits, b_bits)


def test_int_dense_is_exact_at_the_bound_and_wrong_one_element_past_it():
  k_max = INT32_MAX // (255 * 255)
  assert k_max == 33025 and intops.accumulator_bound(k_max, 8, 8) <= INT32_MAX
  assert intops.accumulator_bound(k_max + 1, 8, 8) > INT32_MAX
  dense = jax.jit(intops.int_dense)
  for k in (k_max, k_max + 1):
    # codes 255 against zero point 0 on both operands (carried as 127 and -128): every product is 255^2
    xq, wq = jnp.full((1, k), 127, jnp.int8), jnp.full((k, 1), 127, jnp.int8)
    got = int(np.asarray(dense(xq, -128, wq, jnp.full((1,), -128, jnp.int32)))[0, 0])
    if k == k_max:
      assert got == k * 255 * 255
    else:
      assert got != k * 255 * 255                       # an int32 cannot hold it: the guard is needed


class _Attn(nn.Module):
  @nn.compact
  def __call__(self, q, k):
    q, k = QuantPoint(kind='matmul', name='qk_q')(q), QuantPoint(kind='matmul', name='qk_k')(k)
    return QuantMatmul('bic,bjc->bij', ('qk_q', 'qk_k'), name='qk_matmul')(q, k)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x_dense, x_conv, q, k):
    return (nn.Dense(2, name='dense')(x_dense), nn.Conv(2, (3, 3), name='conv')(x_conv),
            _Attn(name='attn')(q, k))


def _plan(k_dense, c_conv, c_attn, w_bits=8):
  args = (jax.ShapeDtypeStruct((1, k_dense), jnp.float32), jax.ShapeDtypeStruct((1, 4, 4, c_conv), jnp.float32),
          jax.ShapeDtypeStruct((1, 3, c_attn), jnp.float32), jax.ShapeDtypeStruct((1, 2, c_attn), jnp.float32))
  model = _Net()
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)      # shapes only, no FLOPs
  policy = build_policy(model, variables, args, 'qdiff', w_bits=w_bits, a_bits=8)
  return int_plan(model, variables, policy, *args)


def test_layers_and_matmuls_just_below_the_bound_run_on_integers_and_just_above_keep_fake_quant():
  # 8/8 bits: K <= 33,025. Conv K = 3 x 3 x Cin: 3669 -> 33,021, 3670 -> 33,030.
  routes, matmuls = _plan(33025, 3669, 33025)
  assert routes == {'dense': 'int', 'conv': 'int', 'attn/qk_q': 'int', 'attn/qk_k': 'int'}
  assert matmuls == {'attn/qk_matmul': IntMatmul('bic,bjc->bij', 'attn/qk_q', 'attn/qk_k')}
  routes, matmuls = _plan(33026, 3670, 33026)
  assert routes['dense'].startswith('int32 accumulator could overflow: K=33026, bits 8x8: ')
  assert routes['conv'].startswith('int32 accumulator could overflow: K=33030, bits 8x8: ')
  for p in ('attn/qk_q', 'attn/qk_k'):
    assert routes[p].startswith('int32 accumulator could overflow: K=33026, bits 8x8: ')
    assert "'attn/qk_matmul'" in routes[p]
  assert matmuls == {}
  # W4A8 dense: K <= (2^31 - 1) // (255 x 15) = 561,433
  assert _plan(561433, 8, 8, w_bits=4)[0]['dense'] == 'int'
  assert _plan(561434, 8, 8, w_bits=4)[0]['dense'].startswith('int32 accumulator could overflow: K=561434, bits 8x4')


def test_int_matmul_refuses_a_contraction_past_the_bound():
  st = LayerQState(a_scale=jnp.ones((1, 1), jnp.float32), a_zero=jnp.zeros((1, 1), jnp.float32))
  spec = LayerSpec(path='p', kind='matmul', in_features=0, w_bits=None, a_bits=8)
  a = jnp.zeros((1, 1, 33026), jnp.float32)
  with pytest.raises(ApplyError, match='int32 accumulator could overflow: K=33026'):
    int_matmul('bic,bjc->bij', a, st, spec, a, st, spec, jnp.int32(0))


@pytest.mark.parametrize('name', ['demo', 'ddim_tiny'])
def test_shipped_model_plans_at_w8a8_keep_every_layer_on_integers(name):
  if name == 'demo':
    model, params, config = family.load(DEMO_UNET_DIR)
  else:
    config = configs.get_config(name)
    model = configs.build_model(config)
    params = random_params(config, 0, model)
  (x, t), kw = family.example_inputs(config, 1)
  policy = build_policy(model, {'params': params}, (x, t), 'qdiff', w_bits=8, a_bits=8, example_kwargs=kw)
  routes, matmuls = int_plan(model, {'params': params}, policy, x, t, **kw)
  quantized = {s.path for s in policy.quantized()}
  assert quantized and routes == {p: 'int' for p in quantized}           # nothing refused, as before the guard
  points = {p for p in quantized if policy.layers[p].kind in ('matmul', 'softmax')}
  assert points and {q for mm in matmuls.values() for q in (mm.a, mm.b)} == points
  # headroom, from the kernels themselves: the largest conv / dense reduction is far below 33,025
  kernels = [np.shape(v) for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
             if getattr(path[-1], 'key', None) == 'kernel']
  assert max(int(np.prod(s[:-1])) for s in kernels) * 255 * 255 < INT32_MAX // 4
