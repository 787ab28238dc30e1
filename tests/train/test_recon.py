"""BRECQ/AdaRound block reconstruction (tcaq_jax/train/recon.py) on a ddim_tiny ResBlock with random weights.

The block's output MSE is measured here with plain NumPy from the quantized block output and the FP block
output (not with the code's own loss), before (AdaRound alphas at their init = nearest rounding) and after.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.models.configs import build_model, get_config
from tcaq_jax.quant import apply as A
from tcaq_jax.quant import policy as P
from tcaq_jax.models import family
from tcaq_jax.quant.state import LayerQState, QState, merge_layers
from tcaq_jax.train import act_search, blocks, init as qinit, recon

UNIT = 'down_0/block_0'


@pytest.fixture(scope='module')
def block_setup():
  model = build_model(get_config('ddim_tiny'))
  n = 32
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (n, 16, 16, 3)))
  steps = np.repeat(np.arange(4), n // 4).astype(np.int32)
  t = (999 - steps * 250).astype(np.int32)
  cond = np.zeros((n,), np.int32)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]), jnp.asarray(t[:1]))['params']
  # W3, activations FP outside the unit under test (keeps the test fast); the unit's own inputs are 8-bit.
  pol = P.build_policy(model, {'params': params}, (x[:1], t[:1]), 'qdiff', w_bits=3, a_bits=8,
                       overrides=[r'.*:afp', UNIT + '/:a8'])
  fp = lambda p, x, t, s, c: model.apply({'params': p}, x, t)
  step_slot, k = qinit.step_slots(4, [0, 1, 2, 3])
  sid = qinit.calib_slot_ids(step_slot, steps)
  layers = qinit.init_weights(params, pol, {}, 'lp', adaround=True)
  acts = act_search.search_act_scales(fp, pol, layers, (x, t, steps, cond), sid, k, batch=12, consts=params)
  assert set(acts) == {f'{UNIT}/conv1', f'{UNIT}/temb_proj', f'{UNIT}/conv2'}
  qs = QState(jnp.asarray(step_slot), merge_layers(layers, acts))
  qf = lambda c, x, t, s, cc: A.quantized_apply(model, {'params': c[0]}, c[1], pol, x, t, step_index=s)
  unit = next(u for u in blocks.find_units(model, {'params': params}, (x[:1], t[:1]), {}, pol,
                                           family.block_class_regex(get_config('ddim_tiny')))
              if u.path == UNIT)
  io = blocks.capture_unit_io(blocks.make_io_capture(UNIT, in_forward=qf, out_forward=fp), (x, t, steps, cond), 16,
                              in_consts=(params, qs), out_consts=params)
  soft = blocks.unit_apply_fn(blocks.unit_program(model, params, pol, unit), io, 'soft')
  return model, params, pol, qs, unit, io, jnp.asarray(steps), soft


CHUNKS = {}    # one compiled chunk per (iters, chunk) setting below: make_chunk ignores both, so any would do


def chunk_fn(soft, cfg, hook=None):
  if hook is not None:
    return recon.make_chunk(soft, 32, cfg, hook)
  if 'fn' not in CHUNKS:
    CHUNKS['fn'] = recon.make_chunk(soft, 32, cfg)
  return CHUNKS['fn']


def block_mse(model, params, pol, qs, unit, io, steps, theta):
  """NumPy MSE between the hard-rounded quantized block, run inside the full model (block_method, absolute
  paths; reconstruction runs the block as a standalone module), and the FP block output."""
  args, kwargs = io.rebuild(io.leaves)
  out = A.quantized_apply(model, {'params': params}, qs.merge(blocks.to_absolute(theta, unit)), pol, *args,
                          step_index=steps, weight_mode='hard', method=A.block_method(unit.path), **kwargs)
  return float(np.mean((np.asarray(out, np.float64) - np.asarray(io.output, np.float64)) ** 2))


def test_reconstruction_lowers_block_mse(block_setup):
  model, params, pol, qs, unit, io, steps, soft = block_setup
  assert unit.layers == (f'{UNIT}/conv1', f'{UNIT}/temb_proj', f'{UNIT}/conv2')
  theta0 = blocks.to_relative({p: LayerQState(alpha=qs.layers[p].alpha) for p in unit.layers}, unit)
  before = block_mse(model, params, pol, qs, unit, io, steps, theta0)
  cfg = recon.ReconConfig(iters=200, batch=16, chunk=200)
  theta, stats = recon.reconstruct(soft, theta0, blocks.unit_aux(params, qs, unit), io.leaves, io.output, steps,
                                   cfg, jax.random.PRNGKey(0), block=UNIT, chunk_fn=chunk_fn(soft, cfg))
  after = block_mse(model, params, pol, qs, unit, io, steps, theta)
  assert stats['iters'] == 200 and np.isfinite(stats['final_rec'])
  assert after < 0.9 * before, (before, after)
  # the rounding regulariser pushed h towards 0/1: more h near an integer than at init (h = residual).
  from tcaq_jax.quant.adaround import soft_rounding
  near = lambda th: np.mean(np.concatenate(
      [np.minimum(h, 1. - h).ravel() < 0.1 for h in (np.asarray(soft_rounding(t.alpha)) for t in th.values())]))
  assert near(theta) > near(theta0) + 0.1


def test_nan_loss_stops_the_block_and_keeps_last_good_state(block_setup):
  model, params, pol, qs, unit, io, steps, soft = block_setup
  theta0 = blocks.to_relative({p: LayerQState(alpha=qs.layers[p].alpha) for p in unit.layers}, unit)
  cfg = recon.ReconConfig(iters=40, batch=16, chunk=20)
  nan_at_27 = lambda loss, it: jnp.where(it == 27, jnp.nan, loss)      # the test's hook, not production code
  with pytest.raises(recon.NonFiniteLossError, match=f"'{UNIT}' at iteration 27") as ei:
    recon.reconstruct(soft, theta0, blocks.unit_aux(params, qs, unit), io.leaves, io.output, steps, cfg,
                      jax.random.PRNGKey(0), block=UNIT, loss_hook=nan_at_27)
  err = ei.value
  assert err.block == UNIT and err.iteration == 27
  good = err.last_good
  assert all(np.all(np.isfinite(np.asarray(th.alpha))) for th in good.values())
  # the last good state is the one after iteration 26: equal to the first 27 iterations of a clean run.
  ref = _theta_after(soft, theta0, blocks.unit_aux(params, qs, unit), io, steps,
                     recon.ReconConfig(iters=40, batch=16, chunk=27))
  for p in good:
    np.testing.assert_allclose(np.asarray(good[p].alpha), np.asarray(ref[p].alpha), rtol=1e-5, atol=1e-6)


def _theta_after(apply_fn, theta, aux, io, steps, cfg):
  """theta after the first chunk (cfg.chunk iterations) of a cfg.iters-long schedule."""
  class Stop(Exception):
    pass

  seen = {}

  def progress(done, total, loss, th):
    seen['theta'] = th
    raise Stop()

  with pytest.raises(Stop):
    recon.reconstruct(apply_fn, theta, aux, io.leaves, io.output, steps, cfg, jax.random.PRNGKey(0), block=UNIT,
                      progress=progress, chunk_fn=chunk_fn(apply_fn, cfg))
  return seen['theta']


def test_packed_weight_init_equals_per_layer_lp_search(block_setup):
  """init_weights packs every kernel's rows into one zero-padded matrix (and on CPU loops over candidates on
  the host); the scales must equal ranges.lp_search_params on each layer alone."""
  from tcaq_jax.quant.ranges import lp_search_params
  model, params, pol, qs, unit, io, steps, soft = block_setup
  for path in ('conv_in', 'temb/dense_0', 'down_1/block_0/conv1', 'up_1/block_0/nin_shortcut'):
    w = qinit.get_kernel(params, path)
    s, z = lp_search_params(w, 3, channel_axis=-1, p=2.4, n_candidates=80)
    np.testing.assert_allclose(np.asarray(qs.layers[path].w_scale), np.asarray(s), rtol=1e-6, err_msg=path)
    np.testing.assert_array_equal(np.asarray(qs.layers[path].w_zero), np.asarray(z), err_msg=path)


def test_host_percentiles_equal_jnp_percentile():
  """The activation search's CPU percentiles (np.partition through a host callback) reproduce jnp.percentile
  (an on-device sort) to float rounding; they were bit-identical on 40 random sets with jax 0.10.2."""
  q = np.asarray([99.999, 99.99, 99.9, 0.001, 0.01, 0.1], np.float32)
  ref = jax.jit(lambda x: jnp.percentile(x, jnp.asarray(q)))
  for seed in range(6):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(int(rng.integers(1000, 300000))) * rng.uniform(0.01, 100)).astype(np.float32)
    if seed % 2:
      x = np.abs(x) ** 3
    got = act_search._np_percentiles(x, q)
    np.testing.assert_allclose(got, np.asarray(ref(jnp.asarray(x))), rtol=3e-7, atol=0)


def test_group_capture_records_each_unit_as_its_own_capture(block_setup):
  """One recorder for several units (pipeline.CAPTURE_GROUP) gives each unit exactly what a recorder of that unit
  alone gives: its inputs from the quantized model and its FP output; a unit outside the group is refused."""
  model, params, pol, qs, unit, io, steps, _ = block_setup
  qf = lambda c, x, t, s, cc: A.quantized_apply(model, {'params': c[0]}, c[1], pol, x, t, step_index=s)
  fp = lambda p, x, t, s, c: model.apply({'params': p}, x, t)
  n = 32
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (n, 16, 16, 3)))
  s = np.repeat(np.arange(4), n // 4).astype(np.int32)
  data = (x, (999 - s * 250).astype(np.int32), s, np.zeros((n,), np.int32))
  others = ['temb/dense_0', 'mid/attn_1']
  group = blocks.make_group_capture([others[0], UNIT, others[1]], qf, fp)
  for path in [UNIT, others[1]]:
    alone = blocks.capture_unit_io(blocks.make_io_capture(path, qf, fp), data, 16, (params, qs), params)
    grouped = blocks.capture_unit_io(group, data, 16, (params, qs), params, path=path)
    assert len(alone.leaves) == len(grouped.leaves) >= 1
    for a, b in zip(alone.leaves + [alone.output], grouped.leaves + [grouped.output]):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
    assert grouped.rebuild(grouped.leaves)[0][0].shape == alone.rebuild(alone.leaves)[0][0].shape
  # the FP outputs against an independent reference: flax's own capture_intermediates of the FP model
  _, inter = model.apply({'params': params}, jnp.asarray(x), jnp.asarray(data[1]),
                         capture_intermediates=lambda mdl, name: name == '__call__' and
                         '/'.join(mdl.path) in (UNIT, others[1]), mutable=['intermediates'])
  for path in (UNIT, others[1]):
    node = inter['intermediates']
    for seg in path.split('/'):
      node = node[seg]
    got = blocks.capture_unit_io(group, data, 16, (params, qs), params, path=path).output
    np.testing.assert_allclose(np.asarray(got), np.asarray(node['__call__'][0]), rtol=1e-5, atol=1e-5)
  with pytest.raises(blocks.BlockError, match='not captured by this recorder'):
    blocks.capture_unit_io(group, data, 16, (params, qs), params, path='up_0/block_1')
  with pytest.raises(blocks.BlockError, match='name one with path='):
    blocks.capture_unit_io(group, data, 16, (params, qs), params)
  # the targets of several units from one FP-only recorder (pipeline.RoundTargets), over a set that is not a
  # multiple of the batch (30 samples, batch 16), equal flax's own intermediates; the in-only recorder plus those
  # targets gives what the in+out recorder gives; output_bytes predicts what capture_outputs holds
  part = tuple(a[:30] for a in data)
  outs_fn = blocks.make_group_capture([others[0], UNIT, others[1]], None, fp)
  outs = blocks.capture_outputs(outs_fn, part, 16, params)
  assert set(outs) == {others[0], UNIT, others[1]}
  assert blocks.output_bytes(outs_fn, part, 16, params) == sum(o.nbytes for o in outs.values())
  for path in (UNIT, others[1]):
    node = inter['intermediates']
    for seg in path.split('/'):
      node = node[seg]
    np.testing.assert_allclose(np.asarray(outs[path]), np.asarray(node['__call__'][0])[:30], rtol=1e-5, atol=1e-5)
  in_only = blocks.make_group_capture([others[0], UNIT, others[1]], qf)
  both = blocks.capture_unit_io(group, part, 16, (params, qs), params, path=UNIT)
  split = blocks.capture_unit_io(in_only, part, 16, (params, qs), None, path=UNIT, output=outs[UNIT])
  for a, b in zip(both.leaves + [both.output], split.leaves + [split.output]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
  units = [blocks.Unit(p, 'X', ()) for p in 'abcde']
  assert blocks.capture_groups(units, 2) == [('a', 'b'), ('c', 'd'), ('e',)]
  assert blocks.capture_groups(units, 0) == [(p,) for p in 'abcde']


@pytest.mark.parametrize('total,max_samples', [(200, 256), (40, 256), (130, 130)])
def test_eval_loss_is_the_mean_per_sample_loss_of_evenly_spaced_samples(total, max_samples):
  """eval_loss (gathers inside one compiled scan) against a float64 NumPy loop over its documented selection:
  min(total, max_samples) evenly spaced samples, rounded down to whole batches of 64."""
  rng = np.random.default_rng(0)
  x0, x1 = rng.normal(size=(total, 3, 5)), rng.normal(size=(total, 7))
  y = {'a': rng.normal(size=(total, 3, 4)), 'b': rng.normal(size=(total, 2))}
  steps = np.arange(total) % 5
  w = rng.normal(size=(5, 4))

  def apply(th, aux, xs, s):
    return {'a': xs[0] @ th['w'] + s[:, None, None], 'b': xs[1][:, :2] * aux}

  ev = recon.make_eval(apply)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = recon.eval_loss(ev, {'w': f32(w)}, f32(0.5), [f32(x0), f32(x1)], jax.tree.map(f32, y),
                        jnp.asarray(steps, jnp.int32), max_samples=max_samples)
  n = min(total, max_samples)
  n = n - n % 64 if n > 64 else n
  idx = np.linspace(0, total - 1, n).round().astype(int)
  per = [np.sum((x0[i] @ w + steps[i] - y['a'][i]) ** 2, -1).mean() + np.sum((x1[i, :2] * 0.5 - y['b'][i]) ** 2)
         for i in idx]
  assert recon.eval_selection(total, max_samples).size == n
  np.testing.assert_allclose(got, np.mean(per), rtol=1e-5)


def test_eval_losses_of_two_sets_in_one_call_equal_each_set_alone():
  """make_eval joins sets of equal batch size into one scan (index offsets into the joined arrays), and keeps a
  set of another batch size apart: each set's loss equals its own single-set evaluation."""
  rng = np.random.default_rng(1)
  ev = recon.make_eval(lambda th, aux, xs, s: xs[0] * th + s[:, None])
  mk = lambda n: ([jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)],    # noqa: E731
                  jnp.asarray(rng.normal(size=(n, 3)), jnp.float32), jnp.arange(n, dtype=jnp.int32) % 3)
  a, b, c = mk(200), mk(64), mk(10)
  th = jnp.float32(0.7)
  sets = {'a': recon.eval_set(*a), 'b': recon.eval_set(*b), 'c': recon.eval_set(*c)}
  both = recon.eval_losses(ev, th, None, sets)
  for k, d in (('a', a), ('b', b), ('c', c)):
    np.testing.assert_allclose(both[k], recon.eval_loss(ev, th, None, *d), rtol=1e-6)
  x, y, s = b
  want = np.mean(np.sum((np.asarray(x[0]) * 0.7 + np.asarray(s)[:, None] - np.asarray(y)) ** 2, -1))
  np.testing.assert_allclose(both['b'], want, rtol=1e-5)


def test_step_weights_follow_the_ddim_sigma_increments():
  """--recon_step_weight: |sigma_prev - sigma_t|^power with sigma = sqrt((1 - abar) / abar), mean 1, recomputed in
  float64 from the alpha-bars; power 0 is uniform (None)."""
  a = np.array([0.01, 0.2, 0.6, 0.95])
  a_prev = np.array([0.2, 0.6, 0.95, 0.9999])
  assert recon.step_weights(a, a_prev, 0.0) is None
  for power in (0.5, 1.0, 2.0):
    d = np.abs(np.sqrt((1 - a_prev) / a_prev) - np.sqrt((1 - a) / a)) ** power
    np.testing.assert_allclose(recon.step_weights(a, a_prev, power), d / d.mean(), rtol=1e-6)
  w = recon.step_weights(a, a_prev, 1.0)
  assert w[0] > w[1] > w[2] > w[3] and abs(float(w.mean()) - 1) < 1e-6     # noisier steps weigh more


def test_weighted_rec_loss_is_the_weighted_mean_of_per_sample_errors():
  rng = np.random.default_rng(1)
  pred, tgt = rng.normal(size=(3, 4, 5, 2)), rng.normal(size=(3, 4, 5, 2))
  w = np.array([0.5, 2.0, 0.0])
  per = ((pred - tgt) ** 2).sum(-1).reshape(3, -1).mean(1)
  got = recon.rec_loss(jnp.asarray(pred), jnp.asarray(tgt), weights=jnp.asarray(w))
  np.testing.assert_allclose(float(got), float(np.mean(per * w)), rtol=1e-5)
  np.testing.assert_allclose(float(recon.rec_loss(jnp.asarray(pred), jnp.asarray(tgt), weights=jnp.ones(3))),
                             float(recon.rec_loss(jnp.asarray(pred), jnp.asarray(tgt))), rtol=1e-6)


def test_make_eval_weights_each_sample_by_its_step():
  """make_eval with step_weights: the mean over the set of each sample's error times its step's weight."""
  ev = recon.make_eval(lambda th, aux, xs, s: xs[0] * th, step_weights=jnp.asarray([1.0, 3.0], jnp.float32))
  x = jnp.arange(8, dtype=jnp.float32).reshape(8, 1)
  steps = jnp.asarray([0, 1] * 4, jnp.int32)
  got = recon.eval_losses(ev, jnp.float32(2.0), None, {'a': recon.eval_set([x], jnp.zeros((8, 1)), steps, 8, 4)})
  want = sum((2.0 * i) ** 2 * (1.0 if i % 2 == 0 else 3.0) for i in range(8)) / 8
  np.testing.assert_allclose(float(got['a']), want, rtol=1e-5)
