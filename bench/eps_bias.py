"""How much of a calibrated demo run's sample error is a systematic eps bias: the mean of (quantized eps - FP eps)
over FP trajectories (--fit_samples, --fit_seed), per sampler step and pixel, then the digits-FID of --num_samples
quantized samples (--seed, the calibrate CLI's quality-check seed) as they are and with that mean subtracted from
eps at every step (global scalar, and per step and pixel). Diagnostic for issue 14 (session 10): not yet a
calibration stage. Prints one table, writes JSON.

  PYTHONPATH=. python bench/eps_bias.py --run_dir /tmp/demo_run --out runs/eps_bias.json
"""
from __future__ import annotations

import json

from absl import app, flags
import jax.numpy as jnp
from jax.tree_util import Partial

from tcaq_jax.demo.classifier import demo_quality
from tcaq_jax.diffusion.batched import sample_all
from tcaq_jax.diffusion.ddim import sampler_coefficients
from tcaq_jax.diffusion.host_sampler import HostLoopSampler
from tcaq_jax.images import to_uint8
from tcaq_jax.models import family
from tcaq_jax.quantized import load_quantized

flags.DEFINE_string('run_dir', None, 'a finished calibration of the demo model', required=True)
flags.DEFINE_integer('fit_samples', 64, 'FP trajectories the mean eps error is measured on')
flags.DEFINE_integer('fit_seed', 7, 'their seed (not the evaluation seed)')
flags.DEFINE_integer('num_samples', 256, 'samples scored per variant')
flags.DEFINE_integer('seed', 1234, 'sample seed (the calibrate CLI quality check uses 1234)')
flags.DEFINE_string('out', None, 'JSON output path')
FLAGS = flags.FLAGS


def _corrected(eps, delta, x, t, i, cond):
  return eps(x, t, i, cond) - delta[i]


def main(argv):
  del argv
  q = load_quantized(FLAGS.run_dir)
  cfg = q.meta['config']
  coeffs = sampler_coefficients(q.config, cfg['num_steps'], cfg['skip_type'], cfg['eta'])
  shape = tuple(family.sample_shape(q.config))
  fp_eps = family.eps_fn(q.model, q.params, q.config)
  fp_sampler = HostLoopSampler(fp_eps, coeffs, shape)
  n = FLAGS.fit_samples
  xs = fp_sampler.sample(FLAGS.fit_seed, 0, n, record='all')['recorded']
  maps = []
  for i, t in enumerate(fp_sampler.consts['timesteps']):
    tt, ii = jnp.full((n,), int(t), jnp.int32), jnp.int32(i)
    maps.append(jnp.mean(q.eps_fn(xs[i], tt, ii, None) - fp_eps(xs[i], tt, ii, None), axis=0))
  maps = jnp.stack(maps)                                     # [steps, H, W, C]
  variants = {'none': jnp.zeros_like(maps), 'global scalar': jnp.broadcast_to(jnp.mean(maps), maps.shape),
              'per step and pixel': maps}
  results = {'run_dir': FLAGS.run_dir, 'fit_samples': n, 'fit_seed': FLAGS.fit_seed, 'seed': FLAGS.seed,
             'mean_bias_per_step': [float(v) for v in jnp.mean(maps, axis=(1, 2, 3))], 'variants': {}}
  print(f'| correction | digits-FID ({FLAGS.num_samples} samples) | confident |\n|---|---|---|')
  for name, delta in variants.items():
    sampler = HostLoopSampler(Partial(_corrected, q.eps_fn, delta), coeffs, shape)
    r = demo_quality(sample_all(sampler, FLAGS.num_samples, 32, seed=FLAGS.seed, convert=to_uint8, pad=True))
    results['variants'][name] = {'fid': float(r['fid']), 'confident_fraction': float(r['confident_fraction'])}
    print(f"| {name} | {r['fid']:.3f} | {100 * r['confident_fraction']:.1f}% |")
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  app.run(main)
