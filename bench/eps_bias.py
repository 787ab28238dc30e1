"""The eps bias correction (--eps_bias, tcaq_jax/train/eps_bias.py) on a finished demo calibration: the digits-FID
of --num_samples quantized samples (--seed, the calibrate CLI's quality-check seed) without a correction, with the
run's own (when it has one), and refitted here per mode ('channel', 'pixel'), trajectory count (--fit_samples,
seed --fit_seed) and with / without the --eps_scale factor (--scales). Prints one table, writes JSON.

  PYTHONPATH=. python bench/eps_bias.py --run_dir runs/calib/demo --out runs/eps_bias.json
"""
from __future__ import annotations

from absl import app, flags
import jax.numpy as jnp
import numpy as np

from tcaq_jax import atomic_io
from tcaq_jax.demo.classifier import demo_quality
from tcaq_jax.diffusion.batched import sample_all
from tcaq_jax.diffusion.ddim import sampler_coefficients
from tcaq_jax.diffusion.host_sampler import HostLoopSampler
from tcaq_jax.images import to_uint8
from tcaq_jax.models import family
from tcaq_jax.quantized import load_quantized, quant_eps_fn, quant_forward
from tcaq_jax.train import eps_bias

flags.DEFINE_string('run_dir', None, 'a finished calibration of the demo model', required=True)
flags.DEFINE_list('fit_samples', ['32', '64', '256'], 'FP trajectory counts the correction is refitted on')
flags.DEFINE_list('modes', ['channel', 'pixel'], 'correction modes refitted')
flags.DEFINE_list('rounds', ['1'], 'fit rounds (--eps_bias_rounds) refitted')
flags.DEFINE_list('scales', ['false', 'true'], 'refit without / with the --eps_scale factor')
flags.DEFINE_integer('fit_seed', 7, 'seed of the refit trajectories (not the evaluation seed)')
flags.DEFINE_integer('batch', 32, 'sampler batch (fit and evaluation)')
flags.DEFINE_integer('num_samples', 256, 'samples scored per variant')
flags.DEFINE_integer('seed', 1234, 'sample seed (the calibrate CLI quality check uses 1234)')
flags.DEFINE_string('out', None, 'JSON output path')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  q = load_quantized(FLAGS.run_dir)
  cfg = q.meta['config']
  coeffs = sampler_coefficients(q.config, cfg['num_steps'], cfg['skip_type'], cfg['eta'])
  shape = tuple(family.sample_shape(q.config))
  plain = q.qstate.replace(out_bias=None, out_scale=None)
  fp_sampler = HostLoopSampler(family.eps_fn(q.model, q.params, q.config), coeffs, shape)
  err = eps_bias.make_error_sum(quant_forward(q.model, q.policy, q.config), family.forward(q.model, q.config))
  variants = {'none': (None, None, {})}
  if q.qstate.out_bias is not None:
    variants[f"run's own ({cfg.get('eps_bias')}, {cfg.get('eps_bias_samples')} trajectories"
             f"{', scaled' if q.qstate.out_scale is not None else ''})"] = (q.qstate.out_bias, q.qstate.out_scale, {})
  def with_bias(bias, scale):
    qs = plain.replace(out_bias=None if bias is None else jnp.asarray(bias),
                       out_scale=None if scale is None else jnp.asarray(scale))
    eps = quant_eps_fn(q.model, q.params, qs, q.policy, q.config)
    return HostLoopSampler(eps, coeffs, shape), (q.params, qs)

  for mode in FLAGS.modes:
    for n in map(int, FLAGS.fit_samples):
      for rounds in map(int, FLAGS.rounds):
        for scaled in (v.lower() in ('1', 'true', 'yes') for v in FLAGS.scales):
          bias, scale, info = eps_bias.fit_rounds(fp_sampler, err, with_bias, q.params, rounds, n, FLAGS.batch,
                                                  FLAGS.fit_seed, mode, scale=scaled)
          name = f'{mode}, {info["samples"]} trajectories, {rounds} round(s){", scaled" if scaled else ""}'
          variants[name] = (jnp.asarray(bias), None if scale is None else jnp.asarray(scale), info)
  results = {'run_dir': FLAGS.run_dir, 'fit_seed': FLAGS.fit_seed, 'seed': FLAGS.seed,
             'num_samples': FLAGS.num_samples, 'variants': {}}
  print(f'| correction | digits-FID ({FLAGS.num_samples} samples) | confident | fit s | mean bias |\n|---|---|---|---|---|')
  like = None
  for name, (bias, scale, info) in variants.items():
    eps = quant_eps_fn(q.model, q.params, plain.replace(out_bias=bias, out_scale=scale), q.policy, q.config,
                       like=like)
    like = eps if bias is not None else like
    r = demo_quality(sample_all(HostLoopSampler(eps, coeffs, shape), FLAGS.num_samples, FLAGS.batch,
                                seed=FLAGS.seed, convert=to_uint8, pad=True))
    mean = None if bias is None else float(np.mean(np.asarray(bias)))
    results['variants'][name] = {'fid': float(r['fid']), 'confident_fraction': float(r['confident_fraction']),
                                 'fit_s': info.get('seconds'), 'mean_bias': mean}
    print(f"| {name} | {r['fid']:.3f} | {100 * r['confident_fraction']:.1f}% | "
          f"{'-' if not info else format(info['seconds'], '.1f')} | {'-' if mean is None else format(mean, '.2e')} |")
  if FLAGS.out:
    atomic_io.write_json(FLAGS.out, results, indent=1)


if __name__ == '__main__':
  app.run(main)
