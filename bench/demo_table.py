"""The demo table: FID (in the demo digit classifier's 64-d feature space) of the shipped digits DDIM model in FP
and quantized with minmax, qdiff and tcaq at W8A8, W6A6, W4A8, W4A4, plus the ablation of each TCAQ component
at W4A4 (without TCR, without DAQ, without PAR), with CPU-feasible iteration counts (--iters_scale).

  PYTHONPATH=. python bench/demo_table.py --out runs/demo_table            # resumable; rows stream to table.md
  PYTHONPATH=. python bench/demo_table.py --out runs/demo_table --diagnostics   # + the diagnostic rows

Every calibration writes its own out_dir under --out (re-running skips finished ones). Each row samples
--num_samples images with the same seeds (DDIM --num_steps 'quad', eta 0) and compares them to the 1,797 real
digits. 'conf' is the mean top-1 classifier probability of the samples. Prints the table at the end.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from tcaq_jax.checkpoint import quiet_orbax_logs  # noqa: E402
from tcaq_jax.diffusion.batched import sample_all  # noqa: E402
from tcaq_jax.diffusion.ddim import sampler_coefficients  # noqa: E402
from tcaq_jax.assets import DEMO_UNET_DIR  # noqa: E402
from tcaq_jax.demo.classifier import classify, load_classifier  # noqa: E402
from tcaq_jax.demo.data import load_digits_16  # noqa: E402
from tcaq_jax.eval.metrics import feature_stats, frechet_distance  # noqa: E402
from tcaq_jax.diffusion.host_sampler import make_sampler  # noqa: E402
from tcaq_jax.models import family  # noqa: E402
from tcaq_jax.quantized import load_quantized  # noqa: E402
from tcaq_jax.train import pipeline  # noqa: E402

flags.DEFINE_string('out', 'runs/demo_table', 'output folder (one calibration dir per row + table.md/json)')
flags.DEFINE_float('iters_scale', 0.005, 'multiplies 20k / 10k reconstruction iterations')
flags.DEFINE_integer('num_samples', 500, 'generated images per row for the FID')
flags.DEFINE_integer('num_steps', 50, 'DDIM steps (quad, eta 0) for calibration and evaluation')
flags.DEFINE_integer('calib_samples', 32, 'calibration samples per selected step (20 steps)')
flags.DEFINE_integer('recon_samples', 320, 'reconstruction set size')
flags.DEFINE_list('rows', [], 'only these rows (names as in the table); empty = all')
flags.DEFINE_bool('diagnostics', False, 'also run the diagnostic rows (DIAG_ROWS: FP with other seeds, and W4A4 '
                  'with TCR on conv layers only, min-max activation ranges instead of the percentile search, '
                  '10x the iterations, no TCR and no PAR)')
flags.DEFINE_bool('compile_cache', True, 'persistent JAX compilation cache under --out/jax_cache')
FLAGS = flags.FLAGS

BITS = [(8, 8), (6, 6), (4, 8), (4, 4)]
# Diagnostic rows (--diagnostics): why is tcaq without TCR worse than plain minmax at W4A4, and tcaq worse than
# qdiff at W6A6?
# 'sample_seed' changes the evaluation seeds (fp_seed2: the FID difference from 'fp' is pure sampling noise).
DIAG_ROWS = [
    ('fp_seed2', None, 32, 32, {'sample_seed': 456}),
    ('fp_seed3', None, 32, 32, {'sample_seed': 789}),
    ('tcaq_w4a4_tcr_conv_only', 'tcaq', 4, 4, {'tcr_dense': False}),
    ('tcaq_w6a6_tcr_conv_only', 'tcaq', 6, 6, {'tcr_dense': False}),
    ('tcaq_w6a6_no_tcr', 'tcaq', 6, 6, {'tcr': False}),
    ('tcaq_w6a6_rtru3', 'tcaq', 6, 6, {'r_tru': 3.0}),
    ('tcaq_w4a4_no_tcr_pct100', 'tcaq', 4, 4, {'tcr': False, 'act_pcts': (100.0,)}),
    ('tcaq_w4a4_iters10x', 'tcaq', 4, 4, {'iters_scale': 0.05}),
    ('tcaq_w6a6_pct100', 'tcaq', 6, 6, {'act_pcts': (100.0,)}),
    ('tcaq_w4a4_pct100', 'tcaq', 4, 4, {'act_pcts': (100.0,)}),
    ('tcaq_w4a4_no_tcr_no_par', 'tcaq', 4, 4, {'tcr': False, 'par': False}),
    ('tcaq_w4a4_no_tcr_keep_act', 'tcaq', 4, 4, {'tcr': False, 'par_research_act': False}),
    ('tcaq_w6a6_iters10x', 'tcaq', 6, 6, {'iters_scale': 0.05}),
]


def row_specs():
  """(name, method, w, a, extra CalibConfig overrides), in the order they run (cheap and key rows first)."""
  rows = [('fp', None, 32, 32, {})]
  rows += [(f'minmax_w{w}a{a}', 'minmax', w, a, {}) for w, a in BITS]
  for w, a in [(4, 4), (4, 8), (6, 6), (8, 8)]:
    r_tru = 3.0 if (w, a) == (4, 8) else 0.0
    rows.append((f'tcaq_w{w}a{a}', 'tcaq', w, a, {'r_tru': r_tru}))
    rows.append((f'qdiff_w{w}a{a}', 'qdiff', w, a, {}))
    if (w, a) == (4, 4):
      rows.append(('tcaq_w4a4_no_par', 'tcaq', 4, 4, {'par': False}))
      rows.append(('tcaq_w4a4_no_tcr', 'tcaq', 4, 4, {'tcr': False}))
      rows.append(('tcaq_w4a4_no_daq', 'tcaq', 4, 4, {'daq': False}))
  if FLAGS.diagnostics:
    rows += DIAG_ROWS
  return rows


def sample(eps_fn, config, n, steps, seed=123, batch=250):
  coeffs = sampler_coefficients(config, steps, 'quad', 0.0)
  sampler = make_sampler(eps_fn, coeffs, (16, 16, 1))        # host loop on CPU (diffusion/host_sampler.py)
  return np.clip(sample_all(sampler, n, batch, seed), -1., 1.)


def main(argv):
  del argv
  quiet_orbax_logs()
  os.makedirs(FLAGS.out, exist_ok=True)
  if FLAGS.compile_cache:
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(os.path.join(FLAGS.out, 'jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  clf, clf_params = load_classifier()
  real, _ = load_digits_16()
  mu_r, sig_r = feature_stats(classify(clf, clf_params, real)[0])
  results_path = os.path.join(FLAGS.out, 'table.json')
  results = json.load(open(results_path)) if os.path.exists(results_path) else {}
  for name, method, w, a, extra in row_specs():
    if FLAGS.rows and name not in FLAGS.rows:
      continue
    if name in results:
      continue
    t0 = time.time()
    extra = dict(extra)
    sample_seed = extra.pop('sample_seed', 123)
    if method is None:
      model, params, config = family.load(DEMO_UNET_DIR)
      eps = family.eps_fn(model, params, config)
      calib_s, n_units = 0.0, 0
    else:
      kw = dict(out_dir=os.path.join(FLAGS.out, name), method=method, w_bits=w, a_bits=a,
                num_steps=FLAGS.num_steps, calib_samples=FLAGS.calib_samples, recon_samples=FLAGS.recon_samples,
                iters_scale=FLAGS.iters_scale, chunk=100, png_samples=16, eval_units=False)
      kw.update(extra)                                                  # a row may override any of these
      report = pipeline.run(kw)
      calib_s = time.time() - t0
      q = load_quantized(kw['out_dir'])
      eps, config, n_units = q.eps_fn, q.config, len(report['units'])
    images = sample(eps, config, FLAGS.num_samples, FLAGS.num_steps, seed=sample_seed)
    feats, probs = classify(clf, clf_params, images)
    mu, sig = feature_stats(feats)
    fid = frechet_distance(mu_r, sig_r, mu, sig)
    if sample_seed != 123:
      extra['sample_seed'] = sample_seed
    results[name] = {'method': method or 'fp', 'w': w, 'a': a, 'extra': extra, 'fid': fid,
                     'conf': float(probs.max(1).mean()), 'calib_s': calib_s, 'recon_units': n_units,
                     'total_s': time.time() - t0}
    logging.info('%s: FID %.3f (%.0f s)', name, fid, time.time() - t0)
    with open(results_path, 'w') as f:
      json.dump(results, f, indent=1)
    write_table(results)
  write_table(results)
  print(open(os.path.join(FLAGS.out, 'table.md')).read())


def write_table(results):
  lines = [f'demo FID (digit-classifier features, {FLAGS.num_samples} samples vs 1,797 real digits; DDIM '
           f'{FLAGS.num_steps} quad steps; iters_scale {FLAGS.iters_scale}: {int(20000 * FLAGS.iters_scale)} '
           f'iterations per block + {int(10000 * FLAGS.iters_scale)} per PAR round; calibration '
           f'{FLAGS.calib_samples} x 20 steps)', '',
           '| row | method | W/A | FID | conf | calib s |', '|---|---|---|---|---|---|']
  for name, r in results.items():
    wa = 'FP' if r['method'] == 'fp' else f"W{r['w']}A{r['a']}"
    lines.append(f"| {name} | {r['method']}{' ' + json.dumps(r['extra']) if r['extra'] else ''} | {wa} | "
                 f"{r['fid']:.3f} | {r['conf']:.3f} | {r['calib_s']:.0f} |")
  lines += ['', *pivot_lines(results)]
  with open(os.path.join(FLAGS.out, 'table.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def pivot_lines(results):
  """The main rows as one FID grid: methods down, bit widths across (FP repeated in its own row)."""
  head = ' | '.join(f'W{w}A{a}' for w, a in BITS)
  lines = [f'| FID | {head} |', '|---' * (len(BITS) + 1) + '|']
  if 'fp' in results:
    lines.append('| fp | ' + ' | '.join(f"{results['fp']['fid']:.2f}" for _ in BITS) + ' |')
  for method in ('minmax', 'qdiff', 'tcaq'):
    cells = [results.get(f'{method}_w{w}a{a}') for w, a in BITS]
    lines.append(f'| {method} | ' + ' | '.join('-' if c is None else f"{c['fid']:.2f}" for c in cells) + ' |')
  abl = [(n[len('tcaq_w4a4_'):], results[n]['fid']) for n in ('tcaq_w4a4_no_tcr', 'tcaq_w4a4_no_daq',
                                                                'tcaq_w4a4_no_par') if n in results]
  if abl:
    lines += ['', 'W4A4 ablations: ' + ', '.join(f'{k} {v:.2f}' for k, v in abl)]
  return lines


if __name__ == '__main__':
  app.run(main)
