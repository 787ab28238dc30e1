"""Behaviour check for refactors of the calibration pipeline: three small demo calibrations (tcaq W4A8 with
TCR + DAQ + one PAR round, qdiff W4A4 with learned activation scales, minmax W6A6), each dumping its report
losses, every quantizer-state array and 8 sampled images, then a comparison of two such dumps.

  PYTHONPATH=. python bench/calib_fingerprint.py --out /tmp/fp/new                 # ~15 min on 2 cores
  PYTHONPATH=. python bench/calib_fingerprint.py --compare /tmp/fp/old,/tmp/fp/new  # prints one table
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

flags.DEFINE_string('out', '', 'dump directory (one calibration dir per row + arrays + fingerprint.json)')
flags.DEFINE_list('compare', [], 'two dump directories to compare')
flags.DEFINE_list('rows', [], 'only these rows (default: all)')
FLAGS = flags.FLAGS

BASE = dict(num_steps=10, calib_steps=4, calib_samples=8, capture_batch=8, forward_batch=16, act_batch=8,
            iters_scale=0.002, chunk=20, par_rounds=1, recon_samples=32, png_samples=4, seed=1, progress=False)
# (issue 14 renamed the earlier 'qdiff' to 'qdiff_plus' and made the DAQ output-error rule and --keep_best tcaq's
# defaults: these
# rows keep the earlier behaviour, so dumps made before and after compare)
ROWS = {'tcaq_w4a8': dict(method='tcaq', w_bits=4, a_bits=8, daq_rule='llr', keep_best=False),
        'qdiff_w4a4': dict(method='qdiff_plus', w_bits=4, a_bits=4),
        'minmax_w6a6': dict(method='minmax', w_bits=6, a_bits=6)}
UNIT_KEYS = ('unit', 'round', 'mse_before', 'mse_after', 'final_rec', 'final_total')


def dump(out: str) -> None:
  from tcaq_jax.diffusion.ddim import sampler_coefficients
  from tcaq_jax.diffusion.host_sampler import make_sampler
  from tcaq_jax.quantized import load_quantized
  from tcaq_jax.train.pipeline import run
  res = {}
  for name, over in ROWS.items():
    if FLAGS.rows and name not in FLAGS.rows:
      continue
    t0 = time.time()
    report = run(dict(BASE, out_dir=os.path.join(out, name), **over))
    q = load_quantized(os.path.join(out, name))
    arrays = {'step_slot': np.asarray(q.qstate.step_slot)}
    for path, st in q.qstate.layers.items():
      arrays.update({f'{path}:{f}': np.asarray(v) for f, v in st.set_fields().items()})
    np.savez(os.path.join(out, f'{name}_qstate.npz'), **arrays)
    sampler = make_sampler(q.eps_fn, sampler_coefficients(q.config, 10, 'quad', 0.0), (16, 16, 1), loop='host')
    images = np.asarray(sampler.sample(7, 0, 8)['images'])
    np.save(os.path.join(out, f'{name}_samples.npy'), images)
    res[name] = {'units': [{k: u.get(k) for k in UNIT_KEYS} for u in report['units']],
                 'seconds': time.time() - t0, 'samples_sha256': hashlib.sha256(images.tobytes()).hexdigest(),
                 'phases': report.get('phases_this_process'), 'compile': report.get('compile_this_process')}
    print(f'{name}: {res[name]["seconds"]:.0f} s', flush=True)
  with open(os.path.join(out, 'fingerprint.json'), 'w') as f:
    json.dump(res, f, indent=1)


def compare(a: str, b: str) -> None:
  fa, fb = (json.load(open(os.path.join(d, 'fingerprint.json'))) for d in (a, b))
  print(f'| row | qstate arrays | max abs diff | max rel diff | samples max abs diff | unit losses equal | '
        f'max rel loss diff | seconds {os.path.basename(a)} / {os.path.basename(b)} |')
  print('|---|---|---|---|---|---|---|---|')
  for name in ROWS:
    if name not in fa or name not in fb:
      continue
    qa, qb = (np.load(os.path.join(d, f'{name}_qstate.npz')) for d in (a, b))
    if set(qa.files) != set(qb.files):
      print(f'| {name} | different keys: {sorted(set(qa.files) ^ set(qb.files))[:4]} |')
      continue
    diffs = [(np.abs(qa[k].astype(np.float64) - qb[k]).max(initial=0.),
              (np.abs(qa[k].astype(np.float64) - qb[k]) / np.maximum(np.abs(qa[k]), 1e-12)).max(initial=0.))
             for k in qa.files]
    sa, sb = (np.load(os.path.join(d, f'{name}_samples.npy')) for d in (a, b))
    la = [[u[k] for k in UNIT_KEYS] for u in fa[name]['units']]
    lb = [[u[k] for k in UNIT_KEYS] for u in fb[name]['units']]
    rel = [abs(x - y) / max(abs(x), 1e-12) for ra, rb in zip(la, lb) for x, y in zip(ra[2:], rb[2:])
           if isinstance(x, float) and isinstance(y, float)]
    print(f'| {name} | {len(qa.files)} | {max(d[0] for d in diffs):.3g} | {max(d[1] for d in diffs):.3g} | '
          f'{np.abs(sa - sb).max():.3g} | {la == lb} ({len(la)} units) | {max(rel, default=0.):.3g} | '
          f'{fa[name]["seconds"]:.0f} / {fb[name]["seconds"]:.0f} |')


def main(argv):
  del argv
  if FLAGS.compare:
    compare(*FLAGS.compare)
  else:
    os.makedirs(FLAGS.out, exist_ok=True)
    dump(FLAGS.out)


if __name__ == '__main__':
  app.run(main)
