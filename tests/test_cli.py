"""Entry points print one-line errors (exit 2), `--debug` keeps the traceback, stray positional arguments are
refused and `--help` exits 0 (tcaq_jax/cli.py), shown on the calibrate CLI."""
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
