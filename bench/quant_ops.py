"""Throughput of the fake quantizers vs a plain elementwise op (jitted, warm-up excluded).

  PYTHONPATH=. python bench/quant_ops.py [--shape=64,32,32,128] [--iters=20] [--bits=4]
Prints one markdown table: per-call median time, elements/s, and slowdown vs the plain relu.
"""
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax import quant as Q

FLAGS = flags.DEFINE_string('shape', '64,32,32,128', 'tensor shape (NHWC)')
ITERS = flags.DEFINE_integer('iters', 20, 'timed calls per op (median reported)')
BITS = flags.DEFINE_integer('bits', 4, 'bit width')


def _time(fn, *args, iters):
  jax.block_until_ready(fn(*args))          # compile + warm-up
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def main(argv):
  del argv
  shape = tuple(int(s) for s in FLAGS.value.split(','))
  bits = BITS.value
  x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
  s_t, z_t = Q.minmax_params(x, bits)
  s_c, z_c = Q.minmax_params(x, bits, channel_axis=-1)
  alpha = Q.init_alpha(x, s_c, z_c)
  p = jax.nn.softmax(x, axis=-1)
  d = Q.log2_search_delta(p, bits, 'logsqrt2')
  ops = [
      ('plain relu (baseline)', jax.jit(jax.nn.relu), (x,)),
      ('plain x * 1.5', jax.jit(lambda x: x * 1.5), (x,)),
      ('fake_quant per-tensor', jax.jit(lambda x, s, z: Q.fake_quant(x, s, z, bits)), (x, s_t, z_t)),
      ('fake_quant per-channel (axis -1)', jax.jit(lambda x, s, z: Q.fake_quant(x, s, z, bits)), (x, s_c, z_c)),
      ('adaround soft', jax.jit(lambda x, a, s, z: Q.adaround_fake_quant(x, a, s, z, bits)), (x, alpha, s_c, z_c)),
      ('adaround hard', jax.jit(lambda x, a, s, z: Q.adaround_fake_quant(x, a, s, z, bits, hard=True)),
       (x, alpha, s_c, z_c)),
      ('logsqrt2 fake_quant', jax.jit(lambda p, d: Q.logsqrt2_fake_quant(p, d, bits)), (p, d)),
      ('grad: fake_quant per-channel (x and scale)',
       jax.jit(jax.grad(lambda x, s, z: jnp.sum(Q.fake_quant(x, s, z, bits)), argnums=(0, 1))), (x, s_c, z_c)),
      ('grad: relu', jax.jit(jax.grad(lambda x: jnp.sum(jax.nn.relu(x)))), (x,)),
  ]
  n = x.size
  rows = []
  base = None
  for name, fn, args in ops:
    t = _time(fn, *args, iters=ITERS.value)
    base = base or t
    rows.append((name, t * 1e3, n / t / 1e9, t / base))
  print(f'shape {shape}, {bits} bits, float32, {jax.devices()[0].platform}, median of {ITERS.value} calls')
  print('| op | ms / call | G elem / s | x relu |')
  print('|---|---:|---:|---:|')
  for name, ms, ge, rel in rows:
    print(f'| {name} | {ms:.2f} | {ge:.3f} | {rel:.2f} |')


if __name__ == '__main__':
  app.run(main)
