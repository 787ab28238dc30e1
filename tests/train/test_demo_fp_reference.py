"""The shipped FP half of the demo quality check (tcaq_jax/assets/demo_fp_quality.json, written by
bench/demo_fp_reference.py) is keyed by the demo's default settings: the calibrate CLI at default flags finds it.
If this fails, the demo model, classifier or the check's defaults changed: re-run bench/demo_fp_reference.py."""
import json

import jax

from tcaq_jax.assets import DEMO_FP_REFERENCE
from tcaq_jax.demo.classifier import load_classifier
from tcaq_jax.train import calibrate
from tcaq_jax.train.config import Config
from tcaq_jax.train.pipeline import Setup


def test_the_shipped_reference_matches_the_default_demo_settings(tmp_path):
  setup = Setup(Config.from_flat({'out_dir': str(tmp_path)}).resolve())
  key = calibrate.fp_key(setup, load_classifier()[1], 256)
  if jax.default_backend() != 'cpu':
    key['backend'] = 'cpu'                              # the shipped entry is the CPU one
  entry = calibrate.read_fp_reference(DEMO_FP_REFERENCE, key)
  assert entry is not None, f'no entry for {key} in {DEMO_FP_REFERENCE}: re-run bench/demo_fp_reference.py'
  res = entry['result']
  assert res['n'] == 256 and 0 < res['fid'] < 50 and 0.5 < res['confident_fraction'] <= 1
  with open(DEMO_FP_REFERENCE) as f:
    assert len(json.load(f)['entries']) >= 1
