"""Machine-readable bench results: one record per measured number, merged into a JSON list (default
docs/results/perf.json), keyed by (bench, metric, device_kind, and an optional 'key' such as the unit).

  from records import record, merge
  recs = [record('recon', 'recon_it_s', 2173.0, 'it/s', key='down_1/block_0', batch=32)]
  merge(recs, 'docs/results/perf.json')
Each record: {bench, metric, value, unit, device_kind, jax_version, commit, date, command, ...extra}.
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys

import jax

from tcaq_jax import atomic_io

__all__ = ['record', 'merge', 'DEFAULT_PATH']

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'results',
                            'perf.json')


def _commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def record(bench: str, metric: str, value: float, unit: str, **extra) -> dict:
  dev = jax.devices()[0]
  return {'bench': bench, 'metric': metric, 'value': float(value), 'unit': unit,
          'device_kind': f'{dev.platform}:{dev.device_kind}', 'jax_version': jax.__version__, 'commit': _commit(),
          'date': datetime.date.today().isoformat(),
          'command': 'PYTHONPATH=. python ' + ' '.join(shlex.quote(a) for a in sys.argv), **extra}


def _key(r: dict) -> tuple:
  return (r['bench'], r['metric'], r['device_kind'], str(r.get('key', '')))


def merge(records: list, path: str = DEFAULT_PATH) -> str:
  """Replaces earlier records with the same key, keeps the others; writes atomically. Returns the path."""
  old = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  new_keys = {_key(r) for r in records}
  merged = [r for r in old if _key(r) not in new_keys] + list(records)
  atomic_io.write_json(path, merged, indent=1)
  return path
