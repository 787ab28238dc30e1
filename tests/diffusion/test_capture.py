"""One-pass calibration capture: what is stored is what the sampler fed its model, from one sampling pass."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from tcaq_jax.diffusion import CalibData, CaptureError, DDIMSampler, capture, sampler_coefficients, select_steps

CFG = {'family': 'ddim', 'name': 'gauss',
       'diffusion': {'beta_schedule': 'linear', 'beta_start': 1e-4, 'beta_end': 0.02, 'num_timesteps': 1000}}


def _gauss_eps(x, t, i, cond):
  ab = jnp.cumprod(1.0 - jnp.linspace(1e-4, 0.02, 1000))
  a = ab[t][:, None, None, None]
  return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * 0.3) / (a * 0.25 + 1 - a) + 0.01 * cond[:, None, None, None]


def test_select_steps():
  assert select_steps(100, 20).tolist() == [int(round(v)) for v in np.linspace(0, 99, 20)]
  assert select_steps(20, 20).tolist() == list(range(20))
  with pytest.raises(CaptureError, match='cannot select'):
    select_steps(10, 11)


def test_stored_xt_equals_the_samplers_own_trajectory(tmp_path):
  coeffs = sampler_coefficients(CFG, 30, 'quad', eta=1.0)     # eta=1: the noise path is part of x_t
  sampler = DDIMSampler(_gauss_eps, coeffs, shape=(4, 4, 2))
  n = 10
  cond = np.arange(n, dtype=np.float32)
  capture(sampler, str(tmp_path), num_samples=n, num_select=7, seed=5, batch_size=4, cond=cond)
  data = CalibData(str(tmp_path))
  steps = select_steps(30, 7)
  assert data.x.shape == (7, n, 4, 4, 2) and isinstance(data.x, np.memmap)
  np.testing.assert_array_equal(data.step_index, steps)
  np.testing.assert_array_equal(data.t, coeffs.timesteps[steps])
  np.testing.assert_array_equal(data.cond, cond)
  # the full trajectory, recorded at every step, one batch covering all samples (another batch split)
  full = np.asarray(sampler.sample(seed=5, start=0, batch_size=n, cond=cond, record='all')['recorded'])
  assert full.shape == (30, n, 4, 4, 2)
  np.testing.assert_allclose(np.asarray(data.x), full[steps], rtol=0, atol=1e-6)
  x, t, si, c = data.batch([0, n + 3, 6 * n + 9])
  np.testing.assert_array_equal(x[1], full[steps[1], 3])
  assert t.tolist() == [coeffs.timesteps[steps[0]], coeffs.timesteps[steps[1]], coeffs.timesteps[steps[6]]]
  assert si.tolist() == [steps[0], steps[1], steps[6]] and c.tolist() == [0.0, 3.0, 9.0]
  index = json.load(open(os.path.join(tmp_path, 'index.json')))
  assert index['num_samples'] == n and index['steps'] == steps.tolist()


def test_incomplete_capture_is_refused(tmp_path):
  with pytest.raises(CaptureError, match='index.json is missing'):
    CalibData(str(tmp_path))


@pytest.mark.slow
def test_demo_capture_256x20_is_one_sampling_pass(tmp_path):
  from tcaq_jax.assets import DEMO_UNET_DIR
  from tcaq_jax.models import family
  from tcaq_jax.models.configs import build_model, get_config
  if os.path.isfile(os.path.join(DEMO_UNET_DIR, 'config.json')):
    model, params, config = family.load(DEMO_UNET_DIR)
  else:  # before the asset exists: same architecture, random weights
    config = get_config('ddim_digits')
    model = build_model(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,), jnp.int32))['params']
  calls = []

  def counted(inner, x, t, i, cond):
    jax.debug.callback(lambda step: calls.append(int(step)), i)
    return inner(x, t, i, cond)

  eps_fn = Partial(counted, family.eps_fn(model, params, config))
  sampler = DDIMSampler(eps_fn, sampler_coefficients(config, 20, 'uniform', 0.0), (16, 16, 1))
  passes = []
  orig = sampler.sample
  sampler.sample = lambda *a, **k: passes.append(1) or orig(*a, **k)
  capture(sampler, str(tmp_path), num_samples=256, num_select=20, seed=0, batch_size=128)
  jax.effects_barrier()
  assert len(passes) == 2                       # 256 samples / batch 128: one sampler call per batch
  assert len(calls) == 2 * 20                   # one model call per trajectory step, no re-runs per step
  assert sorted(calls) == sorted(list(range(20)) * 2)
  data = CalibData(str(tmp_path))
  assert len(data) == 256 * 20 and data.x.shape == (20, 256, 16, 16, 1)
  assert np.isfinite(np.asarray(data.x[-1])).all()
