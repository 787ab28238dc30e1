"""Compiling a round's unit programs ahead, on one background thread, while the main thread captures and trains.

A round's units run one after another, and on a cold start each new unit signature costs XLA compiles (its
capture group's recorder, the block-MSE evaluator, the reconstruction step) on one core while the other idles.
`Precompiler.submit(jobs)` runs `job()` for each job in order on a daemon thread; a job lowers and compiles
jitted functions for *abstract* arguments (`jax.ShapeDtypeStruct`), which fills the same in-memory cache the
later call with concrete arrays uses, so the main thread finds them compiled. The main thread calls
`wait(key)` before it first calls a function a job compiles: it never compiles the same program twice. A job
that fails only logs (the main thread then compiles as it would have anyway): precompiling never changes a result.

  pre = Precompiler()
  pre.submit([(key, lambda: fn.lower(*abstract_args).compile())])
  pre.wait(key)                        # blocks until that job is done (or failed)
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Callable, Hashable, Iterable

from absl import logging

__all__ = ['Precompiler']


class Precompiler:
  """Runs compile jobs in submission order on one daemon thread (keys already submitted are skipped)."""

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self._futures: dict[Hashable, concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self._queue: list[tuple[Hashable, Callable[[], object]]] = []
    self._thread: threading.Thread | None = None
    self.seconds = 0.0                  # wall seconds the jobs took (on the background thread)
    self.failed = 0
    self._done: set = set()

  def once(self, key: Hashable) -> bool:
    """True the first time `key` is asked for (jobs use it to compile a program shared by units only once)."""
    with self._lock:
      if key in self._done:
        return False
      self._done.add(key)
      return True

  def submit(self, jobs: Iterable[tuple[Hashable, Callable[[], object]]]) -> None:
    """Queues (key, job) pairs; a key already submitted is skipped."""
    if not self.enabled:
      return
    with self._lock:
      for key, job in jobs:
        if key in self._futures:
          continue
        self._futures[key] = concurrent.futures.Future()
        self._queue.append((key, job))
      if self._queue and self._thread is None:
        self._thread = threading.Thread(target=self._work, name='precompile', daemon=True)
        self._thread.start()

  def wait(self, key: Hashable) -> None:
    """Blocks until the job for `key` (if any was submitted) has finished; its errors were logged."""
    fut = self._futures.get(key)
    if fut is not None:
      fut.result()

  def _work(self) -> None:
    while True:
      with self._lock:
        if not self._queue:
          self._thread = None            # (under the lock: a later submit starts a new thread)
          return
        key, job = self._queue.pop(0)
      t0 = time.time()
      try:
        job()
      except Exception as e:  # noqa: BLE001  (the main thread compiles for itself; nothing is lost)
        self.failed += 1
        logging.warning('precompiling %s failed (it is compiled when first used instead): %s', key, e)
      self.seconds += time.time() - t0
      self._futures[key].set_result(None)
