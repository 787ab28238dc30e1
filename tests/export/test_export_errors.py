"""Bad input to the export and to its loader gives one-line errors naming the problem, and a failed export leaves
nothing behind (tcaq_jax/export/)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from tcaq_jax.export import ExportError, export_quantized, load_exported
from tcaq_jax.export import format as fmt
from tcaq_jax.export.synthetic import save_as_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _leftovers(parent):
  return [f for f in os.listdir(parent) if f.startswith('.export-')]


def test_unfinished_run_is_refused_in_one_line_and_nothing_is_written(exported, tmp_path):
  q, _, _ = exported('tiny')
  run_dir = str(tmp_path / 'run')
  save_as_run(q, run_dir, done=False)
  proc = subprocess.run([sys.executable, '-m', 'tcaq_jax.export', '--compile_cache=', f'--run_dir={run_dir}',
                         f'--out={tmp_path / "out"}'], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'calibration not finished' in last and 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'out') and not _leftovers(tmp_path)


def test_policy_without_integer_weights_is_refused(exported, tmp_path):
  q, _, _ = exported('tiny')
  policy = dataclasses.replace(q.policy, layers={p: dataclasses.replace(s, w_bits=None)
                                                 for p, s in q.policy.layers.items()})
  with pytest.raises(ExportError, match='quantizes no weights'):
    export_quantized(dataclasses.replace(q, policy=policy), str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')


def test_failed_write_leaves_nothing_and_existing_out_is_kept(exported, tmp_path, monkeypatch):
  q, _, good = exported('tiny')
  out = str(tmp_path / 'out')
  with pytest.raises(ExportError, match='not empty'):
    export_quantized(q, os.path.dirname(good))
  import tcaq_jax.export.writer as writer

  def boom(directory, manifest, arrays):
    open(os.path.join(directory, fmt.ARRAYS), 'wb').write(b'partial')
    raise OSError('disk full')
  monkeypatch.setattr(writer, 'write_files', boom)
  with pytest.raises(OSError, match='disk full'):
    export_quantized(q, out)
  assert not os.path.exists(out) and not _leftovers(tmp_path)


@pytest.fixture
def copy(exported, tmp_path):
  src = exported('tiny')[2]
  dst = str(tmp_path / 'copy')
  shutil.copytree(src, dst)
  return dst


def test_truncated_or_corrupted_arrays_are_refused(copy):
  path = os.path.join(copy, fmt.ARRAYS)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])
  with pytest.raises(ExportError, match='truncated'):
    load_exported(copy)
  open(path, 'wb').write(data[:100] + bytes([data[100] ^ 1]) + data[101:])
  with pytest.raises(ExportError, match='corrupted'):
    load_exported(copy)


def test_other_version_truncated_or_missing_manifest_is_refused(copy):
  path = os.path.join(copy, fmt.MANIFEST)
  manifest = json.load(open(path))
  json.dump(dict(manifest, version=fmt.VERSION + 1), open(path, 'w'))
  with pytest.raises(ExportError, match=f'format version {fmt.VERSION + 1}.*reads versions 1, 2, {fmt.VERSION}'):
    load_exported(copy)
  text = json.dumps(manifest)
  open(path, 'w').write(text[:len(text) // 2])
  with pytest.raises(ExportError, match='truncated manifest'):
    load_exported(copy)
  os.remove(path)
  with pytest.raises(ExportError, match='not an exported model dir'):
    load_exported(copy)
