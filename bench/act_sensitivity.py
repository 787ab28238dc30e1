"""Which layers' activation quantizers cost a calibrated model the most (per-layer leave-one-out).

For a calibration run dir: the eps prediction error (MSE against the FP model, on the run's own round-0
calibration set: FP trajectories at the calibrated steps) with
  all     every policy-selected activation quantized (the run as it samples)
  w_only  weights quantized, every activation FP
  -L      all but layer L's input quantized (how much L costs with the rest quantized)
  +L      only L's input quantized (L alone, on top of w_only)
One compile: which inputs are quantized is a traced 0/1 mask per layer (`act_interceptor`'s act_mask, a select,
so exact either way).

  PYTHONPATH=. python bench/act_sensitivity.py --run_dir runs/demo_table_2k/tcaq_w6a6 --out runs/act_sens.json
Prints one table (layers by -L gain, largest first) and writes JSON.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.diffusion.capture import CalibData
from tcaq_jax.diffusion.schedules import schedule_from_config
from tcaq_jax.quant import apply as qapply
from tcaq_jax.quantized import load_quantized

flags.DEFINE_string('run_dir', 'runs/demo_table_2k/tcaq_w6a6', 'calibration run dir')
flags.DEFINE_string('calib', None, 'capture dir (default: <run_dir>/calib_round0)')
flags.DEFINE_integer('per_step', 32, 'samples per calibrated step')
flags.DEFINE_integer('batch', 128, 'forward batch')
flags.DEFINE_integer('top', 25, 'table rows')
flags.DEFINE_enum('space', 'x0', ['eps', 'x0'], "error of the eps prediction, or of the x0 prediction it implies "
                  "(eps error x (1 - abar_t) / abar_t: the input's own quantization dominates eps at small t, "
                  "where it barely moves x0)")
flags.DEFINE_string('out', None, 'JSON output path')
flags.DEFINE_list('sample', [], "also sample --num_samples images (DDIM, the run's sampler settings, --seed) under "
                  "these masks and score them (demo digits-FID, image MSE vs FP samples from the same noise): "
                  "'all', 'w_only', '-LAYER' (all but LAYER), '+LAYER' (only LAYER; LAYER may be A|B|..); skips the "
                  "leave-one-out scan")
flags.DEFINE_integer('num_samples', 500, 'images per --sample mask')
flags.DEFINE_integer('seed', 123, 'sample seed (bench/demo_table.py uses 123)')
flags.DEFINE_string('fp_samples', None, "the FP model's samples for --seed as .npy (float in [-1, 1], e.g. a demo "
                    "table's fp_samples.npy; its first --num_samples are used) instead of sampling them again")
FLAGS = flags.FLAGS


def masked_apply(model, params_q, qstate, policy, mask: dict, x, t, step_index):
  """model.apply with (already quantized) weights; layer `path`'s input is quantized where mask[path] is 1
  (`act_interceptor`'s act_mask)."""
  with nn.intercept_methods(qapply.act_interceptor(qstate, policy, step_index, act_mask=mask)):
    return model.apply({'params': params_q}, x, t)


def main(_):
  q = load_quantized(FLAGS.run_dir)
  data = CalibData(FLAGS.calib or os.path.join(FLAGS.run_dir, 'calib_round0'))
  n = min(FLAGS.per_step, data.x.shape[1])
  xs = np.asarray(data.x[:, :n]).reshape((-1,) + data.x.shape[2:])
  ts = np.repeat(data.t, n).astype(np.int32)
  si = np.repeat(data.step_index, n).astype(np.int32)
  paths = [p for p, s in q.policy.layers.items() if s.acts and p in q.qstate.layers]
  params_q = qapply.quantize_weights(q.params, q.qstate, q.policy, 'hard')
  if FLAGS.sample:
    return sample_masks(q, paths, params_q)
  # params and quantizer state are jit arguments (closed over, they would be baked into the program as constants)
  fp = jax.jit(lambda p, x, t: q.model.apply({'params': p}, x, t))
  run = jax.jit(lambda p, qs, m, x, t, s: masked_apply(q.model, p, qs, q.policy, m, x, t, s))
  b = FLAGS.batch
  ref = np.concatenate([np.asarray(fp(q.params, xs[i:i + b], ts[i:i + b])) for i in range(0, len(xs), b)])
  k = len(data.t)
  abar = schedule_from_config(q.config)[data.t]
  weight = np.ones(k) if FLAGS.space == 'eps' else (1 - abar) / abar

  def err(mask):
    m = {p: jnp.float32(v) for p, v in mask.items()}
    out = np.concatenate([np.asarray(run(params_q, q.qstate, m, xs[i:i + b], ts[i:i + b], si[i:i + b]))
                          for i in range(0, len(xs), b)])
    d = ((out - ref) ** 2).reshape(k, n, -1).mean(axis=(1, 2)) * weight
    return float(d.mean()), d

  t0 = time.time()
  all_e, all_k = err({p: 1.0 for p in paths})
  w_e, w_k = err({p: 0.0 for p in paths})
  rows = []
  for p in paths:
    drop, drop_k = err({r: float(r != p) for r in paths})
    alone, _ = err({r: float(r == p) for r in paths})
    rows.append({'layer': p, 'kind': q.policy.layers[p].kind, 'bits': q.policy.layers[p].a_bits,
                 'minus_L': drop, 'gain': all_e - drop, 'plus_L': alone, 'alone_cost': alone - w_e,
                 'minus_L_per_step': drop_k.tolist()})
  rows.sort(key=lambda r: -r['gain'])
  print(f'{FLAGS.run_dir}: {FLAGS.space} MSE vs FP on {len(xs)} calibration inputs ({k} steps x {n}); '
        f'all {all_e:.5f}, weights only {w_e:.5f}  ({time.time() - t0:.0f} s)')
  print('| layer | kind | bits | all - (-L) | share of A gap | (+L) - w_only |')
  print('|---|---|---|---|---|---|')
  gap = all_e - w_e
  for r in rows[:FLAGS.top]:
    print(f"| {r['layer']} | {r['kind']} | {r['bits']} | {r['gain']:.5f} | {r['gain'] / gap:.1%} | "
          f"{r['alone_cost']:.5f} |")
  print('per step (all / w_only):', ' '.join(f'{a:.4f}/{w:.4f}' for a, w in zip(all_k, w_k)))
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump({'run_dir': FLAGS.run_dir, 'all': all_e, 'w_only': w_e, 'all_per_step': all_k.tolist(),
                 'w_only_per_step': w_k.tolist(), 'space': FLAGS.space, 't': data.t.tolist(), 'rows': rows}, f, indent=1)


def _masked_eps(model, policy, params_q, qstate, mask, x, t, step_index, cond):
  del cond
  return masked_apply(model, params_q, qstate, policy, mask, x, t, step_index)


def mask_of(name: str, paths: list) -> dict:
  """'all' | 'w_only' | '-A|B' (all but layers A, B quantized) | '+A|B' (only A, B)."""
  if name in ('all', 'w_only'):
    return {p: float(name == 'all') for p in paths}
  chosen = set(name[1:].split('|'))
  if name[:1] not in '+-' or not chosen <= set(paths):
    raise app.UsageError(f'--sample: {name!r} is not all, w_only, -LAYER[|LAYER..] or +LAYER[|LAYER..] with '
                         f'layers in {paths}')
  return {p: float((p in chosen) == (name[0] == '+')) for p in paths}


def sample_masks(q, paths, params_q):
  import functools
  from jax.tree_util import Partial
  from tcaq_jax.demo.classifier import demo_quality
  from tcaq_jax.eval.sample import generate
  from tcaq_jax.quantized import check_sampler_settings
  steps, skip, eta = check_sampler_settings(q.meta, None, None, None, FLAGS.run_dir)
  fn = functools.partial(_masked_eps, q.model, q.policy)
  loaded = (q.model, q.params, q.config)
  kw = dict(num_samples=FLAGS.num_samples, batch_size=FLAGS.batch, steps=steps, skip_type=skip, eta=eta,
            seed=FLAGS.seed, loaded=loaded, progress=False)
  to_float = lambda u8: u8.astype(np.float32) / 127.5 - 1.0
  if FLAGS.fp_samples:
    fp = np.load(FLAGS.fp_samples)[:FLAGS.num_samples]
    if fp.shape[0] != FLAGS.num_samples:
      raise app.UsageError(f'--fp_samples={FLAGS.fp_samples!r} holds {fp.shape[0]} samples, fewer than '
                           f'--num_samples={FLAGS.num_samples}')
  else:
    fp = to_float(generate(None, **kw))
  out = {'fp': demo_quality(fp)}
  print(f"fp: digits-FID {out['fp']['fid']:.3f}")
  for name in FLAGS.sample:
    mask = {p: jnp.float32(v) for p, v in mask_of(name, paths).items()}
    eps = Partial(fn, params_q, q.qstate, mask)
    imgs = to_float(generate(None, eps_fn_builder=lambda m, p, c, e=eps: e, **kw))
    r = demo_quality(imgs)
    r['mse_vs_fp'] = float(((imgs - fp) ** 2).mean())
    out[name] = r
    print(f"{name}: digits-FID {r['fid']:.3f}, confident {r['confident_fraction']:.3f}, "
          f"image MSE vs FP {r['mse_vs_fp']:.5f}")
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump({'run_dir': FLAGS.run_dir, 'num_samples': FLAGS.num_samples, 'seed': FLAGS.seed,
                 'results': {k: {kk: vv for kk, vv in v.items() if kk != 'class_histogram'} for k, v in out.items()}},
                f, indent=1)


if __name__ == '__main__':
  app.run(main)
