"""A per-layer, per-sampler-step output bias correction on a finished calibration: does it help where the
whole-model eps correction (--eps_bias / --eps_scale) already runs?

For every quantized conv / dense layer and sampler step i, on FP sampling trajectories (--fit_samples, seed
--fit_seed), the mean over samples and pixels of the layer's quantized output minus a reference, per output
channel, is subtracted from that layer's output at step i:
  local   reference = the FP layer on the same (quantized-model) input: the layer's own quantization bias
          (bias correction in the sense of Nagel et al. 2019, per step)
  global  reference = that layer's output in the FP model on the same x_t: the drift accumulated up to it
--iters > 1 measures again with the corrections so far and adds what is left. Then the run's eps correction is
refitted on top (pixel bias + scale, 64 FP trajectories, the pipeline's seed offset), and --num_samples images
(--seed, the demo table's sampler) are scored like the demo table: digits-FID against the real digits and the
paired MSE against the table's FP samples (--fp_samples, same seed).

  PYTHONPATH=. python bench/layer_bias.py --run_dir runs/demo_table_2k/tcaq_w6a6 --mode=global --iters=1 \\
      --out runs/layer_bias_w6a6.json
"""
from __future__ import annotations

import json
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.demo.classifier import demo_quality
from tcaq_jax.diffusion.batched import sample_all
from tcaq_jax.diffusion.ddim import sampler_coefficients
from tcaq_jax.diffusion.host_sampler import HostLoopSampler
from tcaq_jax.models import family
from tcaq_jax.quant import apply as qapply
from tcaq_jax.quant.intercept import Call, collect_calls
from tcaq_jax.quantized import load_quantized
from tcaq_jax.train import eps_bias
from tcaq_jax.train.act_search import layer_output
from tcaq_jax.train.init import get_kernel

flags.DEFINE_string('run_dir', 'runs/demo_table_2k/tcaq_w6a6', 'a finished calibration of the demo model')
flags.DEFINE_enum('mode', 'local', ['local', 'global'], 'reference of the measured bias (module docstring)')
flags.DEFINE_integer('iters', 1, 'measure-and-add passes')
flags.DEFINE_integer('fit_samples', 64, 'FP trajectories the layer biases are measured on')
flags.DEFINE_integer('fit_seed', 7, 'their seed (not the evaluation seed)')
flags.DEFINE_integer('num_samples', 2000, 'samples scored')
flags.DEFINE_integer('seed', 123, 'sample seed (bench/demo_table.py uses 123)')
flags.DEFINE_string('fp_samples', 'runs/demo_table_2k/fp_samples.npy', "the FP model's samples for --seed")
flags.DEFINE_string('out', None, 'JSON output path')
FLAGS = flags.FLAGS


def corrected_apply(q, params_q, qstate, corr, x, t, step, record=None, fp_out=None):
  """The quantized model's eps (no output correction) with corr[path][step] ([C] per layer) subtracted from
  each listed layer's output; record (a dict) gets per layer the channel means of (corrected output -
  reference): the FP layer on the same input, or fp_out[path] (the FP model's output of that layer). step: [B]."""
  std = qapply.act_interceptor(qstate, q.policy, step)
  slot = qapply.slot_of(qstate, step)

  def icpt(next_fun, args, kwargs, ctx):
    path = '/'.join(ctx.module.path)
    if ctx.method_name != '__call__' or path not in corr or not args:
      return std(next_fun, args, kwargs, ctx)
    x_in = args[0]
    xq = qapply.act_fake_quant(x_in, qstate.layers[path], q.policy.layers[path], slot)
    y = next_fun(xq, *args[1:], **kwargs)
    c = jnp.take(corr[path], step, axis=0)                                   # [B, C]
    y = y - c.reshape(c.shape[:1] + (1,) * (y.ndim - 2) + c.shape[1:]).astype(y.dtype)
    if record is not None:
      # local: the layer (bound to the quantized kernel and the shared bias) with its FP kernel, on its input
      ref = (layer_output(Call(path, ctx.module, args, kwargs, None, 0), x_in, get_kernel(q.params, path))
             if fp_out is None else fp_out[path])
      record[path] = jnp.mean((y - ref).astype(jnp.float32).reshape(-1, y.shape[-1]), axis=0)
    return y

  with nn.intercept_methods(icpt):
    return q.model.apply({'params': params_q}, x, t)


def fp_layer_outputs(q, paths, x, t):
  """{path: the FP model's output of that layer} on (x, t)."""
  return collect_calls(lambda: q.model.apply({'params': q.params}, x, t), select=lambda path, m: path in paths,
                       record=lambda call: call.output)[1]


def main(_):
  t0 = time.time()
  q = load_quantized(FLAGS.run_dir)
  cfg = q.meta['config']
  coeffs = sampler_coefficients(q.config, cfg['num_steps'], cfg['skip_type'], cfg['eta'])
  shape = tuple(family.sample_shape(q.config))
  fp_sampler = HostLoopSampler(family.eps_fn(q.model, q.params, q.config), coeffs, shape)
  ts = np.asarray(fp_sampler.consts['timesteps'], np.int32)
  paths = [p for p, s in q.policy.layers.items() if s.acts and s.kind in ('conv', 'dense') and p in q.qstate.layers]
  params_q = qapply.quantize_weights(q.params, q.qstate, q.policy, 'hard')
  plain = q.qstate.replace(out_bias=None, out_scale=None)
  n = FLAGS.fit_samples

  @jax.jit
  def measure(corr, x, t, step):
    rec = {}
    fp_out = fp_layer_outputs(q, paths, x, t) if FLAGS.mode == 'global' else None
    corrected_apply(q, params_q, plain, corr, x, t, step, record=rec, fp_out=fp_out)
    return rec

  xs = fp_sampler.sample(FLAGS.fit_seed, 0, n, record='all')['recorded']          # [steps, n, ...]
  corr = {p: jnp.zeros((len(ts), get_kernel(q.params, p).shape[-1]), jnp.float32) for p in paths}
  passes = []
  for _ in range(FLAGS.iters):
    new = {p: np.zeros(v.shape, np.float32) for p, v in corr.items()}
    for i in range(len(ts)):
      rec = measure(corr, jnp.asarray(xs[i]), jnp.full((n,), ts[i], jnp.int32), jnp.full((n,), i, jnp.int32))
      for p in paths:
        new[p][i] = np.asarray(rec[p])
    corr = {p: corr[p] + new[p] for p in paths}
    passes.append(float(np.mean([np.abs(v).mean() for v in new.values()])))

  def q_fwd(consts, x, t, s, c):
    del c
    return corrected_apply(q, params_q, consts[0], consts[1], x, t, s)

  err = eps_bias.make_error_sum(q_fwd, family.forward(q.model, q.config))
  bias, scale, _ = eps_bias.fit(fp_sampler, err, (plain, corr), q.params, 64, 32,
                                cfg['seed'] + eps_bias.SEED_OFFSET, 'pixel', scale=True)
  qs = plain.replace(out_bias=jnp.asarray(bias), out_scale=jnp.asarray(scale))

  def eps_fn(x, t, step_index, cond=None):
    del cond
    step = jnp.broadcast_to(jnp.asarray(step_index, jnp.int32), (x.shape[0],))
    return qapply.correct_output(corrected_apply(q, params_q, qs, corr, x, t, step), qs, step_index)

  fp_images = np.load(FLAGS.fp_samples)[:FLAGS.num_samples]
  sampler = HostLoopSampler(eps_fn, sampler_coefficients(q.config, cfg['num_steps'], 'quad', 0.0), shape)
  images = np.clip(sample_all(sampler, FLAGS.num_samples, 250, FLAGS.seed), -1., 1.)
  per = ((images - fp_images) ** 2).reshape(len(images), -1).mean(1)
  res = {'run_dir': FLAGS.run_dir, 'mode': FLAGS.mode, 'iters': FLAGS.iters, 'fit_samples': n,
         'mean_abs_measured_per_pass': passes, 'fid': demo_quality(images)['fid'], 'mse_fp': float(per.mean()),
         'mse_fp_se': float(per.std(ddof=1) / np.sqrt(per.size)), 'seconds': time.time() - t0}
  print('| run | mode | passes (mean abs bias measured) | digits-FID | paired MSE x1e3 |\n|---|---|---|---|---|')
  print(f"| {FLAGS.run_dir} | {FLAGS.mode} | {', '.join(f'{v:.2e}' for v in passes)} | {res['fid']:.3f} | "
        f"{1e3 * res['mse_fp']:.2f} +- {1e3 * res['mse_fp_se']:.2f} |")
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(res, f, indent=1)


if __name__ == '__main__':
  app.run(main)
