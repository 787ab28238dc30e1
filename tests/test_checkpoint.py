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
