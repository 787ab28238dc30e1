"""DDIM sampler vs closed forms on Gaussian data, eta=1 vs the DDPM posterior variance, device-count invariance.

Data x0 ~ N(mu, s^2 I). Then x_t ~ N(sqrt(a) mu, v_t I) with v_t = a s^2 + 1 - a and the exact (MMSE) noise
prediction is eps(x_t) = sqrt(1 - a) (x_t - sqrt(a) mu) / v_t. With it, one deterministic DDIM step maps the
standardised z = (x_t - sqrt(a) mu) / sqrt(v_t) to x' = sqrt(a') mu + z (sqrt(a a') s^2 + sqrt((1-a)(1-a'))) / sqrt(v_t)
(derived by hand; computed below in float64 NumPy), and as the steps get finer the map sends N(0, I)-ish x_T
to N(mu, s^2) (the ODE preserves marginals).
"""
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.diffusion import DDIMSampler, sampler_coefficients
from tcaq_jax.diffusion.ddim import ddim_trajectory
from tcaq_jax.diffusion.schedules import alphas_cumprod, beta_schedule

MU, S = 0.3, 0.5
CONFIG = {'family': 'ddim', 'name': 'gauss',
          'diffusion': {'beta_schedule': 'linear', 'beta_start': 1e-4, 'beta_end': 0.02, 'num_timesteps': 1000}}
AB = alphas_cumprod(beta_schedule('linear', 1e-4, 0.02, 1000))


def gaussian_eps(x, t, step_index, cond):
  a = jnp.asarray(AB, jnp.float32)[t][:, None, None, None]
  return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S ** 2 + 1 - a)


def analytic_final(x_T, seq_desc, a_final):
  """float64 closed form of the deterministic DDIM map for Gaussian data."""
  a = AB[seq_desc]
  a_prev = np.concatenate([a[1:], [a_final]])
  z = (np.float64(x_T) - np.sqrt(a[0]) * MU) / np.sqrt(a[0] * S ** 2 + 1 - a[0])
  for at, ap in zip(a, a_prev):
    v, vp = at * S ** 2 + 1 - at, ap * S ** 2 + 1 - ap
    z = z * (np.sqrt(at * ap) * S ** 2 + np.sqrt((1 - at) * (1 - ap))) / np.sqrt(v) / np.sqrt(vp)
  vp = a_final * S ** 2 + 1 - a_final
  return np.sqrt(a_final) * MU + z * np.sqrt(vp)


@pytest.mark.parametrize('skip_type,steps,style', [('quad', 100, 'ddim'), ('uniform', 20, 'ddim'),
                                                   ('uniform', 50, 'ldm')])
def test_eta0_matches_closed_form(skip_type, steps, style):
  coeffs = sampler_coefficients(CONFIG, steps, skip_type, eta=0.0, style=style)
  sampler = DDIMSampler(gaussian_eps, coeffs, shape=(8, 8, 1))
  out = sampler.sample(seed=1, start=0, batch_size=16)
  a_final = 1.0 if style == 'ddim' else AB[0]
  want = analytic_final(np.asarray(out['x_T']), coeffs.timesteps, a_final)
  np.testing.assert_allclose(np.asarray(out['images']), want, rtol=0, atol=2e-5)


def test_eta0_fine_steps_maps_marginal_to_data_distribution():
  coeffs = sampler_coefficients(CONFIG, 1000, 'uniform', eta=0.0)
  sampler = DDIMSampler(gaussian_eps, coeffs, shape=(16, 16, 1))
  x = np.asarray(sampler.sample(seed=0, start=0, batch_size=64)['images'])  # 16,384 values
  # x_T ~ N(0, 1) vs the true marginal N(sqrt(a_T) mu, v_T) differ by O(1e-4); the ODE error is O(1/1000).
  assert abs(x.mean() - MU) < 4 * S / np.sqrt(x.size) + 1e-3
  assert abs(x.std() - S) < 0.02 * S
  # the closed-form map's gain on the standardised x_T: equal to s up to the discretisation error
  gain = analytic_final(np.ones(1), coeffs.timesteps, 1.0) - analytic_final(np.zeros(1), coeffs.timesteps, 1.0)
  assert abs(gain[0] - S) < 2e-3


def test_eta1_sigma_is_ddpm_posterior_std():
  betas = beta_schedule('linear', 1e-4, 0.02, 1000)
  for steps, skip in ((1000, 'uniform'), (100, 'quad'), (50, 'uniform')):
    c = sampler_coefficients(CONFIG, steps, skip, eta=1.0)
    for t, tp, sig in zip(c.timesteps[:-1], c.timesteps[1:], c.sigmas[:-1]):
      a_t, a_s = AB[t], AB[tp]
      if t == tp:
        assert sig == 0.0
        continue
      # posterior q(x_s | x_t, x0) by Gaussian conjugacy: prior N(.., 1 - a_s), likelihood variance 1 - a_t/a_s
      var = 1.0 / (1.0 / (1.0 - a_s) + (a_t / a_s) / (1.0 - a_t / a_s))
      if steps == 1000:  # consecutive steps: the textbook beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
        np.testing.assert_allclose(var, betas[t] * (1 - AB[t - 1]) / (1 - AB[t]), rtol=1e-9)
      np.testing.assert_allclose(sig ** 2, var, rtol=1e-9)


def test_eta1_sampler_adds_noise_with_sigma():
  coeffs = sampler_coefficients(CONFIG, 10, 'uniform', eta=1.0)
  consts = {k: np.asarray(getattr(coeffs, k), np.float32 if k != 'timesteps' else np.int32)
            for k in ('timesteps', 'alphas', 'alphas_prev', 'sigmas')}
  from tcaq_jax.diffusion.ddim import initial_noise, sample_keys
  keys = sample_keys(0, 0, 64)
  x_T = initial_noise(keys, (16, 16, 1))
  x_final, xs = ddim_trajectory(gaussian_eps, consts, x_T, keys, record='all')
  xs = np.concatenate([np.asarray(xs), np.asarray(x_final)[None]])
  for i in range(coeffs.num_steps):
    a, ap, sig, t = coeffs.alphas[i], coeffs.alphas_prev[i], coeffs.sigmas[i], coeffs.timesteps[i]
    x = xs[i].astype(np.float64)
    eps = np.sqrt(1 - a) * (x - np.sqrt(a) * MU) / (a * S ** 2 + 1 - a)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    resid = xs[i + 1] - (np.sqrt(ap) * x0 + np.sqrt(1 - ap - sig ** 2) * eps)
    if sig == 0:  # the last ddim-style step lands on alpha_bar = 1 with no noise
      assert np.abs(resid).max() < 1e-5
      continue
    assert abs(resid.std() / sig - 1) < 0.05, (i, resid.std(), sig)
    assert abs(resid.mean()) < 5 * sig / np.sqrt(resid.size)


def test_guidance_combines_eps():
  def eps_fn(x, t, i, cond):  # cond: [B] scalar per sample; eps = cond broadcast
    return jnp.zeros_like(x) + cond[:, None, None, None]
  coeffs = sampler_coefficients(CONFIG, 5, 'uniform', eta=0.0)
  consts = {k: np.asarray(getattr(coeffs, k)) for k in ('timesteps', 'alphas', 'alphas_prev', 'sigmas')}
  x_T = jnp.zeros((2, 2, 2, 1))
  cond, uncond = jnp.array([1.0, 2.0]), jnp.array([0.5, 0.5])
  got, _ = ddim_trajectory(eps_fn, consts, x_T, cond=cond, uncond=uncond, guidance_scale=3.0, use_noise=False,
                           use_guidance=True)
  ref, _ = ddim_trajectory(eps_fn, consts, x_T, cond=0.5 + 3.0 * (cond - 0.5), use_noise=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6)


_SHARD_SCRIPT = textwrap.dedent('''
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from tcaq_jax.diffusion import DDIMSampler, sampler_coefficients
  from tcaq_jax.models import family
  from tcaq_jax.models.configs import build_model

  MU, S, AB = 0.3, 0.5, None
  CFG = {'family': 'ddim', 'name': 'shard_test', 'in_channels': 1, 'out_ch': 1, 'resolution': 8, 'ch': 32,
         'ch_mult': [1, 2], 'num_res_blocks': 1, 'attn_resolutions': [4], 'dropout': 0.0,
         'diffusion': {'beta_schedule': 'linear', 'beta_start': 1e-4, 'beta_end': 0.02, 'num_timesteps': 1000}}

  def run():
    """Two batches of 6 (6 does not split over 4 devices: padded to 8 and cut back), eta = 1 (noise)."""
    from tcaq_jax.diffusion.schedules import schedule_from_config
    ab = jnp.asarray(schedule_from_config(CFG), jnp.float32)
    def gauss_eps(x, t, i, cond):
      a = ab[t][:, None, None, None]
      return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * S ** 2 + 1 - a)
    model = build_model(CFG)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))['params']
    out = {}
    for name, fn, steps in (('gauss', gauss_eps, 20), ('unet', family.eps_fn(model, params, CFG), 4)):
      sampler = DDIMSampler(fn, sampler_coefficients(CFG, steps, 'uniform', eta=1.0), (8, 8, 1))
      out[name] = np.concatenate([np.asarray(sampler.sample(seed=3, start=s, batch_size=6)['images'])
                                  for s in (0, 6)])
    return out, sampler.mesh.devices.size

  if __name__ == '__main__':
    out, n = run()
    np.savez(sys.argv[1], **out)
    print(len(jax.devices()), n)
''')


@pytest.mark.slow
def test_four_devices_give_the_same_images_as_one(tmp_path):
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = tmp_path / 'four.npz'
  res = subprocess.run([sys.executable, '-c', _SHARD_SCRIPT, str(path)], env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.split()[-2:] == ['4', '4']
  four = np.load(path)
  scope = {}
  exec(_SHARD_SCRIPT, scope)             # the same code in this 1-device process
  one, n = scope['run']()
  assert n == 1
  # Analytic model: only the noise/keys/sharding logic is involved -> equal to float32 rounding.
  np.testing.assert_allclose(four['gauss'], one['gauss'], rtol=0, atol=1e-6)
  # Random-weight UNet (outputs of magnitude ~50): per-device batch changes XLA's conv blocking, so allow
  # float32 rounding amplified by 1/sqrt(alpha_bar) at the first step.
  u1, u4 = one['unet'], four['unet']
  assert u1.shape == (12, 8, 8, 1)
  np.testing.assert_allclose(u4, u1, rtol=0, atol=1e-5 * np.abs(u1).max())
