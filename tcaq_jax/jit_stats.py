"""Counts of XLA compilations and the seconds they took, from JAX's own monitoring events.

  stats = CompileStats.start()          # registers the listener once per process, snapshots the counters
  ...                                    # work
  stats.delta()  # {'compiles': 12, 'compile_s': 9.3, 'trace_s': 2.1, 'cache_hits': 3, 'cache_misses': 9}

'compiles' counts backend compilations (persistent-cache hits do not compile and are counted apart).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import pkgutil
import threading

import jax

__all__ = ['CompileStats', 'enable_compile_cache', 'set_cpu_opt_level', 'DEFAULT_CACHE_DIR', 'DEFAULT_CPU_OPT_LEVEL']

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


# XLA:CPU's LLVM optimisation level for the entry points. Measured on the demo UNet (2 cores, jax 0.10.2): level 1
# compiles a forward 38% and a forward + backward 20% faster than XLA's default (3) and runs them as fast (the
# convolutions are library calls; only the fused element-wise loops are LLVM code); level 0 halves compile time
# but runs 40% slower. The cold demo calibration: 137 -> 103 s compiling. docs/results/perf.md.
DEFAULT_CPU_OPT_LEVEL = 1


def _accelerator_plugin_installed() -> bool:
  """True when a PJRT plugin (jax_plugins.*, e.g. CUDA) or libtpu is installed: JAX may pick a non-CPU backend."""
  if importlib.util.find_spec('libtpu') is not None:
    return True
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
  except ImportError:
    jax_plugins = None
  if jax_plugins is not None and any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
    return True
  from importlib.metadata import entry_points  # pylint: disable=import-outside-toplevel
  return bool(list(entry_points(group='jax_plugins')))


def set_cpu_opt_level(level: int = DEFAULT_CPU_OPT_LEVEL) -> str:
  """Sets XLA:CPU's LLVM optimisation level (XLA_FLAGS --xla_backend_optimization_level) for this process, when it
  will run on the CPU backend only. It must run before JAX initialises a backend (XLA reads XLA_FLAGS then).
  Returns what was done, for the log: 'set', or why it was left alone (level < 0, XLA_FLAGS already chooses
  one, an accelerator may be used, a backend already initialised)."""
  if level < 0:
    return 'off (--xla_cpu_opt_level < 0)'
  current = os.environ.get('XLA_FLAGS', '')
  if 'xla_backend_optimization_level' in current:
    return 'left to XLA_FLAGS'
  platforms = (os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms or '').strip().lower()
  if platforms != 'cpu' and _accelerator_plugin_installed():
    return 'left at the default (an accelerator plugin is installed)'
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge._backends:  # pylint: disable=protected-access
    return 'left at the default (a JAX backend was already initialised)'
  os.environ['XLA_FLAGS'] = f'{current} --xla_backend_optimization_level={int(level)}'.strip()
  return 'set'
