"""tcaq_jax.checkpoint: round trip, SIGKILL mid-write, errors that name the directory."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tcaq_jax import checkpoint

_TREE_CODE = '''
import numpy as np
def tree(step):
  """~6 MB of float32 / int8 / bfloat16-free arrays whose values depend on the step."""
  rng = np.random.default_rng(step)
  return {'down': {'conv': {'kernel': rng.standard_normal((3, 3, 128, 256), dtype=np.float32)},
                   'bias': rng.standard_normal((256,), dtype=np.float32)},
          'dense': {'kernel': rng.standard_normal((512, 1024), dtype=np.float32)},
          'codes': rng.integers(-128, 127, size=(1000,), dtype=np.int8), 'step': np.int32(step)}
'''
exec(_TREE_CODE)

_WRITER = textwrap.dedent('''
  import sys
  from tcaq_jax import checkpoint
  ''') + _TREE_CODE + textwrap.dedent('''
  for step in range(10_000):
    print('begin', step, flush=True)
    checkpoint.save(sys.argv[1], step, tree(step), meta={'step': step}, keep=2)
    print('done', step, flush=True)
  ''')


def _assert_bit_identical(a, b):
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def test_round_trip_with_qstate_and_meta(tmp_path):
  params, qstate = tree(1), {'act_scale': np.linspace(0.1, 1.0, 20, dtype=np.float32).reshape(20, 1)}
  checkpoint.save(str(tmp_path), 7, params, qstate=qstate, meta={'block': 3, 'name': 'x'})
  out = checkpoint.restore(str(tmp_path))
  assert out['step'] == 7 and out['meta'] == {'block': 3, 'name': 'x'}
  _assert_bit_identical(out['params'], params)
  _assert_bit_identical(out['qstate'], qstate)
  assert checkpoint.latest_step(str(tmp_path)) == 7


def test_missing_directory_error_names_it(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='nope'):
    checkpoint.restore(str(tmp_path / 'nope'))
  with pytest.raises(checkpoint.CheckpointError, match='is not a model directory'):
    checkpoint.load_model_dir(str(tmp_path))


def test_sigkill_mid_write_restores_last_complete_step(tmp_path):
  run_dir = str(tmp_path / 'run')
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-c', _WRITER, run_dir], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, env=env)
  done = -1
  try:
    deadline = time.time() + 240
    while time.time() < deadline:
      line = proc.stdout.readline().split()
      if not line:
        break
      if line[0] == 'done':
        done = int(line[1])
      elif line[0] == 'begin' and int(line[1]) == 3:
        time.sleep(0.05)                          # step 3 is being written
        os.kill(proc.pid, signal.SIGKILL)
        break
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the writer was not killed mid-run'
  assert done == 2, f'writer finished steps 0..{done} before the kill'
  out = checkpoint.restore(run_dir)
  assert out['step'] in (2, 3)                     # 3 only if its write finished before the signal landed
  assert out['meta'] == {'step': out['step']}
  _assert_bit_identical(out['params'], tree(out['step']))
  # keep=2, but a kill after step 3 commits and before orbax deletes step 1 leaves three complete steps
  assert checkpoint.all_steps(run_dir)[-1] == out['step'] and len(checkpoint.all_steps(run_dir)) <= 3
  # and a resumed writer can continue from there
  checkpoint.save(run_dir, out['step'] + 1, tree(9), meta={'step': 9}, keep=2)
  _assert_bit_identical(checkpoint.restore(run_dir)['params'], tree(9))


def test_save_model_dir_refuses_to_overwrite_unless_asked(tmp_path):
  d = str(tmp_path / 'model')
  checkpoint.save_model_dir(d, {'w': np.ones(3, np.float32)}, {'name': 'a'})
  with pytest.raises(checkpoint.CheckpointError, match='already holds a saved model'):
    checkpoint.save_model_dir(d, {'w': np.zeros(3, np.float32)}, {'name': 'b'})
  params, config = checkpoint.load_model_dir(d)
  np.testing.assert_array_equal(params['w'], np.ones(3, np.float32))
  checkpoint.save_model_dir(d, {'w': np.zeros(3, np.float32)}, {'name': 'b'}, overwrite=True)
  params, config = checkpoint.load_model_dir(d)
  np.testing.assert_array_equal(params['w'], np.zeros(3, np.float32))
  assert config == {'name': 'b'}


def test_quiet_orbax_logs_drops_only_orbax_info():
  import logging
  absl_logger = logging.getLogger('absl')
  orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'checkpoint_manager.py')

  def rec(level, path):
    return logging.LogRecord('absl', level, path, 1, 'msg', None, None)
  checkpoint.quiet_orbax_logs()
  try:
    assert not absl_logger.filter(rec(logging.INFO, orbax_file))
    assert absl_logger.filter(rec(logging.WARNING, orbax_file))
    assert absl_logger.filter(rec(logging.INFO, os.path.join(os.sep, 'repo', 'tcaq_jax', 'train', 'calibrate.py')))
  finally:
    checkpoint.quiet_orbax_logs(False)
  assert absl_logger.filter(rec(logging.INFO, orbax_file))


# ------------------------------------------------------------------ integrity (issue 13: manifest, fallback)

def _small(step):
  rng = np.random.default_rng(step)
  return {'img': rng.standard_normal((32, 32), dtype=np.float32), 'bias': np.full(4, step, np.float32)}


def _array_file(run_dir, step):
  """The largest data file of a step's params item (the one holding the array values)."""
  d = os.path.join(run_dir, str(step), 'params', 'ocdbt.process_0', 'd')
  path = max((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getsize)
  return path, os.path.relpath(path, os.path.join(run_dir, str(step))).replace(os.sep, '/')


def _flip(path, n=16):
  data = bytearray(open(path, 'rb').read())
  mid = len(data) // 2
  for i in range(mid, min(mid + n, len(data))):
    data[i] ^= 0xFF
  with open(path, 'wb') as f:
    f.write(bytes(data))


def test_manifest_lists_every_file_with_its_sha256(tmp_path):
  import hashlib
  import json
  run = str(tmp_path)
  checkpoint.save(run, 1, _small(1), qstate={'s': np.ones(3, np.float32)}, meta={'a': 1})
  step_dir = os.path.join(run, '1')
  with open(os.path.join(step_dir, checkpoint.MANIFEST)) as f:
    doc = json.load(f)
  assert doc['format'] == 'tcaq_jax.checkpoint.manifest' and doc['version'] == 1 and doc['algorithm'] == 'sha256'
  on_disk = sorted(os.path.relpath(os.path.join(r, n), step_dir).replace(os.sep, '/')
                   for r, _, names in os.walk(step_dir) for n in names if n != checkpoint.MANIFEST)
  assert sorted(doc['files']) == on_disk
  assert any(k.startswith('params/') for k in on_disk) and any(k.startswith('qstate/') for k in on_disk)
  for rel, rec in doc['files'].items():
    data = open(os.path.join(step_dir, *rel.split('/')), 'rb').read()
    assert rec == {'size': len(data), 'sha256': hashlib.sha256(data).hexdigest()}


def test_flipped_bytes_in_the_only_step_raise_naming_step_and_file(tmp_path):
  run = str(tmp_path / 'run')
  checkpoint.save(run, 5, _small(5))
  path, rel = _array_file(run, 5)
  _flip(path)
  for kwargs in ({}, {'step': 5}):
    with pytest.raises(checkpoint.CheckpointError) as e:
      checkpoint.restore(run, **kwargs)
    msg = str(e.value)
    assert run in msg and 'step 5' in msg and rel in msg and 'SHA-256' in msg and '\n' not in msg


def test_corrupt_latest_step_falls_back_with_a_warning(tmp_path, caplog):
  run = str(tmp_path / 'run')
  checkpoint.save(run, 1, _small(1), meta={'step': 1})
  checkpoint.save(run, 2, _small(2), meta={'step': 2})
  path, rel = _array_file(run, 2)
  _flip(path)
  with caplog.at_level('WARNING'):
    out = checkpoint.restore(run)
  assert out['step'] == 1 and out['meta'] == {'step': 1}
  _assert_bit_identical(out['params'], _small(1))
  warned = [r.getMessage() for r in caplog.records
            if r.levelname == 'WARNING' and 'instead of the latest' in r.getMessage()]
  assert len(warned) == 1 and 'step 2' in warned[0] and rel in warned[0], caplog.text
  with pytest.raises(checkpoint.CheckpointError, match=f'step 2: file {rel}'):
    checkpoint.restore(run, step=2)                      # an explicit step never falls back
  # the resumed writer's next save of step 2 replaces the corrupt one
  checkpoint.save(run, 2, _small(7), meta={'step': 2})
  out = checkpoint.restore(run)
  assert out['step'] == 2
  _assert_bit_identical(out['params'], _small(7))


def test_unreadable_latest_old_format_step_falls_back(tmp_path, caplog):
  run = str(tmp_path / 'run')
  checkpoint.save(run, 1, _small(1))
  checkpoint.save(run, 2, _small(2))
  os.remove(os.path.join(run, '2', checkpoint.MANIFEST))   # written before manifests existed
  _flip(os.path.join(run, '2', 'params', '_METADATA'))
  with caplog.at_level('WARNING'):
    out = checkpoint.restore(run)
  assert out['step'] == 1
  assert any('step 2: could not read it' in r.getMessage() for r in caplog.records), caplog.text


def test_no_step_restores_lists_every_step_tried(tmp_path):
  run = str(tmp_path / 'run')
  for s in (1, 2):
    checkpoint.save(run, s, _small(s))
    _flip(_array_file(run, s)[0])
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.restore(run)
  msg = str(e.value)
  assert 'no step' in msg and run in msg and 'step 2: file params/' in msg and 'step 1: file params/' in msg
  assert '\n' not in msg


def test_old_format_step_without_manifest_restores(tmp_path):
  run = str(tmp_path / 'run')
  params, qstate = _small(3), {'s': np.arange(6, dtype=np.float32)}
  checkpoint.save(run, 3, params, qstate=qstate, meta={'old': True})
  os.remove(os.path.join(run, '3', checkpoint.MANIFEST))
  out = checkpoint.restore(run)
  assert out['step'] == 3 and out['meta'] == {'old': True}
  _assert_bit_identical(out['params'], params)
  _assert_bit_identical(out['qstate'], qstate)


def test_params_target_mismatch_names_the_first_bad_key_and_both_shapes(tmp_path):
  run = str(tmp_path / 'run')
  params = {'a': {'kernel': np.ones((3, 4), np.float32)}, 'b': np.zeros(5, np.float32)}
  checkpoint.save(run, 1, params)
  good = checkpoint.restore(run, params_target=params)
  _assert_bit_identical(good['params'], params)
  wrong_shape = {'a': {'kernel': np.ones((4, 3), np.float32)}, 'b': np.zeros(5, np.float32)}
  with pytest.raises(checkpoint.CheckpointError, match=r"step 1: params key 'a/kernel' has shape \(3, 4\) in the "
                                                       r'checkpoint but \(4, 3\) in the target'):
    checkpoint.restore(run, params_target=wrong_shape)
  with pytest.raises(checkpoint.CheckpointError, match="params has no key 'c' that the target has"):
    checkpoint.restore(run, params_target={**params, 'c': np.ones(1, np.float32)})
  with pytest.raises(checkpoint.CheckpointError, match="params has key 'b' that the target lacks"):
    checkpoint.restore(run, params_target={'a': params['a']})
  import jax
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), wrong_shape)
  with pytest.raises(checkpoint.CheckpointError, match="'a/kernel'"):
    checkpoint.restore(run, step=1, params_target=abstract)


def test_target_mismatch_does_not_fall_back(tmp_path):
  run = str(tmp_path / 'run')
  checkpoint.save(run, 1, {'w': np.ones(3, np.float32)})
  checkpoint.save(run, 2, {'w': np.ones(4, np.float32)})
  with pytest.raises(checkpoint.CheckpointError, match=r"step 2: params key 'w' has shape \(4,\)"):
    checkpoint.restore(run, params_target={'w': np.ones(3, np.float32)})


def test_tuple_and_dataclass_targets_keep_their_structure(tmp_path):
  import flax.struct
  import jax

  @flax.struct.dataclass
  class S:
    a: np.ndarray
    b: dict
  run = str(tmp_path / 'run')
  params = ({'w': np.ones(2, np.float32)}, {'w': np.zeros(2, np.float32)}, np.float32(3))
  qstate = S(np.arange(3, dtype=np.float32), {'x': np.ones((2, 2), np.float32)})
  checkpoint.save(run, 1, params, qstate=qstate)
  out = checkpoint.restore(run, params_target=params, qstate_target=qstate)
  assert jax.tree.structure(out['params']) == jax.tree.structure(params)
  assert isinstance(out['qstate'], S)
  _assert_bit_identical(out['qstate'], qstate)


def test_save_model_dir_message_names_no_flag(tmp_path):
  d = str(tmp_path / 'model')
  checkpoint.save_model_dir(d, {'w': np.ones(3, np.float32)}, {'name': 'a'})
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.save_model_dir(d, {'w': np.zeros(3, np.float32)}, {'name': 'b'})
  assert str(e.value) == (f'{d!r} already holds a saved model (step 0); choose another output directory or '
                          'allow overwriting')
