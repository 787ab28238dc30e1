"""The calibrate CLI's end-of-run demo quality check runs inside the pipeline (its FP half on a thread started by
Hooks.after_capture, the quantized half in Hooks.after_run) with the run's own samplers; its samples and scores
equal an independent sampling of the saved run dir (load_quantized + a fresh sampler), report.json carries them
with the phase time, and a second check takes the FP half from the cache the first one wrote (--demo_fp_cache)."""
import json
import os

import numpy as np

from tcaq_jax.demo.classifier import demo_quality
from tcaq_jax.diffusion.batched import sample_all
from tcaq_jax.diffusion.ddim import sampler_coefficients
from tcaq_jax.diffusion.host_sampler import make_sampler
from tcaq_jax.images import to_uint8
from tcaq_jax.models import family
from tcaq_jax.quantized import load_quantized
from tcaq_jax.demo.classifier import load_classifier
from tcaq_jax.train.calibrate import DemoQuality, demo_quality_check, fp_key, summary_lines, write_fp_reference
from tcaq_jax.train.pipeline import Hooks, run


def test_demo_quality_after_run_matches_an_independent_sampling(tmp_path):
  n = 12
  out = str(tmp_path / 'demo_minmax')
  cfg = dict(method='minmax', w_bits=8, a_bits=8, num_steps=4, calib_steps=2, calib_samples=4, capture_batch=8,
             forward_batch=8, act_batch=4, png_samples=0, progress=False, out_dir=out)
  cache = str(tmp_path / 'fp_cache')

  quality = DemoQuality(n, cache, start_round=0)    # the CLI's hooks (its FP half from the round-0 capture on)

  ref = str(tmp_path / 'fp_reference.json')

  def twice(setup, q):        # the second check reads the FP half from the cache the first one wrote
    assert quality._fp is not None            # started by after_capture, on its own thread
    first = quality.after_run(setup, q)['demo_quality']
    # a reference file (as shipped for the demo's defaults) is used only for an entry with the same key
    key = fp_key(setup, load_classifier()[1], n)
    write_fp_reference(ref, dict(key, n=n + 1), dict(first['fp'], fid=99.0))
    other = demo_quality_check(setup, q, n, '', reference=ref)
    write_fp_reference(ref, key, first['fp'])
    return {'demo_quality': first, 'again': demo_quality_check(setup, q, n, cache), 'other': other,
            'from_ref': demo_quality_check(setup, q, n, '', reference=ref)}

  report = run(cfg, Hooks(after_capture=quality.after_capture, after_run=twice))
  dq, again = report['demo_quality'], report['again']
  assert 'cached' not in dq['fp'] and again['fp']['cached'] is True and len(os.listdir(cache)) == 1
  other, from_ref = report['other']['fp'], report['from_ref']['fp']
  assert 'reference' not in other and other['fid'] == dq['fp']['fid']           # sampled again, not 99.0
  assert from_ref['reference'] is True and from_ref['fid'] == dq['fp']['fid'] and from_ref['n'] == n
  assert len(json.load(open(ref))['entries']) == 2
  assert any('shipped reference' in ln for ln in summary_lines({**report, 'demo_quality': report['from_ref']}))
  assert again['fp']['fid'] == dq['fp']['fid'] and again['quantized'] == dq['quantized'] | {
      'seconds': again['quantized']['seconds']}
  with open(os.path.join(out, 'report.json')) as f:
    assert json.load(f)['demo_quality']['quantized']['fid'] == dq['quantized']['fid']
  assert report['phases_this_process']['after_run_s'] > 0
  q = load_quantized(out)
  coeffs = sampler_coefficients(q.config, 4, 'quad', 0.0)
  for name, eps in (('fp', family.eps_fn(q.model, q.params, q.config)), ('quantized', q.eps_fn)):
    images = sample_all(make_sampler(eps, coeffs, family.sample_shape(q.config)), n, 8, seed=1234,
                        convert=to_uint8)
    ref = demo_quality(images)
    assert dq[name]['n'] == n
    np.testing.assert_allclose(dq[name]['fid'], ref['fid'], rtol=1e-6)
    assert dq[name]['confident_fraction'] == ref['confident_fraction']
  assert any('demo quality, 12 samples' in ln for ln in summary_lines(report))


def test_grid_shows_the_quality_checks_own_samples(tmp_path):
  """With Hooks.grid_images (the CLI's), samples.png is the first --png_samples of the check's quantized samples
  (seed 1234), checked against an independent sampling of the saved run; the grid's own seed (seed + 1) would
  have drawn other images."""
  from PIL import Image

  from tcaq_jax.images import grid_scale, save_grid

  n, png_n = 8, 4
  cfg = dict(method='minmax', w_bits=8, a_bits=8, num_steps=4, calib_steps=2, calib_samples=4, capture_batch=8,
             forward_batch=8, act_batch=4, png_samples=png_n, progress=False, out_dir=str(tmp_path / 'run'))
  quality = DemoQuality(n, '', start_round=0)
  report = run(cfg, Hooks(after_capture=quality.after_capture, after_run=quality.after_run,
                          grid_images=quality.grid_images))
  assert report['phases_this_process']['sample_grid_s'] < report['phases_this_process']['after_run_s']
  q = load_quantized(cfg['out_dir'])
  sampler = make_sampler(q.eps_fn, sampler_coefficients(q.config, 4, 'quad', 0.0), family.sample_shape(q.config))
  got = np.asarray(Image.open(os.path.join(cfg['out_dir'], 'samples.png')))
  for seed, same in ((1234, True), (q.meta['config']['seed'] + 1, False)):
    images = sample_all(sampler, n, 8, seed=seed, convert=to_uint8)
    expect = str(tmp_path / f'expect_{seed}.png')
    save_grid(expect, images[:png_n], scale=grid_scale(images.shape[2]))
    assert np.array_equal(got, np.asarray(Image.open(expect))) == same, seed
