"""Images/second of the jitted DDIM sampler (one lax.scan per batch), compile time excluded (AOT).

  PYTHONPATH=. python bench/sample.py                       # demo (shipped weights) + ddim_cifar10 (random)
  PYTHONPATH=. python bench/sample.py --models demo --demo_batch_sizes 16,64,256

Prints one table: model, params, steps, batch, devices, compile s, run s, images/s.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from tcaq_jax.assets import DEMO_UNET_DIR
from tcaq_jax.diffusion.ddim import DDIMSampler, _run, sampler_coefficients
from tcaq_jax.models import family
from tcaq_jax.models.configs import build_model, get_config

flags.DEFINE_list('models', ['demo', 'cifar10'], 'demo and/or cifar10')
flags.DEFINE_bool('write', False, 'merge machine-readable records into docs/results/perf.json')
flags.DEFINE_list('demo_batch_sizes', ['16', '64', '256'], 'batch sizes for the demo model')
flags.DEFINE_list('cifar_batch_sizes', ['1', '4'], 'batch sizes for ddim_cifar10')
flags.DEFINE_integer('steps', 100, 'DDIM steps')
flags.DEFINE_integer('repeats', 1, 'timed runs per setting (the best is reported)')
FLAGS = flags.FLAGS


def _model(name):
  if name == 'demo' and os.path.isfile(os.path.join(DEMO_UNET_DIR, 'config.json')):
    model, params, config = family.load(DEMO_UNET_DIR)
    return model, params, config, 'demo_unet (trained)'
  config = get_config('ddim_digits' if name == 'demo' else 'ddim_cifar10')
  model = build_model(config)
  r, c = config['resolution'], config['in_channels']
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, r, r, c)), jnp.zeros((1,), jnp.int32))['params']
  return model, params, config, config['name'] + ' (random)'


def main(argv):
  del argv
  rows = []
  for name in FLAGS.models:
    model, params, config, label = _model(name)
    n_params = sum(int(a.size) for a in jax.tree.leaves(params))
    r, c = config['resolution'], config['in_channels']
    sampler = DDIMSampler(family.eps_fn(model, params, config),
                          sampler_coefficients(config, FLAGS.steps, 'quad', 0.0), (r, r, c))
    sizes = FLAGS.demo_batch_sizes if name == 'demo' else FLAGS.cifar_batch_sizes
    for bs in map(int, sizes):
      args, static = sampler.prepare(0, 0, bs)
      t0 = time.perf_counter()
      exe = _run.lower(*args, **static).compile()
      compile_s = time.perf_counter() - t0
      best = float('inf')
      for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(exe(*args))
        best = min(best, time.perf_counter() - t0)
      rows.append((label, n_params, FLAGS.steps, bs, sampler.mesh.devices.size, compile_s, best, bs / best))
      print(f'# {label} batch {bs}: {bs / best:.3f} img/s', flush=True)
  head = ('model', 'params', 'steps', 'batch', 'devices', 'compile_s', 'run_s', 'images/s')
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for label, n, s, bs, nd, cs, rs, ips in rows:
    print(f'| {label} | {n:,} | {s} | {bs} | {nd} | {cs:.1f} | {rs:.2f} | {ips:.3f} |')
  if FLAGS.write:
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from records import merge, record
    recs = []
    for label, n, s, bs, nd, cs, rs, ips in rows:
      key = f'{label.split()[0]} batch {bs} steps {s}'
      recs.append(record('sample', 'sample_fp_img_s', ips, 'img/s', key=key, batch=bs, steps=s, devices=nd))
      recs.append(record('sample', 'sampler_compile_s', cs, 's', key=key, batch=bs, steps=s, devices=nd))
    print('records ->', merge(recs))


if __name__ == '__main__':
  app.run(main)
