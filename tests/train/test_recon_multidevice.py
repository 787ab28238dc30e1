"""Reconstruction on several local devices (batch-sharded minibatches) gives what one device gives.

Runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=2 (the flag must be set before JAX
starts), on a ddim_tiny ResBlock, against the same reconstruction in a single-device subprocess.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent('''
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from tcaq_jax.models import family
  from tcaq_jax.quant import apply as A, policy as P
  from tcaq_jax.quant.state import LayerQState, QState, merge_layers
  from tcaq_jax.train import blocks, init as qinit, recon
  model, params, config = family.random_model('ddim_tiny', 0)
  n, unit_path = 16, 'down_0/block_0'
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (n, 16, 16, 3)))
  steps = np.repeat(np.arange(4), n // 4).astype(np.int32)
  t = (999 - steps * 250).astype(np.int32)
  cond = np.zeros((n,), np.int32)
  pol = P.build_policy(model, {'params': params}, (x[:1], t[:1]), 'qdiff', w_bits=3, a_bits=8,
                       overrides=[r'.*:afp', unit_path + '/:a8'])
  fp = lambda p, x, t, s, c: model.apply({'params': p}, x, t)
  step_slot, k = qinit.step_slots(4, [0, 1, 2, 3])
  layers = qinit.init_weights(params, pol, {}, 'lp', adaround=True)
  # fixed activation ranges (the test is about sharding, not ranges; a search would compile the whole model)
  acts = {s.path: LayerQState(a_scale=jnp.full((k, s.n_segments), 0.05), a_zero=jnp.full((k, s.n_segments), 128.))
          for s in pol.layers.values() if s.acts}
  qs = QState(jnp.asarray(step_slot), merge_layers(layers, acts))
  qf = lambda c, x, t, s, cc: A.quantized_apply(model, {'params': c[0]}, c[1], pol, x, t, step_index=s)
  unit = next(u for u in blocks.find_units(model, {'params': params}, (x[:1], t[:1]), {}, pol,
                                           family.block_class_regex(config)) if u.path == unit_path)
  io = blocks.capture_unit_io(blocks.make_io_capture(unit_path, qf, fp), (x, t, steps, cond), 8,
                              in_consts=(params, qs), out_consts=params)
  soft = blocks.unit_apply_fn(blocks.unit_program(model, params, pol, unit), io, 'soft')
  theta = blocks.to_relative({p: LayerQState(alpha=qs.layers[p].alpha) for p in unit.layers}, unit)
  cfg = recon.ReconConfig(iters=12, batch=8, chunk=12, loop='host')
  theta, stats = recon.reconstruct(soft, theta, blocks.unit_aux(params, qs, unit), io.leaves, io.output,
                                   jnp.asarray(steps), cfg, jax.random.PRNGKey(0), block=unit_path)
  print(json.dumps({'devices': jax.local_device_count(), 'final_rec': stats['final_rec'],
                    'sharded': recon._batch_constraint(None, cfg.batch) is not None,
                    'alpha': {p: np.asarray(th.alpha).ravel()[:64].tolist() for p, th in theta.items()}}))
''')


def _start(devices: int) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.Popen([sys.executable, '-c', SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _result(proc: subprocess.Popen) -> dict:
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def test_two_devices_reconstruct_like_one():
  procs = [_start(1), _start(2)]                  # both at once: much of each is single-threaded start-up
  one, two = [_result(p) for p in procs]
  assert one['devices'] == 1 and two['devices'] == 2
  assert two['sharded'] and not one['sharded']
  np.testing.assert_allclose(two['final_rec'], one['final_rec'], rtol=1e-4)
  for p in one['alpha']:
    np.testing.assert_allclose(two['alpha'][p], one['alpha'][p], rtol=1e-4, atol=1e-5, err_msg=p)
