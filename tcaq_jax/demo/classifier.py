"""The demo's feature network: a small Flax CNN on the 16x16 digits (data: `tcaq_jax.demo.data`).

The classifier's penultimate layer (64-d) is the demo's FID feature space; its softmax gives the
"classifier confidence" quality check.

  images, labels = load_digits_16()               # tcaq_jax.demo.data
  clf, params = load_classifier()                 # the shipped tcaq_jax/assets/digit_classifier
  feats, probs = classify(clf, params, images)    # [N, 64], [N, 10]

Train it (the command that made the shipped asset is in tcaq_jax/assets/README.md), or score samples:
  python -m tcaq_jax.demo.classifier --out_dir tcaq_jax/assets/digit_classifier
  python -m tcaq_jax.demo.classifier --evaluate samples/demo/samples_1000x16x16x1.npz

--evaluate takes an .npz (arr_0 / images / samples) of uint8 images or float images in [-1, 1], checked
(`tcaq_jax.demo.data.to_model_input`: [0, 1] floats, other dtypes, shapes and unreadable files end in one
`error: ...` line naming the file). Fewer samples than the 64 feature dimensions still give an FID, with a
`warning: ...` line on stderr and in the result's 'warnings' (see `tcaq_jax.eval.metrics`).
"""
from __future__ import annotations

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tcaq_jax.assets import CLASSIFIER_DIR
from tcaq_jax.demo.data import DemoDataError, load_digits_16, load_images_npz, to_model_input

__all__ = ['CLASSIFIER_CONFIG', 'DigitClassifier', 'load_classifier', 'classify', 'train_classifier',
           'demo_quality']

CLASSIFIER_CONFIG = {'family': 'digit_classifier', 'name': 'digit_classifier', 'resolution': 16,
                     'features': [32, 64], 'hidden': 64, 'num_classes': 10}


class DigitClassifier(nn.Module):
  """x: [B, 16, 16, 1] in [-1, 1] -> (features [B, hidden], logits [B, num_classes])."""
  config: dict

  @nn.compact
  def __call__(self, x):
    h = x
    for i, f in enumerate(self.config['features']):
      h = nn.Conv(f, (3, 3), padding='SAME', name=f'conv_{i}')(h)
      h = nn.relu(h)
      h = nn.avg_pool(h, (2, 2), (2, 2))
    h = h.reshape(h.shape[0], -1)
    feats = nn.relu(nn.Dense(self.config['hidden'], name='fc')(h))
    return feats, nn.Dense(self.config['num_classes'], name='head')(feats)


def load_classifier(directory: str = CLASSIFIER_DIR):
  """-> (DigitClassifier, params) from a model dir written by `checkpoint.save_model_dir`."""
  from tcaq_jax.checkpoint import load_model_dir
  params, config = load_model_dir(directory)
  return DigitClassifier(config), jax.tree.map(jnp.asarray, params)


def classify(model: DigitClassifier, params, images, batch_size: int = 500,
             name: str = 'images') -> tuple[np.ndarray, np.ndarray]:
  """images: [N, 16, 16(, 1)] float in [-1, 1] or uint8 -> (features [N, hidden], probabilities [N, 10]).

  Other dtypes, floats outside [-1, 1] or NaN, wrong shapes raise DemoDataError naming `name`
  (`demo.data.to_model_input`; [0, 1] float files are refused where they are read, `load_images_npz`).
  """
  images = to_model_input(images, name, model.config['resolution'])
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, x))
  feats, probs = [], []
  for i in range(0, images.shape[0], batch_size):
    f, logits = fwd(params, jnp.asarray(images[i:i + batch_size], jnp.float32))
    feats.append(np.asarray(f))
    probs.append(np.asarray(jax.nn.softmax(logits)))
  return np.concatenate(feats), np.concatenate(probs)


def train_classifier(images, labels, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0):
  """Adam + light augmentation (1-pixel shifts, Gaussian pixel noise). Returns (model, params)."""
  model = DigitClassifier(CLASSIFIER_CONFIG)
  key = jax.random.PRNGKey(seed)
  params = model.init(key, jnp.zeros((1, 16, 16, 1)))['params']
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  opt_state = tx.init(params)
  x_all, y_all = jnp.asarray(images), jnp.asarray(labels)

  @jax.jit
  def step(params, opt_state, key):
    k1, k2, k3 = jax.random.split(key, 3)
    idx = jax.random.randint(k1, (batch_size,), 0, x_all.shape[0])
    x, y = x_all[idx], y_all[idx]
    shifts = jax.random.randint(k2, (2,), -1, 2)
    x = jnp.roll(x, shifts, axis=(1, 2))
    x = x + 0.1 * jax.random.normal(k3, x.shape)

    def loss_fn(p):
      _, logits = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(steps):
    params, opt_state, _ = step(params, opt_state, jax.random.fold_in(key, i + 1))
  return model, params


def demo_quality(images, classifier=None, params=None, confidence: float = 0.9, seed: int = 0,
                 name: str = 'images') -> dict:
  """Quality of demo samples in the classifier's space.

  images: [N, 16, 16, 1] uint8 or float in [-1, 1] (checked; errors name `name`). Returns {'n',
  'confident_fraction' (share of samples whose max softmax >= confidence), 'fid' (samples vs all 1797 real
  digits, 64-d penultimate features), 'fid_floor' (a random half of the real digits vs the other half),
  'class_histogram', 'warnings' (one line each; e.g. N <= 64 samples make the FID biased)}.
  """
  from tcaq_jax.eval.metrics import MetricError, feature_stats, frechet_distance, sample_size_warning
  if classifier is None:
    classifier, params = load_classifier()
  real, _ = load_digits_16()
  f_real, _ = classify(classifier, params, real)
  f_fake, p_fake = classify(classifier, params, images, name=name)
  if p_fake.shape[0] < 2:
    raise DemoDataError(f'{name}: the FID needs at least 2 images, got {p_fake.shape[0]}')
  msg = sample_size_warning(p_fake.shape[0], f_fake.shape[1], f'FID of {name}')
  perm = np.random.default_rng(seed).permutation(real.shape[0])
  half = real.shape[0] // 2
  try:
    fid = frechet_distance(*feature_stats(f_fake), *feature_stats(f_real))
  except MetricError as e:
    raise DemoDataError(f'{name}: {e}') from e
  floor = frechet_distance(*feature_stats(f_real[perm[:half]]), *feature_stats(f_real[perm[half:]]))
  return {'n': int(p_fake.shape[0]), 'confident_fraction': float((p_fake.max(-1) >= confidence).mean()),
          'fid': float(fid), 'fid_floor': float(floor),
          'class_histogram': np.bincount(p_fake.argmax(-1), minlength=10).tolist(),
          'warnings': [msg] if msg else []}


def evaluate_file(path: str) -> dict:
  """`--evaluate PATH`: demo_quality of the images in an .npz, checked before any model is loaded."""
  return demo_quality(load_images_npz(path), name=path)


def _check_flags(f) -> None:
  if f.steps < 1:
    raise DemoDataError(f'--steps={f.steps}: must be a positive integer')
  if not 1 <= f.num_test < 1797:
    raise DemoDataError(f'--num_test={f.num_test}: must be in [1, 1796] (1,797 digits in all)')


def _main(argv):
  del argv
  from absl import flags, logging
  from tcaq_jax.checkpoint import save_model_dir
  f = flags.FLAGS
  if f.evaluate:
    import json
    result = evaluate_file(f.evaluate)
    for w in result['warnings']:
      print(f'warning: {w}', file=sys.stderr)
    print(json.dumps(result, indent=1, allow_nan=False))
    return
  _check_flags(f)
  images, labels = load_digits_16()
  rng = np.random.default_rng(0)
  perm = rng.permutation(images.shape[0])
  n_test = f.num_test
  test, train = perm[:n_test], perm[n_test:]
  t0 = time.time()
  model, params = train_classifier(images[train], labels[train], steps=f.steps, seed=f.seed)
  _, probs = classify(model, params, images[test])
  acc = float((probs.argmax(-1) == labels[test]).mean())
  logging.info('held-out accuracy %.4f on %d images (%.0f s)', acc, n_test, time.time() - t0)
  if f.final_all:  # the shipped classifier sees every image; its held-out accuracy is reported above
    model, params = train_classifier(images, labels, steps=f.steps, seed=f.seed)
  save_model_dir(f.out_dir, params, CLASSIFIER_CONFIG,
                 extra={'heldout_accuracy': acc, 'num_test': n_test, 'steps': f.steps, 'seed': f.seed,
                        'trained_on_all': bool(f.final_all)})
  logging.info('wrote %s', f.out_dir)


def define_flags():
  from absl import flags
  flags.DEFINE_string('out_dir', CLASSIFIER_DIR, 'model dir to write')
  flags.DEFINE_integer('steps', 1500, 'Adam steps')
  flags.DEFINE_integer('num_test', 297, 'held-out images for the accuracy estimate')
  flags.DEFINE_integer('seed', 0, 'seed')
  flags.DEFINE_bool('final_all', True, 'retrain on all 1797 images after the held-out estimate')
  flags.DEFINE_string('evaluate', None, 'instead of training: print demo_quality of the images in this .npz '
                      '(uint8, or float in [-1, 1])')


if __name__ == '__main__':   # run the package module's main: its error classes are then tcaq_jax's, not __main__'s
  from tcaq_jax import cli
  from tcaq_jax.demo import classifier as _classifier
  _classifier.define_flags()
  cli.run(_classifier._main)
