"""Compiling a round's unit programs ahead on a background thread (`train.precompile`, --precompile): the jobs
run in order, once per key, a failing job only logs; a calibration with it gives the same quantizer state as one
without, its unit programs are compiled on the precompile thread, and no program is compiled twice (the unit
programs' compile count equals the plain run's)."""
import collections
import threading

import jax
import numpy as np

from tcaq_jax.quantized import load_quantized
from tcaq_jax.train.pipeline import run
from tcaq_jax.train.precompile import Precompiler

from calib_settings import BASE  # noqa: E402  (tests/train/calib_settings.py)


def test_jobs_run_in_order_once_per_key_and_a_failure_only_logs():
  pre, seen, gate = Precompiler(), [], threading.Event()

  def job(name, fail=False):
    def f():
      gate.wait(5)
      seen.append((name, threading.current_thread().name))
      if fail:
        raise RuntimeError('boom')
    return f

  pre.submit([('a', job('a')), ('b', job('b', fail=True)), ('a', job('a-again'))])
  pre.submit([('c', job('c'))])
  assert seen == []                            # queued behind the gate: nothing ran on this thread
  gate.set()
  pre.wait('c')
  assert seen == [('a', 'precompile'), ('b', 'precompile'), ('c', 'precompile')] and pre.failed == 1
  pre.submit([('d', job('d'))])                # the thread had finished: a new one starts
  pre.wait('d')
  assert [s[0] for s in seen] == ['a', 'b', 'c', 'd']
  assert pre.once('k') and not pre.once('k')
  off = Precompiler(enabled=False)
  off.submit([('x', job('x'))])
  off.wait('x')
  assert len(seen) == 4


_events = []


def _listen(event, duration, **kw):
  if event == '/jax/core/compile/backend_compile_duration':
    _events.append((threading.current_thread().name, kw.get('fun_name', '')))


def _programs(events):
  """Compiles of the pipeline's own jitted programs (unit step / evaluator `<lambda>`, recorders `run`)."""
  return collections.Counter(name for _, name in events if name in ('<lambda>', 'run', 'chunk_fn'))


def _state(out):
  qs = load_quantized(out).qstate
  return {f'{p}:{n}': np.asarray(v) for p, st in qs.layers.items() for n, v in st.set_fields().items()}


def test_precompiled_calibration_equals_the_plain_one_and_compiles_nothing_twice(tmp_path):
  jax.monitoring.register_event_duration_secs_listener(_listen)
  cfg = dict(BASE, eval_units=True, keep_best=True, holdout_samples=2, par_rounds=0, png_samples=0)
  _events.clear()
  run(dict(cfg, out_dir=str(tmp_path / 'pre'), precompile=True))
  on = list(_events)
  _events.clear()
  run(dict(cfg, out_dir=str(tmp_path / 'plain'), precompile=False))
  off = list(_events)
  assert any(t == 'precompile' for t, _ in on) and not any(t == 'precompile' for t, _ in off)
  assert _programs(on) == _programs(off)
  a, b = _state(str(tmp_path / 'pre')), _state(str(tmp_path / 'plain'))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
