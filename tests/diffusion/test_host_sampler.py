"""HostLoopSampler (a Python loop over one jitted step) vs DDIMSampler (one lax.scan): same images, same recorded
x_t, for eta 0 and 1 and with classifier-free guidance; the eta-0 result also equals the float64 closed form of
tests/test_ddim_sampler.py. And eval.sample.generate gives the same images with either loop."""
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.diffusion import DDIMSampler, sampler_coefficients
from tcaq_jax.diffusion.host_sampler import HostLoopSampler, make_sampler, resolve_loop
from test_ddim_sampler import AB, CONFIG, analytic_final, gaussian_eps


def cond_eps(x, t, step_index, cond):
  """A toy conditional model: the Gaussian eps shifted by a per-sample label offset (cond [B] float)."""
  return gaussian_eps(x, t, step_index, None) + 0.05 * cond[:, None, None, None]


@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_host_loop_equals_scan(eta):
  coeffs = sampler_coefficients(CONFIG, 20, 'quad', eta=eta)
  a = DDIMSampler(gaussian_eps, coeffs, shape=(8, 8, 1)).sample(seed=3, start=5, batch_size=6, record=[0, 7, 19])
  b = HostLoopSampler(gaussian_eps, coeffs, shape=(8, 8, 1)).sample(seed=3, start=5, batch_size=6,
                                                                     record=[0, 7, 19])
  np.testing.assert_array_equal(np.asarray(a['x_T']), np.asarray(b['x_T']))
  np.testing.assert_allclose(np.asarray(b['recorded']), np.asarray(a['recorded']), atol=1e-5)
  np.testing.assert_allclose(np.asarray(b['images']), np.asarray(a['images']), atol=1e-5)
  if eta == 0.0:
    want = analytic_final(np.asarray(b['x_T']), coeffs.timesteps, 1.0)
    np.testing.assert_allclose(np.asarray(b['images']), want, atol=2e-5)
  else:  # the per-step noise is really used: differs from the deterministic trajectory
    det = HostLoopSampler(gaussian_eps, sampler_coefficients(CONFIG, 20, 'quad', eta=0.0), (8, 8, 1))
    assert np.abs(np.asarray(det.sample(3, 5, 6)['images']) - np.asarray(b['images'])).max() > 0.1


def test_host_loop_guidance_equals_scan():
  coeffs = sampler_coefficients(CONFIG, 10, 'uniform', eta=0.0)
  cond = jnp.arange(4, dtype=jnp.float32)
  uncond = jnp.zeros(4, jnp.float32)
  a = DDIMSampler(cond_eps, coeffs, (4, 4, 1), guidance_scale=3.0).sample(0, 0, 4, cond=cond, uncond=uncond)
  b = HostLoopSampler(cond_eps, coeffs, (4, 4, 1), guidance_scale=3.0).sample(0, 0, 4, cond=cond, uncond=uncond)
  np.testing.assert_allclose(np.asarray(b['images']), np.asarray(a['images']), atol=1e-5)
  plain = HostLoopSampler(cond_eps, coeffs, (4, 4, 1)).sample(0, 0, 4, cond=cond)
  assert np.abs(np.asarray(plain['images']) - np.asarray(b['images'])).max() > 1e-3


def test_make_sampler_picks_and_rejects():
  coeffs = sampler_coefficients(CONFIG, 5, 'uniform')
  assert isinstance(make_sampler(gaussian_eps, coeffs, (4, 4, 1), loop='host'), HostLoopSampler)
  assert isinstance(make_sampler(gaussian_eps, coeffs, (4, 4, 1), loop='device'), DDIMSampler)
  assert resolve_loop('auto') == 'host'          # the CPU backend (tests run on CPU)
  with pytest.raises(ValueError, match='scan'):
    make_sampler(gaussian_eps, coeffs, (4, 4, 1), loop='scan')


def test_generate_same_images_either_loop():
  from tcaq_jax.assets import DEMO_UNET_DIR
  from tcaq_jax.eval.sample import generate
  kw = dict(num_samples=4, batch_size=4, steps=4, skip_type='uniform', eta=0.0, seed=2, progress=False)
  host = generate(DEMO_UNET_DIR, sampler_loop='host', **kw)
  dev = generate(DEMO_UNET_DIR, sampler_loop='device', **kw)
  assert host.dtype == np.uint8 and host.shape == (4, 16, 16, 1)
  assert np.abs(host.astype(int) - dev.astype(int)).max() <= 1      # uint8 rounding of ~1e-6 float differences


def test_padded_batches_keep_the_same_samples_and_one_batch_size():
  """sample_batches(pad=True) samples a last partial batch at the full batch size (one compiled program) and
  drops the extra samples: images, x_T and recorded x_t equal the unpadded run's, cond rows line up."""
  from tcaq_jax.diffusion.batched import sample_all, sample_batches
  coeffs = sampler_coefficients(CONFIG, 6, 'uniform', eta=1.0)
  sampler = HostLoopSampler(cond_eps, coeffs, (4, 4, 1))
  sizes = []
  real = sampler.sample
  sampler.sample = lambda *a, **k: sizes.append(a[2]) or real(*a, **k)
  cond = np.arange(7, dtype=np.float32)
  plain = list(sample_batches(sampler, 7, 4, seed=2, cond=cond, record=[1, 4]))
  assert sizes == [4, 3]
  padded = list(sample_batches(sampler, 7, 4, seed=2, cond=cond, record=[1, 4], pad=True))
  assert sizes[2:] == [4, 4]
  for (sa, a), (sb, b) in zip(plain, padded):
    assert sa == sb
    for key in ('images', 'x_T', 'x_final', 'recorded'):
      assert b[key].shape == a[key].shape
      np.testing.assert_allclose(np.asarray(b[key]), np.asarray(a[key]), atol=1e-6)
  one = sample_all(sampler, 3, 8, seed=2, cond=cond[:3], pad=True)
  assert sizes[-1] == 8 and one.shape[0] == 3
  np.testing.assert_allclose(one, np.asarray(plain[0][1]['images'])[:3], atol=1e-6)
