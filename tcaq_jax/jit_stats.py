"""Counts of XLA compilations and the seconds they took, from JAX's own monitoring events.

  stats = CompileStats.start()          # registers the listener once per process, snapshots the counters
  ...                                    # work
  stats.delta()  # {'compiles': 12, 'compile_s': 9.3, 'trace_s': 2.1, 'cache_hits': 3, 'cache_misses': 9}

'compiles' counts backend compilations (persistent-cache hits do not compile and are counted apart).
"""
from __future__ import annotations

import dataclasses
import os
import threading

import jax

__all__ = ['CompileStats', 'enable_compile_cache', 'DEFAULT_CACHE_DIR']

_BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'
_TRACE = '/jax/core/compile/jaxpr_trace_duration'
_HITS = '/jax/compilation_cache/cache_hits'
_MISSES = '/jax/compilation_cache/cache_misses'
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'tcaq_jax', 'xla')

_lock = threading.Lock()
_totals = {'compiles': 0, 'compile_s': 0.0, 'trace_s': 0.0, 'cache_hits': 0, 'cache_misses': 0}
_registered = False


def _on_duration(event: str, duration: float, **_):
  with _lock:
    if event == _BACKEND_COMPILE:
      _totals['compiles'] += 1
      _totals['compile_s'] += float(duration)
    elif event == _TRACE:
      _totals['trace_s'] += float(duration)


def _on_event(event: str, **_):
  with _lock:
    if event == _HITS:
      _totals['cache_hits'] += 1
    elif event == _MISSES:
      _totals['cache_misses'] += 1


def _register():
  global _registered
  with _lock:
    if _registered:
      return
    _registered = True
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.monitoring.register_event_listener(_on_event)


@dataclasses.dataclass
class CompileStats:
  """A snapshot of the process-wide compile counters; `delta()` is what happened since."""
  base: dict

  @classmethod
  def start(cls) -> 'CompileStats':
    _register()
    with _lock:
      return cls(dict(_totals))

  def delta(self) -> dict:
    with _lock:
      return {k: (round(v - self.base[k], 3) if isinstance(v, float) else v - self.base[k])
              for k, v in _totals.items()}


def enable_compile_cache(directory: str | None = DEFAULT_CACHE_DIR, min_compile_secs: float = 0.2) -> str | None:
  """JAX's persistent compilation cache in `directory` ('' or None: leave it off). Programs that took at least
  min_compile_secs to compile are stored; a later process with the same program loads them instead of compiling.
  Returns the directory used."""
  if not directory:
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', float(min_compile_secs))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return directory
