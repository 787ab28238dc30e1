import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# XLA:CPU's LLVM level 1, as the entry points use (tcaq_jax.jit_stats.set_cpu_opt_level): the suite is mostly
# compiling, and level 1 compiles 20-40% faster with the same results; an XLA_FLAGS that sets a level wins.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=1').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='module')
def load_bench():
  """load_bench(name) -> bench/<name>.py as a module. The absl flags it defines are removed when the test module
  ends: two bench scripts define flags of the same name (--out), and pytest-xdist may run both test files in one
  process."""
  import importlib.util
  from absl import flags
  before = set(flags.FLAGS)

  def load(name):
    spec = importlib.util.spec_from_file_location(f'{name}_under_test', os.path.join(ROOT, 'bench', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

  yield load
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
