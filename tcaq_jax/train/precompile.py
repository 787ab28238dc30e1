"""Compiling a round's unit programs ahead, on background threads, while the main thread captures and trains.

A round's units run one after another, and on a cold start each new unit signature costs XLA compiles (its
capture group's recorder, the block-MSE evaluator, the reconstruction step) on one core while the other idles.
`Precompiler.submit(jobs)` runs `job()` for each job, taken in submission order by up to `workers` daemon
threads; a job lowers and compiles jitted functions for *abstract* arguments (`jax.ShapeDtypeStruct`), which
fills the same in-memory cache the later call with concrete arrays uses, so the main thread finds them compiled.
The main thread calls `wait(key)` before it first calls a function a job compiles, and jobs compile a program
that several of them share through `run_once(key, fn)` (the others wait for it): no program is compiled twice.
A job that fails only logs (the main thread then compiles as it would have anyway): precompiling never changes
a result.

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
  """Runs compile jobs in submission order on up to `workers` daemon threads (keys already submitted are
  skipped). Two workers fill the core the main thread leaves idle while it waits for a compile (XLA:CPU compiles
  one program on one core)."""

  def __init__(self, enabled: bool = True, workers: int = 2):
    if workers < 1:
      raise ValueError(f'workers must be at least 1, got {workers}')
    self.enabled = enabled
    self.workers = workers
    self._futures: dict[Hashable, concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self._queue: list[tuple[Hashable, Callable[[], object]]] = []
    self._running = 0                   # worker threads alive
    self.seconds = 0.0                  # wall seconds the jobs took (summed over the workers)
    self.waited_s = 0.0                 # seconds callers of `wait` spent blocked on unfinished jobs
    self.jobs = 0                       # jobs run
    self.failed = 0
    self._claims: dict[Hashable, threading.Event] = {}

  def run_once(self, key: Hashable, fn: Callable[[], object]) -> None:
    """fn() the first time `key` is asked for; a later caller (another worker) blocks until that first fn()
    has finished, so a program shared by several jobs is compiled once and ready when any of them is done."""
    with self._lock:
      ev = self._claims.get(key)
      mine = ev is None
      if mine:
        ev = self._claims[key] = threading.Event()
    if not mine:
      ev.wait()
      return
    try:
      fn()
    finally:
      ev.set()

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
      while self._running < min(self.workers, len(self._queue)):
        self._running += 1
        threading.Thread(target=self._work, name='precompile', daemon=True).start()

  def wait(self, key: Hashable) -> None:
    """Blocks until the job for `key` (if any was submitted) has finished; its errors were logged."""
    fut = self._futures.get(key)
    if fut is not None:
      t0 = time.time()
      fut.result()
      self.waited_s += time.time() - t0

  def _work(self) -> None:
    while True:
      with self._lock:
        if not self._queue:
          self._running -= 1             # (under the lock: a later submit starts a new thread)
          return
        key, job = self._queue.pop(0)
      t0 = time.time()
      try:
        job()
      except Exception as e:  # noqa: BLE001  (the main thread compiles for itself; nothing is lost)
        with self._lock:
          self.failed += 1
        logging.warning('precompiling %s failed (it is compiled when first used instead): %s', key, e)
      with self._lock:
        self.seconds += time.time() - t0
        self.jobs += 1
      self._futures[key].set_result(None)

  def stats(self) -> dict:
    """{enabled, workers, jobs, failed, seconds (the jobs' wall time, summed over workers), waited_s (the
    callers' blocked time)}: how much compiling moved off the main thread, and how long it still waited."""
    return {'enabled': self.enabled, 'workers': self.workers, 'jobs': self.jobs, 'failed': self.failed,
            'seconds': round(self.seconds, 3), 'waited_s': round(self.waited_s, 3)}
