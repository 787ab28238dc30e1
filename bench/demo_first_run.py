"""The first run a newcomer makes: `python -m tcaq_jax.train.calibrate` with default flags (the shipped demo),
from a cold start (empty compilation cache and FP quality cache, new out_dir), timed end to end in a subprocess;
then the same again with both caches warm. Prints one table and merges records into docs/results/perf.json.

  PYTHONPATH=. python bench/demo_first_run.py                  # ~2 x 5 min on 2 cores
  PYTHONPATH=. python bench/demo_first_run.py --extra=--method=qdiff
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

from records import merge, record  # noqa: E402

flags.DEFINE_list('extra', [], 'extra calibrate flags')
flags.DEFINE_bool('warm', True, 'also time a second run with the compilation cache warm')
flags.DEFINE_bool('write', True, 'merge the records into docs/results/perf.json')
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out_dir: str, cache: str) -> tuple[float, dict, str]:
  cmd = [sys.executable, '-m', 'tcaq_jax.train.calibrate', f'--out_dir={out_dir}', f'--compile_cache={cache}',
         f'--demo_fp_cache={cache}_demo_fp', '--noprogress', *FLAGS.extra]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
  wall = time.time() - t0
  if proc.returncode != 0:
    raise SystemExit(proc.stderr[-3000:])
  with open(os.path.join(out_dir, 'report.json')) as f:
    report = json.load(f)
  summary = [ln for ln in proc.stderr.splitlines() if not ln.startswith(('I1', 'W1', 'I0', 'W0'))][-8:]
  return wall, report, '\n'.join(summary)


def main(argv):
  del argv
  tmp = tempfile.mkdtemp(prefix='demo_first_run_')
  cache = os.path.join(tmp, 'xla_cache')
  rows, recs = [], []
  for name in ('cold', 'warm') if FLAGS.warm else ('cold',):
    wall, report, summary = _run(os.path.join(tmp, f'run_{name}'), cache)
    print(summary)
    comp = report['compile_this_process']
    dq = report.get('demo_quality', {})
    rows.append((name, wall, comp['compiles'], comp['compile_s'], comp['cache_hits'],
                 dq.get('fp', {}).get('fid'), dq.get('quantized', {}).get('fid'),
                 dq.get('quantized', {}).get('confident_fraction')))
    recs.append(record('demo_first_run', f'demo_calibrate_{name}_wall_s', wall, 's', extra_flags=FLAGS.extra,
                       phases=report['phases_this_process'], compile=comp, demo_quality=dq))
  shutil.rmtree(tmp, ignore_errors=True)
  print('| start | wall s | XLA compiles | compile s | cache hits | FP digits-FID | quantized digits-FID | '
        'quantized confident |')
  print('|---|---|---|---|---|---|---|---|')
  for name, wall, nc, cs, hits, ffp, fq, conf in rows:
    fmt = lambda v, f: 'n/a' if v is None else format(v, f)
    print(f'| {name} | {wall:.0f} | {nc} | {cs:.0f} | {hits} | {fmt(ffp, ".2f")} | {fmt(fq, ".2f")} | '
          f'{fmt(conf, ".3f")} |')
  if FLAGS.write:
    print('records ->', merge(recs))


if __name__ == '__main__':
  app.run(main)
