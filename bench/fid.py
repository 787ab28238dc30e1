"""Throughput of FID evaluation: Inception feature extraction, and sample-then-FID for ddim_cifar10.

  PYTHONPATH=. python bench/fid.py [--batch_size 16] [--num_batches 3] [--sample_batch 4] [--sample_steps 10]

Random weights everywhere (speed does not depend on them). Rows:
  features            FID Inception (uint8 32x32 -> 299x299, pool3 + spatial + logits), per precision
  sample+features     DDIM (quad skip, eta 0) with the random-weight ddim_cifar10 UNet, then the features;
                      fake-quant off (FP) and on (W4A8 qdiff policy, synthetic scales) via tcaq_jax.quant.apply
Timings exclude compilation (one warm-up call per shape). The 50k column extrapolates linearly: to 50,000
images, and for sampling to 100 DDIM steps when --sample_steps is smaller (the paper's CIFAR-10 setting).
Prints one Markdown table.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from tcaq_jax.diffusion import sharding  # noqa: E402
from tcaq_jax.eval import inception  # noqa: E402

flags.DEFINE_integer('batch_size', 16, 'images per feature-extraction batch')
flags.DEFINE_integer('num_batches', 3, 'timed feature batches')
flags.DEFINE_integer('sample_batch', 4, 'images per sampling batch (0 skips the sampling rows)')
flags.DEFINE_integer('sample_steps', 10, 'DDIM steps timed (100 in the paper; time is linear in steps)')
flags.DEFINE_integer('sample_batches', 1, 'timed sampling batches')
flags.DEFINE_list('precisions', ['highest', 'default'], 'Inception conv precisions to time')
FLAGS = flags.FLAGS

N_EVAL = 50_000
PAPER_STEPS = 100


def _time(fn, n):
  jax.block_until_ready(fn(0))        # compile + warm-up
  t = time.perf_counter()
  for i in range(n):
    jax.block_until_ready(fn(i + 1))
  return (time.perf_counter() - t) / n


def _fmt_time(s):
  return f'{s / 3600:.1f} h' if s >= 3600 else f'{s / 60:.1f} min' if s >= 60 else f'{s:.1f} s'


def bench_features(rows):
  params = sharding.replicate(inception.init_params(0), sharding.batch_mesh())
  mesh = sharding.batch_mesh()
  rng = np.random.default_rng(0)
  b = sharding.pad_to_multiple(FLAGS.batch_size, mesh.devices.size)
  images = sharding.shard_batch(rng.integers(0, 256, size=(b, 32, 32, 3), dtype=np.uint8), mesh)
  for prec in FLAGS.precisions:
    p = jax.lax.Precision[prec.upper()]
    sec = _time(lambda i: inception.features(params, images, precision=p), FLAGS.num_batches)
    rows.append((f'features (precision={prec})', b, b / sec, N_EVAL / b * sec))
  return params


def _synthetic_qstate(policy, params, n_steps):
  from tcaq_jax.quant.state import LayerQState, QState
  """Shape-correct quantizer state with min-max weight scales and a fixed activation scale (speed only)."""
  layers = {}
  for spec in policy.quantized():
    st = {}
    if spec.weights:
      node = params
      for seg in spec.path.split('/'):
        node = node[seg]
      w = jnp.asarray(node['kernel'])
      half = 2 ** (spec.w_bits - 1)
      amax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True)
      st['w_scale'] = jnp.maximum(amax, 1e-8) / (half - 1)
      st['w_zero'] = jnp.full_like(st['w_scale'], half)
    if spec.acts:
      st['a_scale'] = jnp.full((1, spec.n_segments), 0.05, jnp.float32)
      st['a_zero'] = jnp.full((1, spec.n_segments), 2 ** (spec.a_bits - 1), jnp.float32)
    layers[spec.path] = LayerQState(**st)
  return QState(jnp.zeros((n_steps,), jnp.int32), layers)


def bench_sampling(rows, inc_params, notes):
  try:
    from tcaq_jax.diffusion import ddim
    from tcaq_jax.models import configs
  except ImportError as e:
    notes.append(f'sample+features rows skipped: sampler or models missing ({e})')
    return
  config = configs.get_config('ddim_cifar10')
  model = configs.build_model(config)
  res = config.get('resolution', 32)
  x0 = jnp.zeros((1, res, res, 3), jnp.float32)
  t0 = jnp.zeros((1,), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x0, t0)
  params = variables['params']
  coeffs = ddim.sampler_coefficients(config, num_steps=FLAGS.sample_steps, skip_type='quad', eta=0.0)
  scale = PAPER_STEPS / FLAGS.sample_steps

  def fp_eps(p, x, t, step_index, cond):
    del step_index, cond
    return model.apply({'params': p}, x, t)

  variants = [('FP', jax.tree_util.Partial(fp_eps, params))]
  try:
    from tcaq_jax.quant import apply as qapply
    from tcaq_jax.quant import policy as qpolicy
    pol = qpolicy.build_policy(model, variables, (x0, t0), preset='qdiff', w_bits=4, a_bits=8)
    qstate = _synthetic_qstate(pol, params, FLAGS.sample_steps)

    def q_eps(p, qs, x, t, step_index, cond):
      del cond
      return qapply.quantized_apply(model, {'params': p}, qs, pol, x, t, step_index=step_index)

    variants.append(('W4A8 fake-quant', jax.tree_util.Partial(q_eps, params, qstate)))
  except (ImportError, AttributeError) as e:
    notes.append(f'fake-quant row skipped: tcaq_jax.quant.apply unavailable ({e})')

  for name, eps_fn in variants:
    sampler = ddim.DDIMSampler(eps_fn, coeffs, shape=(res, res, 3))
    b = FLAGS.sample_batch

    def run(i):
      x = sampler.sample(seed=0, start=i * b, batch_size=b)['images']
      u8 = jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
      return inception.features(inc_params, u8)

    def sample_only(i):
      return sampler.sample(seed=0, start=i * b, batch_size=b)['images']

    sec_s = _time(sample_only, FLAGS.sample_batches)
    sec = _time(run, FLAGS.sample_batches)
    feat = sec - sec_s
    rows.append((f'sample {FLAGS.sample_steps} steps ({name})', b, b / sec_s, N_EVAL / b * sec_s * scale))
    rows.append((f'sample {FLAGS.sample_steps} steps + features ({name})', b, b / sec,
                 N_EVAL / b * (sec_s * scale + feat)))


def main(argv):
  del argv
  rows, notes = [], []
  inc_params = bench_features(rows)
  if FLAGS.sample_batch > 0:
    bench_sampling(rows, inc_params, notes)
  dev = jax.devices()[0]
  print(f'device: {dev.platform} ({dev.device_kind}) x{jax.device_count()}, jax {jax.__version__}')
  print('| stage | batch | images/s | extrapolated 50k |')
  print('|---|---|---|---|')
  for name, b, ips, t50k in rows:
    print(f'| {name} | {b} | {ips:.2f} | {_fmt_time(t50k)} |')
  for n in notes:
    print(f'note: {n}')


if __name__ == '__main__':
  app.run(main)
