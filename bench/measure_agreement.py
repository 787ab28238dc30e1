"""Which measure of a quantized model's samples orders the demo table's rows as the digits-FID does?

For every row of a demo table (bench/demo_table.py --out DIR) whose 2,000 samples are kept (DIR/samples/<row>.npy,
drawn from the FP row's noise), measures that need no digits network (the kind a calibration gate could use on
any model) and two that use the FID's own classifier, against the FP model's samples (DIR/fp_samples.npy):
  mse        the table's paired MSE (mse256: on the first 256 samples, the gate's size)
  self_fd    Frechet distance of the FP UNet's own mid-block features (channel means and stds) of the samples
             re-noised to t = --t (fixed noise); self_fd256 on the first 256
  pix_fd     Frechet distance of the raw pixels
  class_tv   total variation between the digits classifier's predicted class frequencies (row vs FP)
  conf       the table's mean classifier confidence
Prints, per group of rows (--groups: substring, FID cap, paired-MSE cap), the Spearman rank correlation of each
measure with the digits-FID, and writes per-row values as JSON.

  PYTHONPATH=. python bench/measure_agreement.py --out_dir runs/demo_table_2k --json runs/measure_agreement.json
"""
from __future__ import annotations

import json
import os

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

from tcaq_jax.assets import DEMO_UNET_DIR
from tcaq_jax.demo import classifier
from tcaq_jax.diffusion.schedules import schedule_from_config
from tcaq_jax.eval.metrics import fid as frechet
from tcaq_jax.models import family
from tcaq_jax.quant.intercept import collect_calls

flags.DEFINE_string('out_dir', 'runs/demo_table_2k', 'a demo table output dir with kept samples')
flags.DEFINE_integer('t', 200, 'diffusion time the samples are re-noised to for the self features')
flags.DEFINE_string('prefix', 'tcaq', 'rows whose name starts with this')
flags.DEFINE_list('groups', ['w4a4:25:0.027', 'w6a6:4:0.004'],
                  'substring:max FID:max paired MSE (the cluster of working models the gate chooses among)')
flags.DEFINE_string('json', None, 'per-row JSON output')
FLAGS = flags.FLAGS

MEASURES = ('mse', 'mse256', 'self_fd', 'self_fd256', 'pix_fd', 'class_tv', 'conf')


def self_features(model, params, abar, x0, t, noise, batch=500):
  """[N, 2C]: channel means and stds of the FP UNet's 'mid' output on x0 re-noised to t."""
  a, feats = float(abar[t]), []
  for i in range(0, len(x0), batch):
    xt = jnp.asarray(np.sqrt(a) * x0[i:i + batch] + np.sqrt(1 - a) * noise[i:i + batch])
    tt = jnp.full((len(xt),), t, jnp.int32)
    h = collect_calls(lambda: model.apply({'params': params}, xt, tt), select=lambda path, m: path == 'mid',
                      record=lambda call: np.asarray(call.output, np.float64))[1]['mid']
    feats.append(np.concatenate([h.mean(axis=(1, 2)), h.std(axis=(1, 2))], -1))
  return np.concatenate(feats)


def main(_):
  table = {r['name']: r for r in json.load(open(os.path.join(FLAGS.out_dir, 'table.json')))['rows']}
  fp = np.load(os.path.join(FLAGS.out_dir, 'fp_samples.npy'))
  model, params, config = family.load(DEMO_UNET_DIR)
  abar = schedule_from_config(config)
  noise = np.asarray(jax.random.normal(jax.random.PRNGKey(7), fp.shape))
  clf, clf_params = classifier.load_classifier()

  def classes(x):
    return np.bincount(classifier.classify(clf, clf_params, x)[1].argmax(-1), minlength=10) / len(x)

  f_fp, h_fp = self_features(model, params, abar, fp, FLAGS.t, noise), classes(fp)
  rows = []
  for name, r in sorted(table.items()):
    path = os.path.join(FLAGS.out_dir, 'samples', f'{name}.npy')
    if not name.startswith(FLAGS.prefix) or r.get('mse_fp') is None or not os.path.exists(path):
      continue
    s = np.load(path)
    if s.shape != fp.shape:
      continue
    f = self_features(model, params, abar, s, FLAGS.t, noise)
    rows.append({'name': name, 'fid': r['fid'], 'mse': r['mse_fp'], 'conf': r['conf'],
                 'mse256': float(((s[:256] - fp[:256]) ** 2).mean()),
                 'self_fd': frechet(f, f_fp), 'self_fd256': frechet(f[:256], f_fp[:256]),
                 'pix_fd': frechet(s.reshape(len(s), -1), fp.reshape(len(fp), -1)),
                 'class_tv': float(0.5 * np.abs(classes(s) - h_fp).sum())})
  print(f'Spearman correlation with the digits-FID ({FLAGS.out_dir}, rows {FLAGS.prefix}*)')
  print('| group | rows | ' + ' | '.join(MEASURES) + ' |\n|---|---|' + '---|' * len(MEASURES))
  out = {'t': FLAGS.t, 'rows': rows, 'groups': {}}
  for g in FLAGS.groups:
    sub, fmax, mmax = g.split(':')
    grp = [x for x in rows if sub in x['name'] and x['fid'] < float(fmax) and x['mse'] < float(mmax)]
    if len(grp) < 4:
      continue
    rho = {m: float(spearmanr([x['fid'] for x in grp], [x[m] for x in grp])[0]) for m in MEASURES}
    out['groups'][g] = {'rows': len(grp), 'spearman': rho}
    print(f'| {g} | {len(grp)} | ' + ' | '.join(f'{rho[m]:+.2f}' for m in MEASURES) + ' |')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as fh:
      json.dump(out, fh, indent=1)


if __name__ == '__main__':
  app.run(main)
