"""quantized_apply (tcaq_jax/quant/apply.py) against float64 NumPy references written here.

A small Flax model exercises every interception kind: Dense, Conv on a concatenated skip (split quantizers),
attention-like QuantPoints ('matmul', 'softmax' with DAQ), per-timestep state indexed by a scalar or a per-sample
step index, TCR (kernel * r, input / r), and running one submodule alone by path.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.models.qpoint import QuantPoint
from tcaq_jax.quant import apply as A
from tcaq_jax.quant import policy as P
from tcaq_jax.quant import state as S
from tcaq_jax.quant.state import LayerQState, QState


class Skip(nn.Module):
  concat_split: int = 3

  def setup(self):
    self.nin_shortcut = nn.Conv(5, (1, 1))

  def __call__(self, h, skip):
    return self.nin_shortcut(jnp.concatenate([h, skip], axis=-1))


class Toy(nn.Module):
  """x: [B, 4, 4, 3] -> dense on channels, a split shortcut conv, a matmul operand and softmax probabilities."""

  def setup(self):
    self.fc = nn.Dense(3)
    self.blocks = [Skip(concat_split=3)]
    self.qk = QuantPoint(kind='matmul')
    self.probs = QuantPoint(kind='softmax')

  def __call__(self, x):
    h = self.fc(x)
    y = self.blocks[0](h, x)                                  # [B, 4, 4, 5]
    q = self.qk(y.reshape(y.shape[0], 16, 5))
    p = self.probs(jax.nn.softmax(q @ q.transpose(0, 2, 1), axis=-1))
    return p @ q


def fq_ref(x, s, z, bits):
  x, s, z = (np.asarray(a, np.float64) for a in (x, s, z))
  return (np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


def log2_ref(x, delta, bits):
  x = np.asarray(x, np.float64)
  with np.errstate(divide='ignore'):
    raw = np.round(-np.log2(np.where(x > 0, x, delta) / delta))
  under = (x <= 0) | (raw > 2 ** bits - 1)
  return np.where(under, 0., delta * 2. ** (-np.clip(raw, 0, 2 ** bits - 1)))


def softmax_ref(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope='module')
def setup():
  model = Toy()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3)) * 2.
  params = model.init(jax.random.PRNGKey(1), x)['params']
  pol = P.build_policy(model, {'params': params}, (x,), 'qdiff', w_bits=4, a_bits=6, softmax_bits=4)
  rng = np.random.default_rng(0)
  k = 3                                                   # calibration slots
  layers = {
      'fc': {'r': jnp.asarray([1., 2., 3.]), 'w_scale': jnp.full((1, 3), 0.1), 'w_zero': jnp.full((1, 3), 7.),
             'a_scale': jnp.asarray(rng.uniform(0.05, 0.2, (k, 1)), jnp.float32),
             'a_zero': jnp.asarray(rng.integers(10, 50, (k, 1)), jnp.float32)},
      'blocks_0/nin_shortcut': {
          'w_scale': jnp.asarray(rng.uniform(0.05, 0.1, (1, 1, 1, 5)), jnp.float32),
          'w_zero': jnp.full((1, 1, 1, 5), 8.),
          'a_scale': jnp.asarray(rng.uniform(0.05, 0.2, (k, 2)), jnp.float32),
          'a_zero': jnp.asarray(rng.integers(10, 50, (k, 2)), jnp.float32)},
      'qk': {'a_scale': jnp.full((k, 1), 0.2), 'a_zero': jnp.full((k, 1), 31.)},
      'probs': {'a_scale': jnp.full((k, 1), 1. / 15), 'a_zero': jnp.zeros((k, 1)),
                'log2_delta': jnp.asarray([1., 0.5, 1.]), 'use_log2': jnp.asarray([1., 0., 1.])},
  }
  step_slot = jnp.asarray([0, 0, 1, 1, 2], jnp.int32)     # 5 sampler steps -> 3 slots
  return model, params, pol, QState(step_slot, {p: LayerQState(**st) for p, st in layers.items()}), x


def reference(params, qs, x, slots):
  """Float64 NumPy forward of Toy with every quantizer; slots: [B] slot of each sample."""
  L = {p: {n: np.asarray(v, np.float64) for n, v in st.set_fields().items()} for p, st in qs.layers.items()}
  x = np.asarray(x, np.float64)
  b = x.shape[0]
  col = lambda v: v.reshape(b, 1, 1, 1)
  # fc: TCR (kernel * r, x / r), act quant per sample slot, weights per output channel.
  fc = L['fc']
  w = np.asarray(params['fc']['kernel'], np.float64) * fc['r'][:, None]
  xa = fq_ref(x / fc['r'], col(fc['a_scale'][slots, 0]), col(fc['a_zero'][slots, 0]), 6)
  h = xa @ fq_ref(w, fc['w_scale'], fc['w_zero'], 4) + np.asarray(params['fc']['bias'])
  # shortcut conv (1x1) on concat([h, x]) with two activation quantizers.
  sc = L['blocks_0/nin_shortcut']
  cat = np.concatenate([fq_ref(h, col(sc['a_scale'][slots, 0]), col(sc['a_zero'][slots, 0]), 6),
                        fq_ref(x, col(sc['a_scale'][slots, 1]), col(sc['a_zero'][slots, 1]), 6)], -1)
  kw = fq_ref(np.asarray(params['blocks_0']['nin_shortcut']['kernel'], np.float64), sc['w_scale'], sc['w_zero'], 4)
  y = cat @ kw[0, 0] + np.asarray(params['blocks_0']['nin_shortcut']['bias'])
  q = y.reshape(b, 16, 5)
  q = fq_ref(q, 0.2, 31., 6)
  p = softmax_ref(q @ q.transpose(0, 2, 1))
  pr = L['probs']
  out = []
  for i in range(b):
    s = slots[i]
    if pr['use_log2'][s] > 0.5:
      out.append(log2_ref(p[i], pr['log2_delta'][s], 4))
    else:
      out.append(fq_ref(p[i], pr['a_scale'][s, 0], 0., 4))
  return np.stack(out) @ q


def test_policy_of_toy(setup):
  _, _, pol, _, _ = setup
  assert pol.layers['blocks_0/nin_shortcut'].split == 3
  assert pol.layers['probs'].a_bits == 4 and pol.layers['qk'].a_bits == 6


@pytest.mark.parametrize('steps', [[0, 2], [4, 3]])
def test_quantized_apply_matches_numpy_per_sample_steps(setup, steps):
  model, params, pol, qs, x = setup
  got = A.quantized_apply(model, {'params': params}, qs, pol, x, step_index=jnp.asarray(steps, jnp.int32))
  slots = np.asarray(qs.step_slot)[steps]
  np.testing.assert_allclose(np.asarray(got), reference(params, qs, x, slots), rtol=2e-4, atol=2e-4)


def test_scalar_step_index_uses_one_slot_for_the_batch(setup):
  model, params, pol, qs, x = setup
  f = jax.jit(lambda s: A.quantized_apply(model, {'params': params}, qs, pol, x, step_index=s))
  for step in (1, 3):
    slot = int(qs.step_slot[step])
    np.testing.assert_allclose(np.asarray(f(jnp.int32(step))), reference(params, qs, x, np.array([slot, slot])),
                               rtol=2e-4, atol=2e-4)


def test_tcr_only_reparameterisation_is_exact(setup):
  model, params, pol, qs, x = setup
  got = A.quantized_apply(model, {'params': params}, qs, pol, x, step_index=0, weight_mode='fp', act_quant=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(model.apply({'params': params}, x)), rtol=1e-5,
                             atol=1e-6)


def test_adaround_soft_hard_and_nearest_weights(setup):
  _, params, pol, qs, _ = setup
  w = np.asarray(params['fc']['kernel'], np.float64) * np.array([1., 2., 3.])[:, None]
  v = w / 0.1
  frac = v - np.floor(v)
  # alpha with h(alpha) = frac -> soft weights are the unquantized ones (inside the range); hard = round-up
  # where alpha >= 0 (frac >= 0.5 up to the sigmoid/clip boundary).
  alpha = -np.log(1.2 / (frac + 0.1) - 1.)
  q2 = qs.merge({'fc': {'alpha': jnp.asarray(alpha, jnp.float32)}})
  soft = np.asarray(A.quantize_weights(params, q2, pol, 'soft')['fc']['kernel'])
  hard = np.asarray(A.quantize_weights(params, q2, pol, 'hard')['fc']['kernel'])
  near = np.asarray(A.quantize_weights(params, q2, pol, 'nearest')['fc']['kernel'])
  codes = np.floor(v) + 7.
  inside = (codes >= 0) & (codes + 1 <= 15)
  np.testing.assert_allclose(soft[inside], w[inside], rtol=1e-4, atol=1e-5)
  hard_ref = (np.clip(np.floor(v) + (alpha >= 0) + 7., 0, 15) - 7.) * 0.1
  np.testing.assert_allclose(hard, hard_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(near, fq_ref(w, 0.1, 7., 4), rtol=1e-5, atol=1e-6)
  # bias and layers outside `paths` untouched
  np.testing.assert_array_equal(A.quantize_weights(params, q2, pol, 'hard', paths=['blocks_0'])['fc']['kernel'],
                                params['fc']['kernel'])


def test_grad_flows_to_alpha_and_learned_act_scale(setup):
  model, params, pol, qs, x = setup
  alpha = jnp.zeros_like(params['fc']['kernel'])

  def loss(th):
    out = A.quantized_apply(model, {'params': params}, qs.merge({'fc': th}), pol, x, step_index=jnp.asarray([0, 4]), weight_mode='soft', learn_act_scale=True)
    return jnp.sum(out ** 2)

  g = jax.grad(loss)({'alpha': alpha, 'a_scale': qs.layers['fc'].a_scale})
  assert float(jnp.abs(g['alpha']).sum()) > 0
  ga = np.asarray(g['a_scale'])
  assert ga[0, 0] != 0 and ga[2, 0] != 0 and ga[1, 0] == 0       # only the slots used by the batch (0 and 2)


def test_submodule_by_path_runs_a_block_alone(setup):
  model, params, pol, qs, x = setup
  h = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 3))
  got = model.apply({'params': params}, h, x, method=A.block_method('blocks_0'))
  k = np.asarray(params['blocks_0']['nin_shortcut']['kernel'])[0, 0]
  want = np.concatenate([np.asarray(h), np.asarray(x)], -1) @ k + np.asarray(params['blocks_0']['nin_shortcut']['bias'])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(A.ApplyError, match='nope'):
    model.apply({'params': params}, h, x, method=A.block_method('blocks_0/nope'))


def test_missing_state_is_a_named_error(setup):
  model, params, pol, qs, x = setup
  layers = dict(qs.layers)
  del layers['qk']
  with pytest.raises(A.ApplyError, match="'qk'"):
    A.quantized_apply(model, {'params': params}, qs.replace(layers=layers), pol, x, step_index=0)


def test_qstate_tree_round_trip_and_merge(setup):
  _, _, _, qs, _ = setup
  back = S.from_tree(S.to_tree(qs))
  assert set(back.layers) == set(qs.layers)
  for p, st in qs.layers.items():
    assert set(back.layers[p].set_fields()) == set(st.set_fields())
    for n, v in st.set_fields().items():
      np.testing.assert_array_equal(getattr(back.layers[p], n), v)
  # merge: set fields override, unset ones are kept, new paths are added
  m = qs.merge({'fc': {'w_zero': jnp.zeros((1, 3))}, 'new': LayerQState(r=jnp.ones(2))})
  np.testing.assert_array_equal(m.layers['fc'].w_zero, np.zeros((1, 3)))
  np.testing.assert_array_equal(m.layers['fc'].a_scale, qs.layers['fc'].a_scale)
  assert set(m.layers['new'].set_fields()) == {'r'}
  with pytest.raises(KeyError, match='nope'):
    qs.merge({'fc': {'nope': jnp.ones(1)}})


def test_qstate_reads_the_earlier_nested_layout(setup):
  """Run dirs written before the typed state nest the module path and keep the fields under '__state__'."""
  _, _, _, qs, _ = setup
  old = {'step_slot': np.asarray(qs.step_slot), 'layers': {}}
  for path, st in qs.layers.items():
    node = old['layers']
    for seg in path.split('/'):
      node = node.setdefault(seg, {})
    node['__state__'] = {n: np.asarray(v) for n, v in st.set_fields().items()}
  back = S.from_tree(old)
  assert set(back.layers) == set(qs.layers)
  np.testing.assert_array_equal(back.layers['blocks_0/nin_shortcut'].a_scale,
                                qs.layers['blocks_0/nin_shortcut'].a_scale)


@pytest.mark.parametrize('step', [5, 15, 999, -1])
def test_uncalibrated_step_index_gives_nan_never_a_clamped_neighbour(setup, step):
  """JAX clamps out-of-range gathers: step 15, 999 or -1 used to give exactly step 4's output (5 steps here)."""
  model, params, pol, qs, x = setup
  out = A.quantized_apply(model, {'params': params}, qs, pol, x, step_index=jnp.int32(step))
  assert np.isnan(np.asarray(out)).all()
  per_sample = A.quantized_apply(model, {'params': params}, qs, pol, x, step_index=jnp.asarray([4, step]))
  assert np.isfinite(np.asarray(per_sample[0])).all() and np.isnan(np.asarray(per_sample[1])).all()
