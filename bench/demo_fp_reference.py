"""Writes the FP half of the demo's end-of-run quality check (256 samples of the shipped FP model at the default
calibrate flags, scored by the demo digit classifier) into tcaq_jax/assets/demo_fp_quality.json, the reference
`python -m tcaq_jax.train.calibrate` reads instead of sampling it on every first run. The FP model, the sample
seeds and the sampler settings are fixed, so the result is a constant of the shipped demo (the entry is keyed by
all of them and by the backend; the JAX version that computed it is stored beside it). Re-run it after changing
the demo model, the classifier, the sampler or the check's defaults; tests/train/test_demo_fp_reference.py fails
while the shipped entry no longer matches the defaults.

  PYTHONPATH=. python bench/demo_fp_reference.py           # ~1 min on 2 cores; prints the entry
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from absl import app, flags

from tcaq_jax.assets import DEMO_FP_REFERENCE
from tcaq_jax.demo.classifier import load_classifier
from tcaq_jax.train import calibrate
from tcaq_jax.train.config import Config
from tcaq_jax.train.pipeline import Setup

flags.DEFINE_integer('n', 256, 'samples (the calibrate CLI\'s --demo_eval_samples default)')
flags.DEFINE_string('out', DEMO_FP_REFERENCE, 'reference file to add the entry to')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True,
                          text=True).stdout.strip()
  setup = Setup(Config.from_flat({'out_dir': tempfile.mkdtemp(prefix='demo_fp_reference_')}).resolve())
  fp, _ = calibrate.fp_half(setup, FLAGS.n)                    # no cache, no reference: sampled here
  key = calibrate.fp_key(setup, load_classifier()[1], FLAGS.n)
  calibrate.write_fp_reference(FLAGS.out, key, fp, commit)
  print(f'{FLAGS.out}: FP FID {fp["fid"]:.4f}, confident {fp["confident_fraction"]:.4f} ({fp["seconds"]:.0f} s)',
        file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
