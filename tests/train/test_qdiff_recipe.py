"""Q-Diffusion's released recipe (`--method=qdiff`, issue 14): initial weight and activation scales re-derived in
NumPy from its formulas (qdiff/quant_layer.py `UniformAffineQuantizer`, scale_method 'max'), the split weight
quantizer, registration order, the activation pass's optimiser, and the preset end to end on ddim_tiny."""
import dataclasses
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.quant.apply import quantize_weights
from tcaq_jax.quant.policy import build_policy
from tcaq_jax.quant.state import LayerQState, QState
from tcaq_jax.train import act_search, init as qinit, recon
from tcaq_jax.train.unit_order import in_order


def _qd_weight(w_oi, bits):
  """Q-Diffusion channel-wise 'max' weight quantizer (asymmetric; n_levels = 2^b) on a [Cout, fan_in] matrix:
  per row x_min = min(min w, 0), x_max = max(max w, 0), delta = (max w - min w) / (n_levels - 1),
  zero = round(-x_min / delta); forward clamp(round(w / delta) + zero, 0, n_levels - 1), minus zero, times delta."""
  n_levels = 2 ** bits
  out, deltas = np.empty_like(w_oi), []
  for c, row in enumerate(w_oi.astype(np.float64)):
    x_min = min(row.min(), 0.)
    delta = max(float(row.max() - row.min()) / (n_levels - 1), 1e-8)
    zero = np.round(-x_min / delta)
    out[c] = (np.clip(np.round(row / delta) + zero, 0, n_levels - 1) - zero) * delta
    deltas.append(delta)
  return out, np.asarray(deltas)


def _qd_act(x, bits):
  """Q-Diffusion `--a_sym` 'max' activation quantizer (per tensor): n_levels = 2^(b-1) - 1,
  delta = max(|min(x, 0)|, max(x, 0)) / n_levels; forward clamp(round(x / delta), -n_levels - 1, n_levels) * delta."""
  n_levels = 2 ** (bits - 1) - 1
  delta = max(abs(min(x.min(), 0.)), max(x.max(), 0.)) / n_levels
  return np.clip(np.round(x / delta), -n_levels - 1, n_levels) * delta, delta


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6)(x))             # Dense_0
    return nn.Dense(5)(h)                   # Dense_1


def test_initial_weight_and_activation_scales_equal_q_diffusions():
  rng = np.random.default_rng(0)
  model = _MLP()
  x = rng.standard_normal((64, 8)).astype(np.float32) * 2. + 0.5
  params = model.init(jax.random.PRNGKey(1), x)['params']
  policy = build_policy(model, {'params': params}, (x,), 'qdiff', w_bits=4, a_bits=6)
  layers = qinit.init_weights(params, policy, method='minmax', adaround=False)
  qparams = quantize_weights(params, QState(jnp.zeros(1, jnp.int32), layers), policy, 'hard')
  w_ref = {}
  for name in ('Dense_0', 'Dense_1'):
    w = np.asarray(params[name]['kernel'])                          # [in, out] = PyTorch weight.T
    w_ref[name], deltas = _qd_weight(w.T, 4)
    np.testing.assert_allclose(np.asarray(layers[name].w_scale).reshape(-1), deltas, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(qparams[name]['kernel']).T, w_ref[name], rtol=1e-5, atol=1e-7)
  # activations: one forward with quantized weights; each layer's input is quantized before it runs
  fn = act_search.make_minmax_sym(lambda p, xb: model.apply({'params': p}, xb), policy)
  acts = act_search.init_minmax_sym(fn, policy, params, QState(jnp.zeros(1, jnp.int32), layers), (x,),
                                    np.zeros(64, np.int32), 1, n_samples=64)
  x0q, d0 = _qd_act(x.astype(np.float64), 6)
  h = np.maximum(x0q @ w_ref['Dense_0'].T + np.asarray(params['Dense_0']['bias']), 0.)
  _, d1 = _qd_act(h, 6)
  for name, delta in (('Dense_0', d0), ('Dense_1', d1)):
    np.testing.assert_allclose(float(acts[name].a_scale[0, 0]), delta, rtol=1e-5)
    assert float(acts[name].a_zero[0, 0]) == 32.                  # signed codes [-32, 31] as unsigned - 32


def test_split_weight_quantizer_has_one_scale_per_segment():
  rng = np.random.default_rng(2)
  w = rng.standard_normal((1, 1, 6, 3)).astype(np.float32)
  w[..., 4, :], w[..., 5, :] = -10. * abs(w[..., 4, :]), 10. * abs(w[..., 5, :])   # skip: 10x larger range
  # (rows straddle 0: for a one-signed row Q-Diffusion's delta is (max - min) / (n - 1) while its zero point
  # assumes a range from 0, so its max is clipped; ours keeps 0 in the range: docs/METHOD_NOTES.md)
  spec = types.SimpleNamespace(path='sc', kind='conv', weights=True, acts=True, w_bits=4, split=4)
  policy = types.SimpleNamespace(layers={'sc': spec})
  st = qinit.init_weights({'sc': {'kernel': w}}, policy, method='minmax', adaround=False, split=True)['sc']
  assert st.w_scale.shape == (1, 1, 6, 3)
  for lo, hi in ((0, 4), (4, 6)):
    _, deltas = _qd_weight(w[0, 0, lo:hi, :].T, 4)
    np.testing.assert_allclose(np.asarray(st.w_scale)[0, 0, lo:hi, :], np.broadcast_to(deltas, (hi - lo, 3)),
                               rtol=1e-6)
  whole = qinit.init_weights({'sc': {'kernel': w}}, policy, method='minmax', adaround=False)['sc']
  assert whole.w_scale.shape == (1, 1, 1, 3) and np.all(np.asarray(whole.w_scale)[0, 0, 0] > st.w_scale[0, 0, 0])


def test_registration_order_is_q_diffusions_named_children_walk():
  call = ['temb/dense_0', 'temb/dense_1', 'conv_in', 'down_0/block_0', 'down_0/downsample/conv', 'down_1/block_0',
          'down_1/attn_0', 'mid/block_1', 'mid/attn_1', 'mid/block_2', 'up_1/block_0', 'up_1/attn_0',
          'up_1/block_1', 'up_1/attn_1', 'up_1/upsample/conv', 'up_0/block_0', 'up_0/block_1', 'conv_out']
  units = [types.SimpleNamespace(path=p) for p in call]
  got = [u.path for u in in_order(units, 'registration')]
  assert got == ['temb/dense_0', 'temb/dense_1', 'conv_in', 'down_0/block_0', 'down_0/downsample/conv',
                 'down_1/block_0', 'down_1/attn_0', 'mid/block_1', 'mid/attn_1', 'mid/block_2', 'up_0/block_0',
                 'up_0/block_1', 'up_1/block_0', 'up_1/block_1', 'up_1/attn_0', 'up_1/attn_1',
                 'up_1/upsample/conv', 'conv_out']
  ldm = [types.SimpleNamespace(path=p) for p in ('time_embed_0', 'input_blocks_0_0', 'output_blocks_1_0')]
  assert in_order(ldm, 'registration') == ldm and in_order(units, 'call') == units


def test_activation_pass_is_adam_with_cosine_decay_to_zero_and_lp_loss():
  """A scale far from its target gets a constant-sign gradient: Adam's step is then lr * factor(it), so the
  total move is lr * sum_it (1 + cos(pi it / N)) / 2; the loss is sum over channels of |err|^p."""
  n_it, lr = 60, 1e-3
  cfg = recon.ReconConfig(iters=n_it, batch=1, chunk=n_it, act_lr=lr, act_pass=True, act_p=2.4, loop='host')
  theta = {'a': LayerQState(a_scale=jnp.zeros((1, 1)))}
  apply_fn = lambda th, aux, xb, sb: th['a'].a_scale[0, 0] * xb[0]
  x = jnp.ones((4, 3))
  out, _ = recon.reconstruct(apply_fn, theta, None, [x], x * 1e3, jnp.zeros(4, jnp.int32), cfg,
                             jax.random.PRNGKey(0))
  want = lr * sum(0.5 * (1 + np.cos(np.pi * i / n_it)) for i in range(n_it))
  np.testing.assert_allclose(float(out['a'].a_scale[0, 0]), want, rtol=1e-4)
  d = np.random.default_rng(0).standard_normal((2, 3, 4))
  np.testing.assert_allclose(float(recon.rec_loss(jnp.asarray(d), jnp.zeros((2, 3, 4)), 2.4)),
                             np.mean(np.sum(np.abs(d) ** 2.4, axis=-1)), rtol=1e-5)
  assert dataclasses.replace(cfg, act_pass=False).batch_size == 1
