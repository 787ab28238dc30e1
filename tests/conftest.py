import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# XLA:CPU's LLVM level 1, as the entry points use (tcaq_jax.jit_stats.set_cpu_opt_level): the suite is mostly
# compiling, and level 1 compiles 20-40% faster with the same results; an XLA_FLAGS that sets a level wins.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=1').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
