"""Copies a demo table row's record (table.json), samples and grid under a new row name, for a row whose
calibration config equals one already measured (e.g. a new ablation row that holds a new option at the value the
old default had). bench/demo_table.py reuses the copy only if the new row's resolved config equals the stored one
(`demo_table.reusable`); otherwise it runs the row. Run it while no table row is running (each row rewrites
table.json from the records it read at its start).

  python bench/copy_row.py --out runs/demo_table_2k --pairs tcaq_w6a6:tcaq_w6a6_no_eps_scale,...
"""
from __future__ import annotations

import json
import os
import shutil

from absl import app, flags

from tcaq_jax import atomic_io

flags.DEFINE_string('out', None, 'the demo table folder (table.json, samples/, grids/)', required=True)
flags.DEFINE_list('pairs', [], 'source:new row name pairs')
flags.DEFINE_string('options', '{}', 'JSON: the new rows\' "options" field (the extra options of the new row)')
FLAGS = flags.FLAGS


def samples_path(out: str, name: str) -> str:
  """demo_table.samples_path (importing demo_table would define its flags twice)."""
  return os.path.join(out, 'samples', f'{name}.npy')


def main(argv):
  del argv
  path = os.path.join(FLAGS.out, 'table.json')
  table = json.load(open(path))
  rows = table['rows']                                   # a list of records (demo_table.write_outputs)
  by_name = {r['name']: r for r in rows}
  for pair in FLAGS.pairs:
    src, dst = pair.split(':')
    if src not in by_name:
      raise SystemExit(f'{path}: no row {src!r}')
    rec = dict(by_name[src], name=dst, options=json.loads(FLAGS.options), copied_from=src)
    rows[:] = [r for r in rows if r['name'] != dst] + [rec]
    if os.path.exists(samples_path(FLAGS.out, src)):
      shutil.copyfile(samples_path(FLAGS.out, src), samples_path(FLAGS.out, dst))
    grid = os.path.join(FLAGS.out, 'grids', f'{src}.png')
    if os.path.exists(grid):
      shutil.copyfile(grid, os.path.join(FLAGS.out, 'grids', f'{dst}.png'))
    print(f'{src} -> {dst}')
  atomic_io.write_json(path, table, indent=1)


if __name__ == '__main__':
  app.run(main)
