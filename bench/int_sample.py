"""Sampling images/s of the exported integer path vs fake quant vs FP, and the exported size vs the float32
weights, in one run (tcaq_jax/export, tcaq_jax/quant/intexec.py).

  PYTHONPATH=. python bench/int_sample.py                                       # CPU: demo + ddim_cifar10
  PYTHONPATH=. python bench/int_sample.py --models cifar10 --cifar_batch 512 --steps 100 --write     # GPU

The quantized models are `tcaq_jax.export.synthetic` ones (qdiff policy: every conv / linear at W{bits}A8,
attention operands A8, post-Softmax 8 bits; TCR ratios, per-channel min-max weight scales, AdaRound rounding,
per-step activation ranges measured on an FP forward): the values are synthetic, the work per step is that of
an exported calibration run. The demo uses its shipped weights, ddim_cifar10 random ones. Each variant samples
one batch to compile and warm up, then is timed over --repeats batches (best kept); the sampler loop is the one
`eval.sample` uses (host loop on CPU, one lax.scan elsewhere). Rows print as measured, then one table.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from tcaq_jax.assets import DEMO_UNET_DIR  # noqa: E402
from tcaq_jax.diffusion.batched import sample_all  # noqa: E402
from tcaq_jax.diffusion.ddim import sampler_coefficients  # noqa: E402
from tcaq_jax.diffusion.host_sampler import make_sampler  # noqa: E402
from tcaq_jax.export import export_quantized, load_exported  # noqa: E402
from tcaq_jax.export.synthetic import random_params, synthetic_quantized  # noqa: E402
from tcaq_jax.models import configs, family  # noqa: E402

flags.DEFINE_list('models', ['demo', 'cifar10'], 'demo and/or cifar10')
flags.DEFINE_list('bits', ['8', '4'], 'weight bit widths (activations 8 bits)')
flags.DEFINE_list('variants', ['fp', 'fake', 'int'], 'fp, fake and/or int')
flags.DEFINE_integer('demo_batch', 64, 'batch size of the demo model')
flags.DEFINE_integer('cifar_batch', 8, 'batch size of ddim_cifar10')
flags.DEFINE_integer('steps', 10, 'DDIM steps (quad, eta 0)')
flags.DEFINE_integer('repeats', 1, 'timed batches per variant (the best is reported)')
flags.DEFINE_enum('sampler_loop', 'auto', ['auto', 'device', 'host'], 'as in tcaq_jax.eval.sample')
flags.DEFINE_bool('write', False, 'merge machine-readable records into docs/results/perf.json')
FLAGS = flags.FLAGS


def _model(name):
  if name == 'demo':
    model, params, config = family.load(DEMO_UNET_DIR)
    return model, params, config, 'demo_unet (trained)'
  config = configs.get_config('ddim_cifar10')
  model = configs.build_model(config)
  return model, random_params(config, 0, model), config, 'ddim_cifar10 (random)'


def _time(eps, config, bs) -> tuple[float, float]:
  """(first batch s incl. compile, best timed batch s) of sampling bs images with eps."""
  coeffs = sampler_coefficients(config, FLAGS.steps, 'quad', 0.0)
  sampler = make_sampler(eps, coeffs, family.sample_shape(config), loop=FLAGS.sampler_loop)

  def run():
    t0 = time.perf_counter()
    images = sample_all(sampler, bs, bs, seed=1)
    if not np.isfinite(images).all():
      raise SystemExit('non-finite samples')
    return time.perf_counter() - t0

  first = run()
  return first, min(run() for _ in range(FLAGS.repeats))


def main(argv):
  del argv
  rows = []
  tmp = tempfile.mkdtemp(prefix='int_sample_')
  for name in FLAGS.models:
    model, params, config, label = _model(name)
    bs = FLAGS.demo_batch if name == 'demo' else FLAGS.cifar_batch
    float_mb = sum(np.size(a) for a in jax.tree.leaves(params)) * 4 / 1e6
    todo = [('fp', None)] if 'fp' in FLAGS.variants else []
    todo += [(v, int(b)) for b in FLAGS.bits for v in ('fake', 'int') if v in FLAGS.variants]
    exported = {}
    for variant, bits in todo:
      if variant == 'fp':
        eps, size = family.eps_fn(model, params, config), float_mb
      else:
        if bits not in exported:
          q = synthetic_quantized(model, params, config, w_bits=bits, a_bits=8, num_steps=FLAGS.steps,
                                  num_slots=min(FLAGS.steps, 4))
          out = os.path.join(tmp, f'{name}_w{bits}')
          man = export_quantized(q, out, source='synthetic')
          exported[bits] = (load_exported(out), man['sizes']['export_bytes'] / 1e6)
        m, size = exported[bits]
        eps = m.eps_fn(variant)
      tag = variant if bits is None else f'{variant} w{bits}a8'
      try:
        first, best = _time(eps, config, bs)
      except Exception as e:  # noqa: BLE001  (a backend that cannot compile a variant: report it, keep going)
        print(f'# {label} {tag} batch {bs}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}', flush=True)
        continue
      rows.append((label, tag, bs, FLAGS.steps, first, best, bs / best, size, float_mb))
      print(f'# {label} {tag} batch {bs}: first {first:.1f} s, {bs / best:.3f} img/s, {size:.2f} MB', flush=True)
  fp = {r[0]: r[6] for r in rows if r[1] == 'fp'}
  head = ('model', 'variant', 'batch', 'steps', 'first batch s', 'timed s', 'images/s', 'vs FP', 'size MB',
          'vs float32')
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for label, tag, bs, steps, first, best, ips, size, fmb in rows:
    rel = f'{ips / fp[label]:.2f}x' if label in fp else '-'
    print(f'| {label} | {tag} | {bs} | {steps} | {first:.1f} | {best:.2f} | {ips:.3f} | {rel} | {size:.2f} | '
          f'{size / fmb:.3f} |')
  if FLAGS.write:
    from records import merge, record
    recs = []
    for label, tag, bs, steps, first, best, ips, size, fmb in rows:
      variant = tag.split()[0]
      key = f'{label.split()[0]} {tag} batch {bs} steps {steps}'
      recs.append(record('int_sample', f'sample_{variant}_img_s', ips, 'img/s', key=key, batch=bs, steps=steps,
                         variant=tag, first_batch_s=first))
      recs.append(record('int_sample', 'model_size_mb', size, 'MB', key=f'{label.split()[0]} {tag}',
                         float32_mb=fmb, ratio=size / fmb))
    print('records ->', merge(recs))


if __name__ == '__main__':
  app.run(main)
