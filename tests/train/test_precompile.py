"""Compiling a round's unit programs ahead on a background thread (`train.precompile`, --precompile): the jobs
run in order, once per key, a failing job only logs; a calibration with it gives the same quantizer state as one
without, its unit programs are compiled on the precompile thread, and no program is compiled twice (the unit
programs' compile count equals the plain run's)."""
import collections
import threading
import time

import jax
import pytest
import numpy as np

from tcaq_jax.quantized import load_quantized
from tcaq_jax.train.calibrate import summary_lines
from tcaq_jax.train.pipeline import run
from tcaq_jax.train.precompile import Precompiler

from calib_settings import BASE  # noqa: E402  (tests/train/calib_settings.py)


def test_jobs_run_in_order_once_per_key_and_a_failure_only_logs():
  pre, seen, gate = Precompiler(workers=1), [], threading.Event()

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
  assert pre.stats()['jobs'] == 3 and pre.stats()['failed'] == 1
  pre.submit([('d', job('d'))])                # the thread had finished: a new one starts
  pre.wait('d')
  assert [s[0] for s in seen] == ['a', 'b', 'c', 'd']
  before = pre.stats()
  pre.submit([('slow', lambda: time.sleep(0.3))])
  pre.wait('slow')
  st = pre.stats()
  assert st['jobs'] == 5 and st['waited_s'] - before['waited_s'] >= 0.2 and st['seconds'] - before['seconds'] >= 0.3
  calls = []
  pre.run_once('k', lambda: calls.append(1))
  pre.run_once('k', lambda: calls.append(2))
  assert calls == [1]
  off = Precompiler(enabled=False)
  off.submit([('x', job('x'))])
  off.wait('x')
  assert len(seen) == 4


def test_two_workers_run_jobs_at_once_and_a_shared_program_is_built_once():
  """Two workers: job b runs while job a is still running (a waits for b's event; one worker would block until
  the timeout); run_once runs a shared build once, and a second job asking for it returns only after it is done."""
  pre, b_ran, built, order = Precompiler(workers=2), threading.Event(), [], []

  def build():
    time.sleep(0.3)
    built.append(1)

  def a():
    assert b_ran.wait(10), 'the second worker never ran job b'
    pre.run_once('shared', build)
    order.append(('a', len(built)))

  def b():
    b_ran.set()
    pre.run_once('shared', build)
    order.append(('b', len(built)))

  pre.submit([('a', a), ('b', b)])
  pre.wait('a')
  pre.wait('b')
  assert built == [1] and sorted(order) == [('a', 1), ('b', 1)] and pre.stats()['failed'] == 0
  assert pre.stats()['workers'] == 2
  with pytest.raises(ValueError):
    Precompiler(workers=0)


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
  # TCR on every layer: its ratios are final before the weight init, so the activation search compiles ahead too
  # (with --tcr_select=error it waits for the choice)
  cfg = dict(BASE, eval_units=True, keep_best=True, holdout_samples=2, par_rounds=0, png_samples=0, tcr_select='all')
  _events.clear()
  report = run(dict(cfg, out_dir=str(tmp_path / 'pre'), precompile=True))
  on = list(_events)
  pre = report['precompile_this_process']
  assert pre['enabled'] and pre['jobs'] >= 3 and pre['failed'] == 0
  assert any(ln.startswith('compiled ahead on the precompile thread') for ln in summary_lines(report))
  _events.clear()
  run(dict(cfg, out_dir=str(tmp_path / 'plain'), precompile=False))
  off = list(_events)
  assert any(t == 'precompile' for t, _ in on) and not any(t == 'precompile' for t, _ in off)
  assert _programs(on) == _programs(off)
  a, b = _state(str(tmp_path / 'pre')), _state(str(tmp_path / 'plain'))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
