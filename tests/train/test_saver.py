"""calib_state.Saver: a background write's error surfaces on the caller's thread, naming the run dir, and the
next save waits for the write in flight."""
import threading
import time
from types import SimpleNamespace

import pytest

from tcaq_jax.train import calib_state
from tcaq_jax.train.config import CalibrationError, Config


class _Setup:
  def __init__(self, out_dir):
    self.cfg = Config(out_dir=out_dir)


def test_background_write_error_is_raised_by_the_next_wait(monkeypatch, tmp_path):
  def failing_write(*job):
    raise OSError('No space left on device')

  monkeypatch.setattr(calib_state, '_prepare', lambda setup, state: (setup.cfg.out_dir, state.ckpt_step))
  monkeypatch.setattr(calib_state, '_write', failing_write)
  saver = calib_state.Saver(_Setup(str(tmp_path / 'run')))
  saver.save(SimpleNamespace(ckpt_step=1))    # returns at once; the write fails on the writer thread
  with pytest.raises(CalibrationError, match=r'saving a checkpoint of .*run failed: No space left'):
    saver.wait()
  saver.wait()                                     # the error is raised once


def test_writes_are_serialised_in_order(monkeypatch, tmp_path):
  done, active = [], []

  def slow_write(out_dir, step):
    active.append(step)
    assert len(active) == 1, 'two writes in flight'
    time.sleep(0.05)
    done.append(step)
    active.remove(step)

  monkeypatch.setattr(calib_state, '_prepare', lambda setup, state: (setup.cfg.out_dir, state.ckpt_step))
  monkeypatch.setattr(calib_state, '_write', slow_write)
  saver = calib_state.Saver(_Setup(str(tmp_path)))
  for step in range(4):
    saver.save(SimpleNamespace(ckpt_step=step))
  saver.wait()
  assert done == [0, 1, 2, 3]
  assert not any(t.name.startswith('save-step-') for t in threading.enumerate())
