"""Full-budget calibration time, projected from a measured run at a fraction of the paper's iterations.

  PYTHONPATH=. python bench/calib_projection.py --out_dir /tmp/proj -- \
      --flagfile=configs/cifar10_w4a8.flags --model_dir= --model_config=ddim_cifar10 --iters_scale=0.05
  PYTHONPATH=. python bench/calib_projection.py --report /tmp/proj/report.json      # only re-project a run

Runs `python -m tcaq_jax.train.calibrate` with the arguments after `--` (plus --out_dir), then reads its
report.json. Everything but the AdaRound iterations (captures, statistics, weight init, activation search, unit
input capture and evaluation, compiles, checkpoints, the grid) does not depend on the iteration budget and is
kept as measured; each unit's iterations are re-timed at its signature's steady rate (units that compiled a new
chunk are timed with the median rate of already-compiled units of the same block class, so their compile
counts once, as at full budget) and scaled by 1 / iters_scale. Prints one table; --write adds a
`calib_projected_full_min` record to docs/results/perf.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string('out_dir', '/tmp/calib_projection', 'the calibration run dir (reused: the run resumes)')
flags.DEFINE_string('report', None, 'only project this existing report.json')
flags.DEFINE_string('partial', None, 'a run dir that did not finish: project from its latest checkpoint')
flags.DEFINE_integer('extrapolate_par_rounds', 0, 'for a run made with --par_rounds=0: add this many PAR rounds, '
                     'each costed as round 0 (sampling capture, activation search, every unit\'s capture, '
                     'evaluation and checkpoint as measured, compiles included: an upper bound) plus the '
                     'iterations of --par_iters at the steady rates')
flags.DEFINE_float('par_iters_ratio', 0.5, 'PAR iterations / first-round iterations (paper: 10k / 20k)')
flags.DEFINE_string('key', 'cifar10 w4a8 tcaq', 'record key')
flags.DEFINE_bool('write', False, 'merge the projection into docs/results/perf.json')
FLAGS = flags.FLAGS


def project(report: dict) -> dict:
  scale = float(report['iters_scale'])
  units = [u for u in report['units'] if u.get('iters', 0) > 0]
  steady = {}
  for u in units:
    if not u.get('new_signature') and u.get('it_per_s'):
      steady.setdefault(u['cls'], []).append(u['it_per_s'])
  all_rates = [r for v in steady.values() for r in v] or [u['it_per_s'] for u in units]
  med_all = float(np.median(all_rates))
  iter_s_measured, iter_s_full = 0.0, 0.0
  for u in units:
    rate = float(np.median(steady[u['cls']])) if u['cls'] in steady else med_all
    pure = u['iters'] / rate
    iter_s_measured += pure
    iter_s_full += pure / scale
  phases = report.get('phases_this_process', {})
  wall = float(phases.get('total_s') or report.get('wall_s_this_process'))
  fixed = wall - iter_s_measured
  extra = 0.0
  if FLAGS.extrapolate_par_rounds:
    per_round = (float(report.get('timings', {}).get('capture_round0_s', 0.0))
                 + float(report.get('init_timings', {}).get('act_search_s', 0.0))
                 + sum(u.get('seconds_total', 0.0) - u.get('seconds', 0.0) for u in units)
                 + float(phases.get('checkpoint_s', 0.0)))
    extra = FLAGS.extrapolate_par_rounds * (per_round + FLAGS.par_iters_ratio * iter_s_full)
  return {'extrapolated_par_rounds': FLAGS.extrapolate_par_rounds, 'par_rounds_s': extra,'iters_scale': scale, 'units_reconstructed': len(units), 'wall_measured_s': wall,
          'iterations_measured_s': iter_s_measured, 'fixed_s': fixed, 'iterations_full_s': iter_s_full,
          'projected_full_min': (fixed + iter_s_full + extra) / 60.0, 'median_it_per_s': med_all,
          'total_iters_measured': int(sum(u['iters'] for u in units)),
          'phases': phases, 'compile': report.get('compile_this_process', {})}


def partial(run_dir: str) -> None:
  """Per-unit costs of an unfinished run (its latest checkpoint's report): the units done so far, their
  capture / evaluation / reconstruction seconds, and the full-budget projection extrapolated over all units and
  rounds from them (labelled as an extrapolation)."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from tcaq_jax import checkpoint
  meta = checkpoint.restore(run_dir)['meta']
  report, cfg = meta['report'], meta['config']
  units = report['units']
  n_units = report['num_units']
  rounds = 1 + int(cfg.get('par_rounds', 0) if cfg.get('par', True) is not False else 0)
  p = project({**report, 'phases_this_process': {'total_s': sum(u.get('seconds_total', 0) for u in units)}})
  per_unit_fixed = p['fixed_s'] / max(len(units), 1)
  init = sum(float(v) for v in report.get('init_timings', {}).values())
  est = init + per_unit_fixed * n_units * rounds + p['iterations_full_s'] / max(len(units), 1) * n_units * rounds
  print(f'units done {len(units)} of {n_units} x {rounds} rounds; init {init:.1f} s; per unit (without '
        f'iterations) {per_unit_fixed:.1f} s; measured iterations {p["iterations_measured_s"]:.1f} s at '
        f'{p["median_it_per_s"]:.0f} it/s')
  print(f'EXTRAPOLATED full budget (not measured end to end): {est / 60:.1f} min')
  print('units:', json.dumps([{k: u.get(k) for k in ('unit', 'round', 'capture_s', 'eval_s', 'seconds',
                                                       'it_per_s', 'new_signature')} for u in units]))


def main(argv):
  extra = argv[1:]
  if FLAGS.partial:
    return partial(FLAGS.partial)
  if FLAGS.report:
    path = FLAGS.report
  else:
    cmd = [sys.executable, '-m', 'tcaq_jax.train.calibrate', *extra, f'--out_dir={FLAGS.out_dir}']
    print('#', ' '.join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f'# calibrate finished in {time.time() - t0:.1f} s', flush=True)
    path = os.path.join(FLAGS.out_dir, 'report.json')
  with open(path) as f:
    report = json.load(f)
  p = project(report)
  print('| iters_scale | units | measured wall s | of it iterations s | fixed s | full-budget iterations s '
        '| projected full min | median it/s |')
  print('|---|---|---|---|---|---|---|---|')
  print(f"| {p['iters_scale']} | {p['units_reconstructed']} | {p['wall_measured_s']:.1f} | "
        f"{p['iterations_measured_s']:.1f} | {p['fixed_s']:.1f} | {p['iterations_full_s']:.1f} | "
        f"{p['projected_full_min']:.1f} | {p['median_it_per_s']:.0f} |")
  print('phases:', json.dumps(p['phases']))
  print('compile:', json.dumps(p['compile']))
  if FLAGS.write:
    from records import merge, record
    rec = record('calib_projection', 'calib_projected_full_min', p['projected_full_min'], 'min', key=FLAGS.key,
                 **{k: v for k, v in p.items() if k != 'projected_full_min'})
    print('records ->', merge([rec]))


if __name__ == '__main__':
  app.run(main)
