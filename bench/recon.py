"""Block-reconstruction throughput: jitted AdaRound iterations/second for a ResBlock and an attention block of
ddim_cifar10 (random weights) at batch 16, W4A8; optionally the whole-model calibration wall time of the demo.

  PYTHONPATH=. python bench/recon.py                       # the two CIFAR-10 blocks
  PYTHONPATH=. python bench/recon.py --demo                # + the demo calibration (configs/demo_w4a8.flags)

Prints one table. Compile time is reported separately from the timed iterations.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tcaq_jax.models.configs import build_model, get_config  # noqa: E402
from tcaq_jax.quant import apply as A  # noqa: E402
from tcaq_jax.quant import policy as P  # noqa: E402
from tcaq_jax.models import family  # noqa: E402
from tcaq_jax.quant.state import LayerQState, QState, merge_layers  # noqa: E402
from tcaq_jax.train import act_search, blocks, init as qinit, recon  # noqa: E402

flags.DEFINE_list('units', ['down_1/block_0', 'down_1/attn_0'], 'ddim_cifar10 units to time')
flags.DEFINE_integer('iters', 50, 'timed iterations per unit')
flags.DEFINE_integer('batch', 16, 'reconstruction batch')
flags.DEFINE_integer('n', 64, 'captured samples per unit')
flags.DEFINE_bool('write', False, 'merge machine-readable records into docs/results/perf.json')
flags.DEFINE_bool('demo', False, 'also time a whole demo calibration (configs/demo_w4a8.flags)')
flags.DEFINE_float('demo_iters_scale', 0.01, 'iters_scale of the demo calibration')
FLAGS = flags.FLAGS


def time_units():
  model = build_model(get_config('ddim_cifar10'))
  n = FLAGS.n
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (n, 32, 32, 3)))
  steps = np.repeat(np.arange(4), n // 4).astype(np.int32)
  t = (999 - 250 * steps).astype(np.int32)
  cond = np.zeros((n,), np.int32)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]), jnp.asarray(t[:1]))['params']
  overrides = ['.*:fp'] + [f'^{u}/:w4a8' for u in FLAGS.units]
  pol = P.build_policy(model, {'params': params}, (x[:1], t[:1]), 'qdiff', 4, 8, overrides=overrides)
  fp = lambda p, x, t, s, c: model.apply({'params': p}, x, t)
  step_slot, k = qinit.step_slots(4, [0, 1, 2, 3])
  layers = qinit.init_weights(params, pol, {}, 'lp', adaround=True)
  acts = act_search.search_act_scales(fp, pol, layers, (x, t, steps, cond), qinit.calib_slot_ids(step_slot, steps),
                                      k, batch=16, consts=params)
  qs = QState(jnp.asarray(step_slot), merge_layers(layers, acts))
  qf = lambda c, x, t, s, cc: A.quantized_apply(model, {'params': c[0]}, c[1], pol, x, t, step_index=s)
  units = {u.path: u for u in blocks.find_units(model, {'params': params}, (x[:1], t[:1]), {}, pol,
                                                family.BLOCK_CLASSES['ddim'])}
  rows = []
  for path in FLAGS.units:
    unit = units[path]
    io = blocks.capture_unit_io(blocks.make_io_capture(path, in_forward=qf, out_forward=fp), (x, t, steps, cond),
                                16, in_consts=(params, qs), out_consts=params)
    soft = blocks.unit_apply_fn(blocks.unit_program(model, params, pol, unit), io, 'soft')
    theta = blocks.to_relative({p: LayerQState(alpha=qs.layers[p].alpha) for p in unit.layers
                                if qs.layers[p].alpha is not None}, unit)
    aux = blocks.unit_aux(params, qs, unit)
    st = jnp.asarray(steps)
    chunk_fn = recon.make_chunk(soft, int(st.shape[0]), recon.ReconConfig(batch=FLAGS.batch))
    t0 = time.perf_counter()
    recon.reconstruct(soft, theta, aux, io.leaves, io.output, st,
                      recon.ReconConfig(iters=2, batch=FLAGS.batch, chunk=2), jax.random.PRNGKey(0),
                      chunk_fn=chunk_fn)
    compile_s = time.perf_counter() - t0
    cfg = recon.ReconConfig(iters=FLAGS.iters, batch=FLAGS.batch, chunk=FLAGS.iters)
    _, stats = recon.reconstruct(soft, theta, aux, io.leaves, io.output, st, cfg, jax.random.PRNGKey(1),
                                 chunk_fn=chunk_fn)
    n_w = sum(int(np.prod(th.alpha.shape)) for th in theta.values())
    in_shape = 'x'.join(str(d) for d in io.leaves[0].shape[1:])
    rows.append((path, unit.cls, in_shape, n_w, compile_s, stats['it_per_s']))
  return rows


def time_demo():
  from tcaq_jax.train import pipeline
  out = tempfile.mkdtemp(prefix='bench_demo_')
  cfg = dict(out_dir=out, num_steps=100, calib_steps=20, calib_samples=64, method='tcaq', w_bits=4,
             a_bits=8, r_tru=3.0, iters_scale=FLAGS.demo_iters_scale, chunk=100, recon_samples=512,
             png_samples=16)
  t0 = time.perf_counter()
  report = pipeline.run(cfg)
  wall = time.perf_counter() - t0
  shutil.rmtree(out, ignore_errors=True)
  return wall, report


def main(argv):
  del argv
  dev = jax.devices()[0]
  print(f'device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}')
  rows = time_units()
  print(f'\n| unit (ddim_cifar10, W4A8) | class | input | AdaRound weights | compile s | it/s (batch {FLAGS.batch}) |')
  print('|---|---|---|---|---|---|')
  for path, cls, shape, nw, cs, ips in rows:
    print(f'| {path} | {cls} | {shape} | {nw:,} | {cs:.1f} | {ips:.2f} |')
  if FLAGS.write:
    from records import merge, record
    recs = [record('recon', 'recon_it_s', ips, 'it/s', key=path, batch=FLAGS.batch, model='ddim_cifar10',
                   bits='W4A8') for path, _, _, _, _, ips in rows]
    recs += [record('recon', 'recon_compile_s', cs, 's', key=path, batch=FLAGS.batch, model='ddim_cifar10')
             for path, _, _, _, cs, _ in rows]
    print('records ->', merge(recs))
  if FLAGS.demo:
    wall, report = time_demo()
    n_units = report['num_units']
    iters = sum(u['iters'] for u in report['units'])
    print(f'\ndemo calibration (demo_w4a8 settings, iters_scale {FLAGS.demo_iters_scale}): {wall:.0f} s wall, '
          f'{n_units} units, {len(report["units"])} unit reconstructions, {iters} iterations in total')


if __name__ == '__main__':
  app.run(main)
