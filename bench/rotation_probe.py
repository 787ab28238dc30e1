"""Would an orthogonal rotation of each layer's input channels make its low-bit activations cheaper?

A probe, before any change to the quantizers: for every conv / dense layer whose input the run's policy
quantizes, on the FP model's own inputs at the run's calibrated steps (its round-0 capture), the layer's output
error (MSE against its FP output, relative to the output's mean square) with
  plain    the input fake-quantized per tensor and step, clipping chosen among percentile candidates by that
           output error (weights FP, or per-output-channel min-max at --w_bits with --weights)
  rotated  the same after x -> x R (R a random orthogonal C x C per layer, the kernel's input axis R^T W, exact in
           FP): outlier channels are spread over all channels, as in QuaRot-style rotations for LLMs
TCR ratios are not applied (this asks whether a rotation beats the plain per-tensor grid, not TCR).

  PYTHONPATH=. python bench/rotation_probe.py --run_dir runs/demo_table_2k/tcaq_w4a4 --a_bits=4 \\
      --out runs/rotation_probe_a4.json
Prints one table (layers by plain error, largest first) and writes JSON.
"""
from __future__ import annotations

import json
import os
import zlib

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.diffusion.capture import CalibData
from tcaq_jax.quant.intercept import collect_calls
from tcaq_jax.quant.ranges import minmax_params
from tcaq_jax.quant.uniform import fake_quant
from tcaq_jax.quantized import load_quantized
from tcaq_jax.train.act_search import layer_output, search_uniform

flags.DEFINE_string('run_dir', 'runs/demo_table_2k/tcaq_w4a4', 'calibration run dir (its FP model and capture)')
flags.DEFINE_integer('per_step', 16, 'samples per calibrated step')
flags.DEFINE_integer('a_bits', 4, 'activation bits')
flags.DEFINE_integer('w_bits', 4, 'weight bits (with --weights)')
flags.DEFINE_bool('weights', False, 'also quantize the (rotated) kernel per output channel, min-max, nearest')
flags.DEFINE_list('pcts', ['100', '99.999', '99.99', '99.9', '99'], 'clipping candidates (both tails)')
flags.DEFINE_integer('seed', 0, 'rotation seed')
flags.DEFINE_integer('top', 20, 'table rows')
flags.DEFINE_string('out', None, 'JSON output path')
FLAGS = flags.FLAGS


def rotation(c: int, key) -> np.ndarray:
  """A Haar-random orthogonal C x C matrix (QR of a Gaussian, signs fixed)."""
  a = np.asarray(jax.random.normal(key, (c, c)), np.float64)
  qm, rm = np.linalg.qr(a)
  return (qm * np.sign(np.diag(rm))[None, :]).astype(np.float32)


def rotate_kernel(kernel, r):
  """x R with kernel R^T W on the input axis (conv HWIO: axis -2; dense [in, out]: axis 0)."""
  return jnp.einsum('...io,ij->...jo', kernel, r)


def weight_fq(kernel, bits):
  """Per-output-channel min-max fake quantization, round to nearest."""
  s, z = minmax_params(kernel, bits, channel_axis=-1)
  return fake_quant(kernel, s, z, bits)


def quant_error(call, kernel, x, ref, bits, pcts, key):
  """The layer's output MSE (with `kernel`) for x fake-quantized per tensor, clipping chosen among the percentile
  candidates by that error (`search_uniform` with an output score, as --act_criterion=output does)."""
  score = lambda xq: jnp.mean((layer_output(call, xq, kernel) - ref) ** 2)     # noqa: E731
  s, z = search_uniform(x, bits, pcts, key, symmetric=False, score=score)
  return float(score(fake_quant(x, s, z, bits)))


def main(_):
  q = load_quantized(FLAGS.run_dir)
  data = CalibData(os.path.join(FLAGS.run_dir, 'calib_round0'))
  n = min(FLAGS.per_step, data.x.shape[1])
  pcts = tuple(float(p) for p in FLAGS.pcts)
  paths = {p for p, s in q.policy.layers.items() if s.acts and s.kind in ('conv', 'dense')}
  key = jax.random.PRNGKey(FLAGS.seed)
  sums: dict = {}
  for k in range(len(data.t)):

    def probe(call, k=k):                  # one layer at step k: plain and rotated errors (eager, inside the call)
      x = call.args[0].astype(jnp.float32)
      kernel = call.module.variables['params']['kernel'].astype(jnp.float32)
      ref = call.output.astype(jnp.float32)
      c = x.shape[-1]
      r = jnp.asarray(rotation(c, jax.random.fold_in(key, zlib.crc32(call.path.encode()) % (1 << 30))))
      kr = rotate_kernel(kernel, r)
      kq, krq = (weight_fq(kernel, FLAGS.w_bits), weight_fq(kr, FLAGS.w_bits)) if FLAGS.weights else (kernel, kr)
      kk = jax.random.fold_in(key, k)
      return {'channels': c, 'power': float(jnp.mean(ref ** 2)) + 1e-12,
              'plain': quant_error(call, kq, x, ref, FLAGS.a_bits, pcts, kk),
              'rotated': quant_error(call, krq, x @ r, ref, FLAGS.a_bits, pcts, kk)}

    xs = jnp.asarray(data.x[k, :n])
    ts = jnp.full((n,), int(data.t[k]), jnp.int32)
    _, rec = collect_calls(lambda: q.model.apply({'params': q.params}, xs, ts),
                           select=lambda path, m: path in paths, record=probe, need_args=True)
    for path, e in rec.items():
      s = sums.setdefault(path, {'layer': path, 'channels': e['channels'], 'plain': 0.0, 'rotated': 0.0,
                                 'power': 0.0})
      for f in ('plain', 'rotated', 'power'):
        s[f] += e[f] / len(data.t)
  rows = sorted(sums.values(), key=lambda r: -r['plain'] / r['power'])
  print(f"{FLAGS.run_dir}: A{FLAGS.a_bits}{' W%d' % FLAGS.w_bits if FLAGS.weights else ' (weights FP)'}, "
        f"{len(data.t)} steps x {n} FP inputs; relative output MSE per layer")
  print('| layer | C | plain | rotated | rotated / plain |')
  print('|---|---|---|---|---|')
  for r in rows[:FLAGS.top]:
    print(f"| {r['layer']} | {r['channels']} | {r['plain'] / r['power']:.4f} | {r['rotated'] / r['power']:.4f} | "
          f"{r['rotated'] / r['plain']:.2f} |")
  ratios = np.array([r['rotated'] / r['plain'] for r in rows])
  print(f'layers {len(rows)}: rotated/plain median {np.median(ratios):.2f}, geometric mean '
        f'{np.exp(np.mean(np.log(ratios))):.2f}, better in {int((ratios < 1).sum())}')
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump({'run_dir': FLAGS.run_dir, 'a_bits': FLAGS.a_bits, 'weights': FLAGS.weights,
                 'w_bits': FLAGS.w_bits, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
