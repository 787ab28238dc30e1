"""Jitted forward (eps) compile time and run time of the full-size model configs.

  PYTHONPATH=. python bench/forward.py --models ddim_cifar10,ldm_lsun_churches --batches 1,8 --repeats 3

Params are random (same shapes as the converted checkpoints). Prints one table: compile seconds (lower +
compile), median forward seconds over --repeats runs after one warm-up, and images/s.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from tcaq_jax.models import configs  # noqa: E402
from tcaq_jax.models.convert import abstract_params  # noqa: E402

flags.DEFINE_string('models', 'ddim_cifar10', 'Comma-separated config names.')
flags.DEFINE_string('batches', '1,8', 'Comma-separated batch sizes.')
flags.DEFINE_integer('repeats', 3, 'Timed forward runs per (model, batch).')
FLAGS = flags.FLAGS


def _inputs(cfg, batch, rng):
  """(x NHWC, t, kwargs) for the eps forward."""
  if cfg['family'] == 'ddim':
    shape = (batch, cfg['resolution'], cfg['resolution'], cfg['in_channels'])
    kw = {}
  else:
    shape = (batch, *cfg['latent_shape'])
    kw = {'y': jnp.zeros((batch,), jnp.int32)} if cfg.get('cond_stage') else {}
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
  return x, t, kw


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  rows = []
  for name in FLAGS.models.split(','):
    cfg = configs.get_config(name)
    model = configs.build_model(cfg)
    shapes = abstract_params(cfg, model)
    if cfg['family'] == 'ldm':  # the eps forward only needs the UNet (+ class embedder)
      shapes = {k: v for k, v in shapes.items() if k != 'first_stage_model'}
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), jnp.float32), shapes)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    for batch in [int(b) for b in FLAGS.batches.split(',')]:
      x, t, kw = _inputs(cfg, batch, rng)
      fwd = jax.jit(lambda p, x, t, kw: model.apply({'params': p}, x, t, **kw))
      t0 = time.perf_counter()
      compiled = fwd.lower(params, x, t, kw).compile()
      t_compile = time.perf_counter() - t0
      jax.block_until_ready(compiled(params, x, t, kw))
      times = []
      for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x, t, kw))
        times.append(time.perf_counter() - t0)
      med = statistics.median(times)
      rows.append((name, n_params, batch, t_compile, med, batch / med))
      print(f'# done {name} batch {batch}', file=sys.stderr, flush=True)
  dev = jax.devices()[0]
  print(f'device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}, repeats {FLAGS.repeats}')
  print('| model | params | batch | compile s | forward s (median) | img/s |')
  print('|---|---:|---:|---:|---:|---:|')
  for name, n, b, tc, tf, ips in rows:
    print(f'| {name} | {n:,} | {b} | {tc:.1f} | {tf:.3f} | {ips:.2f} |')


if __name__ == '__main__':
  app.run(main)
