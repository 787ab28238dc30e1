"""The real-size path of the calibration CLI: the CIFAR-10 W4A8 flagfile on a random-weight ddim_cifar10
(a file of its own so that pytest-xdist runs it beside tests/train/test_pipeline.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tcaq_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_cifar10_w4a8_flagfile_end_to_end_random_weights(tmp_path):
  """The real-size path: the CIFAR-10 W4A8 flagfile on a random-weight ddim_cifar10 (35.7M params), with tiny
  calibration / sampling sizes, 0.1% of the iterations and two reconstructed units (the rest keep their
  initialisation: TCR, Lp weight scales, per-step activation scales, DAQ), one PAR round, no sample grid, the eps
  bias fit and the reconstruction gate on 2 samples each."""
  out = str(tmp_path / 'cifar')
  cmd = [sys.executable, '-m', 'tcaq_jax.train.calibrate', '--flagfile', os.path.join(ROOT, 'configs',
         'cifar10_w4a8.flags'), '--model_dir=', '--model_config=ddim_cifar10', f'--out_dir={out}',
         '--iters_scale=0.001', '--calib_samples=2', '--calib_steps=2', '--num_steps=4',
         '--recon_units=^(down_0/block_1|down_1/attn_0)$', '--png_samples=0', '--act_batch=2', '--forward_batch=4',
         '--capture_batch=2', '--eval_units=false', '--par_rounds=1', '--eps_bias_samples=2', '--gate_samples=2']
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, 'report.json')) as f:
    report = json.load(f)
  assert report['model'] == 'ddim_cifar10' and report['bits']['w'] == 4
  assert [u['unit'] for u in report['units']] == ['down_0/block_1', 'down_1/attn_0'] * 2
  scores = {e['stage']: e['score'] for e in report['gate']}
  assert list(scores) == ['init', 'round0', 'round1'] and report['gate_kept'] == min(scores, key=scores.get)
  assert report['policy_summary']['conv']['split'] == 12          # 4 up levels x 3 concat blocks
  ckpt = checkpoint.restore(out)
  assert ckpt['meta']['progress']['done']
  qs = ckpt['qstate']['layers']
  assert np.asarray(qs['up_3.block_0.nin_shortcut']['a_scale']).shape == (2, 2)   # 2 slots x split
