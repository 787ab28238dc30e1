"""How much of a digits-FID difference between two demo-table rows is sampling noise: both rows' samples (the same
initial noise, --sample_seed, as bench/demo_table.py draws them; saved as <table>/samples/<row>.npy and reused) are
resampled *jointly* (the same sample indices for both rows, and for the real digits) and the FID difference is
recomputed per draw. Prints one table (each row's FID, the difference, its paired-bootstrap std and 95% interval,
the share of draws where the second row is better) and writes <table>/fid_paired.json.

  PYTHONPATH=. python bench/fid_paired.py --out runs/demo_table_2k --num_samples=2000 --pairs=tcaq_w6a6:qdiff_w6a6
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags, logging  # noqa: E402
import numpy as np  # noqa: E402

import demo_table  # noqa: E402  (its --out, --num_samples, --num_steps, --sample_seed flags)
from tcaq_jax import atomic_io  # noqa: E402
from tcaq_jax.demo.classifier import classify, load_classifier  # noqa: E402
from tcaq_jax.demo.data import load_digits_16  # noqa: E402
from tcaq_jax.eval.metrics import feature_stats, frechet_distance  # noqa: E402
from tcaq_jax.quantized import load_quantized  # noqa: E402

flags.DEFINE_list('pairs', ['tcaq_w6a6:qdiff_w6a6'], 'row pairs a:b (names as in the table; fp = the FP model)')
flags.DEFINE_integer('draws', 200, 'bootstrap draws')
FLAGS = flags.FLAGS


@functools.cache
def row_samples(name: str) -> np.ndarray:
  """The row's --num_samples samples (FP: the table's fp_samples.npy), sampled once and kept in <out>/samples
  (and in memory: each row is read once per run)."""
  if name == 'fp':
    return np.load(os.path.join(FLAGS.out, demo_table.FP_SAMPLES))
  path = demo_table.samples_path(FLAGS.out, name)
  if os.path.exists(path):
    return np.load(path)
  q = load_quantized(os.path.join(FLAGS.out, name))
  images = demo_table.sample(q.eps_fn, q.config, FLAGS.num_samples, FLAGS.num_steps, seed=FLAGS.sample_seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path, images)
  return images


def paired_bootstrap(fr: np.ndarray, fa: np.ndarray, fb: np.ndarray, draws: int, seed: int = 0) -> dict:
  """FID(a) - FID(b) on `draws` joint resamples (real features fr; generated fa, fb drawn with the same indices)."""
  rng = np.random.default_rng(seed)
  fid = lambda r, g: frechet_distance(*feature_stats(r), *feature_stats(g))  # noqa: E731
  diffs = []
  for _ in range(draws):
    ir, ig = rng.integers(0, len(fr), len(fr)), rng.integers(0, len(fa), len(fa))
    diffs.append(fid(fr[ir], fa[ig]) - fid(fr[ir], fb[ig]))
  d = np.asarray(diffs)
  return {'diff': float(fid(fr, fa) - fid(fr, fb)), 'std': float(d.std()), 'lo95': float(np.percentile(d, 2.5)),
          'hi95': float(np.percentile(d, 97.5)), 'b_better_share': float(np.mean(d > 0))}


def main(argv):
  del argv
  clf, params = load_classifier()
  fr = np.asarray(classify(clf, params, load_digits_16()[0])[0])
  feats = {}
  out = []
  for pair in FLAGS.pairs:
    a, b = pair.split(':')
    for name in (a, b):
      if name not in feats:
        feats[name] = np.asarray(classify(clf, params, row_samples(name))[0])
        logging.info('%s: features of %d samples', name, len(feats[name]))
    res = paired_bootstrap(fr, feats[a], feats[b], FLAGS.draws)
    mse = float(np.mean((row_samples(a) - row_samples(b)) ** 2))
    out.append({'a': a, 'b': b, 'fid_a': frechet_distance(*feature_stats(fr), *feature_stats(feats[a])),
                'fid_b': frechet_distance(*feature_stats(fr), *feature_stats(feats[b])), 'mse_ab': mse, **res})
  print(f'| a | b | FID a | FID b | a - b | paired std | 95% interval | share b better | {FLAGS.draws} draws |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in out:
    print(f"| {r['a']} | {r['b']} | {r['fid_a']:.3f} | {r['fid_b']:.3f} | {r['diff']:+.3f} | {r['std']:.3f} | "
          f"[{r['lo95']:+.3f}, {r['hi95']:+.3f}] | {r['b_better_share']:.2f} | |")
  atomic_io.write_json(os.path.join(FLAGS.out, 'fid_paired.json'),
                       {'num_samples': FLAGS.num_samples, 'sample_seed': FLAGS.sample_seed, 'draws': FLAGS.draws,
                        'pairs': out}, indent=1)


if __name__ == '__main__':
  app.run(main)
