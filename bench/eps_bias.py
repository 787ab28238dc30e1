"""How much of a calibrated demo run's sample error is a systematic eps bias: the mean of (quantized eps - FP eps)
over FP trajectories (--fit_samples, --fit_seed), per sampler step and pixel, then the digits-FID of --num_samples
quantized samples (--seed, the calibrate CLI's quality-check seed) as they are and with that mean subtracted from
eps at every step (global scalar, and per step and pixel). Diagnostic for issue 14 (session 10): not yet a
calibration stage. Prints one table, writes JSON.

  PYTHONPATH=. python bench/eps_bias.py --run_dir /tmp/demo_run --out runs/eps_bias.json
"""
from __future__ import annotations

from absl import app, flags
import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from tcaq_jax import atomic_io
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
  ts = jnp.asarray(fp_sampler.consts['timesteps'], jnp.int32)

  @jax.jit
  def step_bias(q_eps, f_eps, x, t, i):     # one compiled program (params as arguments), called once per step
    tt = jnp.full((x.shape[0],), t, jnp.int32)
    return jnp.mean(q_eps(x, tt, i, None) - f_eps(x, tt, i, None), axis=0)
  maps = jnp.stack([step_bias(q.eps_fn, fp_eps, xs[i], ts[i], jnp.int32(i))
                    for i in range(len(ts))])                # [steps, H, W, C]
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
    atomic_io.write_json(FLAGS.out, results, indent=1)


if __name__ == '__main__':
  app.run(main)
