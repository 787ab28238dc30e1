"""The demo table: FID (in the demo digit classifier's 64-d feature space) of the shipped digits DDIM model in FP
and quantized with minmax, qdiff (Q-Diffusion's released recipe), qdiff_plus (the stronger BRECQ variant), tcaq as
the paper states it (tcaq_paper: its DAQ likelihood-ratio rule) and tcaq with this project's defaults at W8A8,
W6A6, W4A8, W4A4, plus the ablations of tcaq at W6A6 and W4A4 (without TCR, DAQ, PAR, per-step activation scales,
and without TCR and per-step scales), with CPU-feasible iteration counts (--iters_scale).

  PYTHONPATH=. python bench/demo_table.py --out runs/demo_table            # resumable; rows stream to the outputs
  PYTHONPATH=. python bench/demo_table.py --out runs/demo_table --diagnostics   # + the diagnostic rows
  PYTHONPATH=. python bench/demo_table.py --out /tmp/t --rows=fp,minmax_w8a8 --num_samples=100

Outputs in --out: table.md (rows + an FID grid methods x bit widths), table.json (settings + one record per row:
name, method, options, w_bits, a_bits, fid, conf, samples, sample_seed, iters_scale, calib_s, ...), fid_chart.png
(FID by method and bit width) and sample_grids.png (the first 16 FID samples of every row; per-row PNGs in
grids/). Every calibration writes its own out_dir under --out; a row already in table.json with the same
settings is skipped, so an interrupted table resumes where it stopped. Each row samples --num_samples images with
the same seeds (DDIM --num_steps 'quad', eta 0) and compares them to the 1,797 real digits. 'conf' is the mean
top-1 classifier probability of the samples.
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
from tcaq_jax.images import save_grid, to_uint8  # noqa: E402
from tcaq_jax.diffusion.host_sampler import make_sampler  # noqa: E402
from tcaq_jax.models import family  # noqa: E402
from tcaq_jax.quantized import load_quantized  # noqa: E402
from tcaq_jax.train import pipeline  # noqa: E402

flags.DEFINE_string('out', 'runs/demo_table', 'output folder (one calibration dir per row + table.md/json/png)')
flags.DEFINE_float('iters_scale', 0.005, 'multiplies 20k / 10k / 5k reconstruction iterations')
flags.DEFINE_integer('num_samples', 500, 'generated images per row for the FID')
flags.DEFINE_integer('sample_seed', 123, 'seed of the FID samples (the same for every row)')
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
GRID_SAMPLES = 16
# tcaq as the paper states it, where this project's defaults differ (issue 14): the likelihood-ratio DAQ rule, and
# every reconstruction kept (no held-out check).
PAPER_EXACT = {'daq_rule': 'llr', 'keep_best': False}
METHODS = ('minmax', 'qdiff', 'qdiff_plus', 'tcaq_paper', 'tcaq')
ABLATIONS = (('no_tcr', {'tcr': False}), ('no_daq', {'daq': False}), ('no_par', {'par': False}),
             ('no_per_step', {'act_per_step': False}), ('no_tcr_no_per_step', {'tcr': False, 'act_per_step': False}))
# Diagnostic rows (--diagnostics): why is tcaq without TCR worse than plain minmax at W4A4, and tcaq worse than
# qdiff at W6A6?
# 'sample_seed' changes the evaluation seeds (fp_seed2: the FID difference from 'fp' is pure sampling noise).
DIAG_ROWS = [
    ('fp_seed2', None, 32, 32, {'sample_seed': 456}),
    ('fp_seed3', None, 32, 32, {'sample_seed': 789}),
    ('tcaq_w4a4_tcr_conv_only', 'tcaq', 4, 4, {'tcr_dense': False}),
    ('tcaq_w6a6_tcr_conv_only', 'tcaq', 6, 6, {'tcr_dense': False}),
    ('tcaq_w6a6_rtru3', 'tcaq', 6, 6, {'r_tru': 3.0}),
    ('tcaq_w4a4_no_tcr_pct100', 'tcaq', 4, 4, {'tcr': False, 'act_pcts': (100.0,)}),
    ('tcaq_w4a4_iters10x', 'tcaq', 4, 4, {'iters_scale': 0.05}),
    ('tcaq_w6a6_pct100', 'tcaq', 6, 6, {'act_pcts': (100.0,)}),
    ('tcaq_w4a4_pct100', 'tcaq', 4, 4, {'act_pcts': (100.0,)}),
    ('tcaq_w4a4_no_tcr_no_par', 'tcaq', 4, 4, {'tcr': False, 'par': False}),
    ('tcaq_w4a4_no_tcr_keep_act', 'tcaq', 4, 4, {'tcr': False, 'par_research_act': False}),
    ('tcaq_w6a6_iters10x', 'tcaq', 6, 6, {'iters_scale': 0.05}),
]


def row_specs(diagnostics: bool = False):
  """(name, method, w, a, extra calibration options), in the order they run (cheap and key rows first).
  'tcaq_paper' rows run --method=tcaq with PAPER_EXACT."""
  rows = [('fp', None, 32, 32, {})]
  rows += [(f'minmax_w{w}a{a}', 'minmax', w, a, {}) for w, a in BITS]
  for w, a in [(4, 4), (6, 6), (4, 8), (8, 8)]:
    rows.append((f'tcaq_w{w}a{a}', 'tcaq', w, a, {}))
    rows.append((f'qdiff_w{w}a{a}', 'qdiff', w, a, {}))
    rows.append((f'qdiff_plus_w{w}a{a}', 'qdiff_plus', w, a, {}))
    rows.append((f'tcaq_paper_w{w}a{a}', 'tcaq', w, a, dict(PAPER_EXACT)))
    if (w, a) in ((4, 4), (6, 6)):
      rows += [(f'tcaq_w{w}a{a}_{tag}', 'tcaq', w, a, dict(opts)) for tag, opts in ABLATIONS]
  if diagnostics:
    rows += DIAG_ROWS
  return rows


def settings() -> dict:
  """What every row shares (a row in table.json counts as done only under the same settings)."""
  return {'num_samples': FLAGS.num_samples, 'num_steps': FLAGS.num_steps, 'calib_samples': FLAGS.calib_samples,
          'recon_samples': FLAGS.recon_samples, 'iters_scale': FLAGS.iters_scale, 'real_images': 1797,
          'features': 'demo digit classifier, 64-d'}


def sample(eps_fn, config, n, steps, seed=123, batch=250):
  coeffs = sampler_coefficients(config, steps, 'quad', 0.0)
  sampler = make_sampler(eps_fn, coeffs, (16, 16, 1))        # host loop on CPU (diffusion/host_sampler.py)
  return np.clip(sample_all(sampler, n, batch, seed), -1., 1.)


def load_table(path: str, current: dict) -> dict:
  """{row name: record} of a table.json written under the same settings (others are ignored: re-run)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    doc = json.load(f)
  if doc.get('settings') != current:
    logging.warning('%s was written with other settings %s: its rows are not reused', path, doc.get('settings'))
    return {}
  return {r['name']: r for r in doc['rows']}


def main(argv):
  del argv
  quiet_orbax_logs()
  os.makedirs(os.path.join(FLAGS.out, 'grids'), exist_ok=True)
  if FLAGS.compile_cache:
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(os.path.join(FLAGS.out, 'jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  clf, clf_params = load_classifier()
  real, _ = load_digits_16()
  mu_r, sig_r = feature_stats(classify(clf, clf_params, real)[0])
  current = settings()
  results = load_table(os.path.join(FLAGS.out, 'table.json'), current)
  specs = row_specs(FLAGS.diagnostics)
  unknown = set(FLAGS.rows) - {r[0] for r in specs}
  if unknown:
    raise app.UsageError(f'--rows: unknown row(s) {sorted(unknown)}')
  for name, method, w, a, extra in specs:
    if (FLAGS.rows and name not in FLAGS.rows) or name in results:
      continue
    t0 = time.time()
    extra = dict(extra)
    sample_seed = extra.pop('sample_seed', FLAGS.sample_seed)
    iters_scale = extra.get('iters_scale', FLAGS.iters_scale)
    if method is None:
      model, params, config = family.load(DEMO_UNET_DIR)
      eps = family.eps_fn(model, params, config)
      calib_s, n_units = 0.0, 0
    else:
      kw = dict(out_dir=os.path.join(FLAGS.out, name), method=method, w_bits=w, a_bits=a,
                num_steps=FLAGS.num_steps, calib_samples=FLAGS.calib_samples, recon_samples=FLAGS.recon_samples,
                iters_scale=FLAGS.iters_scale, chunk=100, png_samples=0, eval_units=False, progress=False)
      kw.update(extra)                                                  # a row may override any of these
      report = pipeline.run(kw)
      calib_s = time.time() - t0
      q = load_quantized(kw['out_dir'])
      eps, config, n_units = q.eps_fn, q.config, len(report['units'])
    images = sample(eps, config, FLAGS.num_samples, FLAGS.num_steps, seed=sample_seed)
    save_grid(os.path.join(FLAGS.out, 'grids', f'{name}.png'), to_uint8(images[:GRID_SAMPLES]), scale=4)
    feats, probs = classify(clf, clf_params, images)
    mu, sig = feature_stats(feats)
    fid = frechet_distance(mu_r, sig_r, mu, sig)
    label = 'tcaq_paper' if name.startswith('tcaq_paper') else (method or 'fp')
    results[name] = {'name': name, 'method': method or 'fp', 'label': label, 'options': extra,
                     'w_bits': None if method is None else w, 'a_bits': None if method is None else a,
                     'fid': float(fid), 'conf': float(probs.max(1).mean()), 'samples': FLAGS.num_samples,
                     'sample_seed': sample_seed, 'iters_scale': None if method is None else iters_scale,
                     'calib_s': calib_s, 'recon_units': n_units, 'total_s': time.time() - t0}
    logging.info('%s: FID %.3f (%.0f s)', name, fid, time.time() - t0)
    write_outputs(FLAGS.out, results, current)
  write_outputs(FLAGS.out, results, current)
  print(open(os.path.join(FLAGS.out, 'table.md')).read())


def write_outputs(out: str, results: dict, current: dict) -> None:
  """table.json, table.md, fid_chart.png and sample_grids.png from the rows so far (atomic json)."""
  tmp = os.path.join(out, 'table.json.tmp')
  with open(tmp, 'w') as f:
    json.dump({'settings': current, 'rows': list(results.values())}, f, indent=1)
  os.replace(tmp, os.path.join(out, 'table.json'))
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write('\n'.join(table_lines(results, current)) + '\n')
  plot_chart(results, os.path.join(out, 'fid_chart.png'))
  plot_grids(results, os.path.join(out, 'grids'), os.path.join(out, 'sample_grids.png'))


def table_lines(results: dict, st: dict) -> list:
  it = st['iters_scale']
  lines = [f"demo FID (digit-classifier features, {st['num_samples']} samples vs 1,797 real digits; DDIM "
           f"{st['num_steps']} quad steps; iters_scale {it}: {int(20000 * it)} iterations per block + "
           f"{int(10000 * it)} per PAR round (qdiff: + {int(5000 * it)} in its activation pass); calibration "
           f"{st['calib_samples']} samples x 20 steps (qdiff: x {len(range(0, st['num_steps'], max(st['num_steps'] // 20, 1)))}, "
           "its interval rule))", '',
           '| row | method | W/A | FID | conf | calib s |', '|---|---|---|---|---|---|']
  for name, r in results.items():
    wa = 'FP' if r['method'] == 'fp' else f"W{r['w_bits']}A{r['a_bits']}"
    opts = ' ' + json.dumps(r['options']) if r['options'] else ''
    lines.append(f"| {name} | {r['method']}{opts} | {wa} | {r['fid']:.3f} | {r['conf']:.3f} | {r['calib_s']:.0f} |")
  return lines + ['', *pivot_lines(results)]


def _cell(results: dict, name: str) -> str:
  return '-' if name not in results else f"{results[name]['fid']:.2f}"


def pivot_lines(results: dict) -> list:
  """The main rows as one FID grid: methods down, bit widths across (FP repeated in its own row), then the
  ablations at W6A6 and W4A4."""
  head = ' | '.join(f'W{w}A{a}' for w, a in BITS)
  lines = [f'| FID | {head} |', '|---' * (len(BITS) + 1) + '|']
  if 'fp' in results:
    lines.append('| fp | ' + ' | '.join(f"{results['fp']['fid']:.2f}" for _ in BITS) + ' |')
  for method in METHODS:
    lines.append(f'| {method} | ' + ' | '.join(_cell(results, f'{method}_w{w}a{a}') for w, a in BITS) + ' |')
  lines += ['', '| tcaq ablation | W6A6 | W4A4 |', '|---|---|---|']
  for tag, _ in (('default', {}),) + ABLATIONS:
    suffix = '' if tag == 'default' else f'_{tag}'
    lines.append(f'| {tag} | ' + ' | '.join(_cell(results, f'tcaq_w{w}a{a}{suffix}') for w, a in ((6, 6), (4, 4)))
                 + ' |')
  return lines


def plot_chart(results: dict, path: str) -> None:
  """Grouped bars: FID per bit width (x) and method (bars); FP as a dashed line."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 4))
  width = 0.8 / len(METHODS)
  for i, method in enumerate(METHODS):
    vals = [results.get(f'{method}_w{w}a{a}', {}).get('fid', np.nan) for w, a in BITS]
    ax.bar(np.arange(len(BITS)) + (i - (len(METHODS) - 1) / 2) * width, vals, width, label=method)
  if 'fp' in results:
    ax.axhline(results['fp']['fid'], color='k', ls='--', lw=1, label='FP')
  ax.set_xticks(np.arange(len(BITS)), [f'W{w}A{a}' for w, a in BITS])
  ax.set_yscale('log')                       # W4A4 rows can be 10x the others
  ax.set_xlim(-0.5, len(BITS) - 0.5)
  ax.set_ylabel('FID (demo features, log scale)')
  ax.legend(fontsize=8, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_grids(results: dict, grid_dir: str, path: str, cols: int = 6) -> None:
  """Every row's sample grid (grids/<name>.png) in one image, titled with the row name and FID."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from PIL import Image
  names = [n for n in results if os.path.exists(os.path.join(grid_dir, f'{n}.png'))]
  if not names:
    return
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.7 * rows), squeeze=False)
  for ax in axes.reshape(-1):
    ax.axis('off')
  for ax, name in zip(axes.reshape(-1), names):
    ax.imshow(np.asarray(Image.open(os.path.join(grid_dir, f'{name}.png'))), cmap='gray')
    ax.set_title(f"{name}\nFID {results[name]['fid']:.2f}", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


if __name__ == '__main__':
  app.run(main)
