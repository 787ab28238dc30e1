"""Images/second of the jitted DDIM sampler (one lax.scan per batch), FP and W4A8 fake quant, compile time
measured separately (ahead-of-time), and optionally a timed sample + Inception-feature run projected to 50k.

  PYTHONPATH=. python bench/sample.py                                   # demo (shipped weights) + ddim_cifar10
  PYTHONPATH=. python bench/sample.py --models cifar10 --cifar_batch_sizes 512 --fid_images 5120 --write

Variants: `fp` (the FP eps_fn) and `w4a8` (`tcaq_jax.quantized.quant_eps_fn`, the path calibrated runs sample
with: qdiff policy at W4A8, min-max weight scales with AdaRound alphas (hard rounding), one activation scale per
sampler step; the values are synthetic, the work per step is that of a real run). Rows are printed as they are
measured (flushed), then one table. `--fid_images N` samples N images of the last cifar10 batch size with the compiled
sampler of each of --fid_variants, runs the FID Inception (random weights, --inception_precision) on them and
accumulates the 2048-d statistics, and projects the measured wall time to 50,000 images
(`fid50k_projected_min`).
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from tcaq_jax.assets import DEMO_UNET_DIR  # noqa: E402
from tcaq_jax.diffusion.ddim import DDIMSampler, _run, sampler_coefficients  # noqa: E402
from tcaq_jax.models import family  # noqa: E402
from tcaq_jax.models.configs import build_model, get_config  # noqa: E402

flags.DEFINE_list('models', ['demo', 'cifar10'], 'demo and/or cifar10')
flags.DEFINE_list('variants', ['fp', 'w4a8'], 'fp and/or w4a8 (fake quant)')
flags.DEFINE_bool('write', False, 'merge machine-readable records into docs/results/perf.json')
flags.DEFINE_list('demo_batch_sizes', ['16', '64', '256'], 'batch sizes for the demo model')
flags.DEFINE_list('cifar_batch_sizes', ['1', '4'], 'batch sizes for ddim_cifar10')
flags.DEFINE_integer('steps', 100, 'DDIM steps')
flags.DEFINE_integer('repeats', 1, 'timed runs per setting (the best is reported)')
flags.DEFINE_integer('fid_images', 0, 'cifar10: images to sample + featurize per variant for the 50k projection')
flags.DEFINE_list('fid_variants', ['w4a8'], 'variants of the --fid_images run')
flags.DEFINE_enum('inception_precision', 'highest', ['highest', 'default'],
                  'Inception conv precision of the FID run (eval.fid defaults to highest)')
FLAGS = flags.FLAGS

N_EVAL = 50_000


def _model(name):
  if name == 'demo' and os.path.isfile(os.path.join(DEMO_UNET_DIR, 'config.json')):
    model, params, config = family.load(DEMO_UNET_DIR)
    return model, params, config, 'demo_unet (trained)'
  config = get_config('ddim_digits' if name == 'demo' else 'ddim_cifar10')
  model = build_model(config)
  r, c = config['resolution'], config['in_channels']
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, r, r, c)), jnp.zeros((1,), jnp.int32))['params']
  return model, params, config, config['name'] + ' (random)'


def fake_quant_eps(model, params, config, steps: int):
  """The eps_fn a W4A8 calibrated run samples with (synthetic quantizer values, real shapes and work)."""
  from tcaq_jax.quant.policy import build_policy
  from tcaq_jax.quant.state import LayerQState, QState
  from tcaq_jax.quantized import quant_eps_fn
  from tcaq_jax.train import init as qinit
  args, kwargs = family.example_inputs(config, 1)
  policy = build_policy(model, {'params': params}, args, 'qdiff', 4, 8, 8, example_kwargs=kwargs)
  layers = qinit.init_weights(params, policy, {}, 'minmax', adaround=True)
  for spec in policy.quantized():
    if spec.acts:
      st = layers.get(spec.path, LayerQState())
      half = 2.0 ** (spec.a_bits - 1)
      layers[spec.path] = st.replace(a_scale=jnp.full((steps, spec.n_segments), 4.0 / half, jnp.float32),
                                     a_zero=jnp.full((steps, spec.n_segments), half, jnp.float32))
  qstate = QState(jnp.arange(steps, dtype=jnp.int32), layers)
  return quant_eps_fn(model, params, qstate, policy, config)


def _fid_run(sampler, exe, bs: int, n: int) -> tuple[float, float, int]:
  """Samples n images (batches of bs) with the compiled sampler and accumulates Inception pool3 statistics.
  Returns (seconds, seconds of the features + statistics alone, images)."""
  from tcaq_jax.eval import inception
  from tcaq_jax.eval.metrics import StatsAccumulator
  prec = jax.lax.Precision[FLAGS.inception_precision.upper()]
  inc = inception.init_params(0)
  def u8(x):       # images.to_uint8's arithmetic, on the device (no host round trip per batch)
    return jnp.floor(jnp.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0 + 0.5).astype(jnp.uint8)
  feat = jax.jit(lambda p, x: inception.features(p, u8(x), precision=prec)['pool3'])
  warm = jnp.zeros((bs,) + tuple(sampler.shape), jnp.float32)
  jax.block_until_ready(feat(inc, warm))                 # compile outside the timed run
  acc = StatsAccumulator()
  t0 = time.perf_counter()
  t_feat, done = 0.0, 0
  while done < n:
    args, _ = sampler.prepare(1, done, bs)
    images = jax.block_until_ready(exe(*args)['images'])
    t1 = time.perf_counter()
    acc.update(np.asarray(feat(inc, images)))
    t_feat += time.perf_counter() - t1
    done += bs
  t1 = time.perf_counter()
  acc.stats()
  t_feat += time.perf_counter() - t1
  return time.perf_counter() - t0, t_feat, done


def main(argv):
  del argv
  rows, fid_rows = [], []
  for name in FLAGS.models:
    model, params, config, label = _model(name)
    n_params = sum(int(a.size) for a in jax.tree.leaves(params))
    r, c = config['resolution'], config['in_channels']
    coeffs = sampler_coefficients(config, FLAGS.steps, 'quad', 0.0)
    for variant in FLAGS.variants:
      eps = (family.eps_fn(model, params, config) if variant == 'fp'
             else fake_quant_eps(model, params, config, coeffs.num_steps))
      sampler = DDIMSampler(eps, coeffs, (r, r, c))
      sizes = FLAGS.demo_batch_sizes if name == 'demo' else FLAGS.cifar_batch_sizes
      exe = None
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
        rows.append((label, variant, n_params, FLAGS.steps, bs, sampler.mesh.devices.size, compile_s, best,
                     bs / best))
        print(f'# {label} {variant} batch {bs}: compile {compile_s:.1f} s, {bs / best:.3f} img/s', flush=True)
      if name == 'cifar10' and FLAGS.fid_images > 0 and variant in FLAGS.fid_variants:
        secs, feat_s, done = _fid_run(sampler, exe, bs, FLAGS.fid_images)
        proj = secs * N_EVAL / done / 60.0
        fid_rows.append((label, variant, bs, done, secs, feat_s, proj))
        print(f'# {label} {variant} sample+features {done} images: {secs:.1f} s (features {feat_s:.1f} s), '
              f'50k projected {proj:.1f} min', flush=True)
  head = ('model', 'variant', 'params', 'steps', 'batch', 'devices', 'compile_s', 'run_s', 'images/s')
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for label, v, n, s, bs, nd, cs, rs, ips in rows:
    print(f'| {label} | {v} | {n:,} | {s} | {bs} | {nd} | {cs:.1f} | {rs:.2f} | {ips:.3f} |')
  if fid_rows:
    print(f'\n| model | variant | batch | images | sample+features s | features s | 50k projected min |')
    print('|---|---|---|---|---|---|---|')
    for label, v, bs, done, secs, fs, proj in fid_rows:
      print(f'| {label} | {v} | {bs} | {done} | {secs:.1f} | {fs:.1f} | {proj:.2f} |')
  if FLAGS.write:
    from records import merge, record
    recs = []
    for label, v, n, s, bs, nd, cs, rs, ips in rows:
      key = f'{label.split()[0]} batch {bs} steps {s}'
      metric = 'sample_fp_img_s' if v == 'fp' else 'sample_fakequant_img_s'
      recs.append(record('sample', metric, ips, 'img/s', key=key, batch=bs, steps=s, devices=nd, variant=v))
      recs.append(record('sample', 'sampler_compile_s', cs, 's', key=f'{key} {v}', batch=bs, steps=s,
                         devices=nd, variant=v))
    for label, v, bs, done, secs, fs, proj in fid_rows:
      recs.append(record('sample', 'fid50k_projected_min', proj, 'min', key=f'{label.split()[0]} {v}', batch=bs,
                         steps=FLAGS.steps, measured_images=done, measured_s=secs, features_s=fs,
                         inception_precision=FLAGS.inception_precision, variant=v))
    print('records ->', merge(recs))


if __name__ == '__main__':
  app.run(main)
