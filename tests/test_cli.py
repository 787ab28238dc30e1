"""Entry points print one-line errors (exit 2), `--debug` keeps the traceback, stray positional arguments are
refused and `--help` exits 0 (tcaq_jax/cli.py), shown on the calibrate CLI."""
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _calibrate(*args):
  return subprocess.run([sys.executable, '-m', 'tcaq_jax.train.calibrate', '--compile_cache=', *args], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)


def test_project_error_is_one_line_with_exit_2_and_debug_gives_the_traceback():
  proc = _calibrate('--w_bits=1')
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == 'error: --w_bits=1: expected 2..16' and 'Traceback' not in proc.stderr
  proc = _calibrate('--w_bits=1', '--debug')
  assert proc.returncode == 1 and 'Traceback' in proc.stderr and 'ConfigError' in proc.stderr


def test_positional_arguments_are_refused_and_help_exits_0():
  proc = _calibrate('out_dir=somewhere')                      # a flag missing its dashes used to be ignored
  assert proc.returncode != 0 and 'unexpected positional arguments' in proc.stderr
  proc = _calibrate('--help')
  assert proc.returncode == 0 and '--w_bits' in proc.stdout + proc.stderr


_PROBE = '''
import os, sys, time
from tcaq_jax import cli
def main(argv):
  import jax, jax.numpy as jnp
  f = jax.jit(lambda x: jnp.tanh(x) * 2 + 1)
  print(float(f(jnp.float32(0.5))))
  print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', ''))
cli.run(main)
'''


def _probe(*args, **env):
  base = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, '-c', _PROBE, '--compile_cache=', *args], cwd=ROOT,
                        env=dict(base, PYTHONPATH=ROOT, **env), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  value, line = proc.stdout.splitlines()[-2:]
  assert abs(float(value) - (1 + 2 * math.tanh(0.5))) < 1e-6
  return line[len('XLA_FLAGS='):]


def test_entry_points_set_the_cpu_opt_level_before_jax_starts_unless_told_otherwise():
  """cli.run sets XLA:CPU's LLVM level (--xla_cpu_opt_level, default 1) in XLA_FLAGS before any backend exists;
  -1 leaves XLA's default; an XLA_FLAGS that already chooses a level wins; programs still run."""
  assert '--xla_backend_optimization_level=1' in _probe(JAX_PLATFORMS='cpu')
  assert '--xla_backend_optimization_level=0' in _probe('--xla_cpu_opt_level=0', JAX_PLATFORMS='cpu')
  assert 'xla_backend_optimization_level' not in _probe('--xla_cpu_opt_level=-1', JAX_PLATFORMS='cpu')
  mine = _probe(XLA_FLAGS='--xla_backend_optimization_level=2', JAX_PLATFORMS='cpu')
  assert '--xla_backend_optimization_level=2' in mine and 'level=1' not in mine
