"""The eps bias fit (tcaq_jax/train/eps_bias.py) against closed forms: with eps_q = eps_fp + C[step] + 0.1 x
(+ 0.01 label), the mean error over FP trajectories is C + 0.1 * mean(x_i) (+ 0.01 * mean label), with x_i from
an independent sampler (the lax.scan DDIMSampler; the fit uses the host-loop sampler) and the mean in float64.
--eps_scale: with eps_q = (1 + K[step]) eps_fp + C[step] the fit returns K and C exactly; with a nonlinear error
it equals a float64 least-squares fit (numpy.linalg.lstsq) on the reference trajectories.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from tcaq_jax.diffusion.ddim import DDIMSampler, sampler_coefficients
from tcaq_jax.diffusion.host_sampler import HostLoopSampler
from tcaq_jax.models import configs
from tcaq_jax.train import eps_bias

SHAPE = (4, 4, 2)
STEPS = 5


def _fp(consts, x, t, step, cond):
  return consts * x


def _q(consts, x, t, step, cond):
  scale, c = consts
  return scale * x + c[step] + 0.1 * x + 0.01 * cond.astype(jnp.float32)[:, None, None, None]


def _eps(scale, x, t, i, cond):
  return scale * x


def _setup(guidance=1.0):
  coeffs = sampler_coefficients(configs.get_config('ddim_tiny'), STEPS, 'quad', 0.0)
  eps = Partial(_eps, jnp.float32(0.5))
  c = np.random.default_rng(0).normal(size=(STEPS,) + SHAPE).astype(np.float32)
  return coeffs, eps, c, HostLoopSampler(eps, coeffs, SHAPE, guidance_scale=guidance)


def _reference_x(coeffs, eps, n, seed, cond=None, uncond=None, guidance=1.0):
  out = DDIMSampler(eps, coeffs, SHAPE, guidance_scale=guidance).sample(seed, 0, n, cond=cond, uncond=uncond,
                                                                        record='all')
  return np.asarray(out['recorded'], np.float64)                        # [steps, n, ...]


@pytest.mark.parametrize('mode', ['pixel', 'channel'])
def test_fit_is_the_mean_error_over_fp_trajectories(mode):
  coeffs, eps, c, sampler = _setup()
  err = eps_bias.make_error_sum(_q, _fp)
  bias, scale, info = eps_bias.fit(sampler, err, (jnp.float32(0.5), jnp.asarray(c)), jnp.float32(0.5),
                                   num_samples=10, batch=4, seed=7, mode=mode)
  assert scale is None and 'scale_per_step' not in info
  assert info['samples'] == 12                     # rounded up to whole batches of 4
  xs = _reference_x(coeffs, eps, 12, 7)
  want = c.astype(np.float64) + 0.1 * xs.mean(axis=1)
  if mode == 'channel':
    want = want.mean(axis=(1, 2), keepdims=True)
  assert bias.shape == want.shape and bias.dtype == np.float32
  np.testing.assert_allclose(bias, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info['mean_per_step'], want.reshape(STEPS, -1).mean(1), rtol=1e-5, atol=1e-6)


def test_fit_with_guidance_averages_conditional_and_unconditional_calls():
  coeffs, eps, c, sampler = _setup(guidance=2.0)
  cond_fn = lambda n: (np.arange(n, dtype=np.int32) % 3, np.full((n,), 5, np.int32))  # noqa: E731
  bias, _, info = eps_bias.fit(sampler, eps_bias.make_error_sum(_q, _fp), (jnp.float32(0.5), jnp.asarray(c)),
                               jnp.float32(0.5), num_samples=4, batch=4, seed=1, mode='pixel', cond_fn=cond_fn)
  cond, uncond = cond_fn(4)
  xs = _reference_x(coeffs, eps, 4, 1, cond, uncond, guidance=2.0)
  want = c + 0.1 * xs.mean(axis=1) + 0.01 * np.concatenate([cond, uncond]).mean()
  np.testing.assert_allclose(bias, want, rtol=1e-5, atol=1e-6)


def test_non_finite_errors_are_refused_with_the_steps_named():
  coeffs, eps, c, sampler = _setup()
  c[3, 0, 0, 0] = np.nan
  with pytest.raises(FloatingPointError, match=r'steps \[3\]'):
    eps_bias.fit(sampler, eps_bias.make_error_sum(_q, _fp), (jnp.float32(0.5), jnp.asarray(c)), jnp.float32(0.5),
                 num_samples=4, batch=4, seed=0, mode='pixel')


def test_reduce_refuses_off():
  with pytest.raises(ValueError, match='--eps_bias'):
    eps_bias.reduce(np.zeros((2, 3, 3, 1)), 'off')
  m = np.arange(2 * 3 * 3 * 1, dtype=np.float64).reshape(2, 3, 3, 1)
  np.testing.assert_array_equal(eps_bias.reduce(m, 'channel'), [[[[4.0]]], [[[13.0]]]])


def _q2(consts, x, t, step, cond):                   # quantized eps with an error nonlinear in x
  scale, c = consts
  return scale * x + c[step] + 0.3 * x * x


def _q2_eps_corrected(c, b, x, t, i, cond):           # the same, less a correction b[i], as the sampler's eps_fn
  return 0.5 * x + c[i] + 0.3 * x * x - b[i]


def test_a_second_round_refits_on_the_corrected_models_own_trajectories():
  """fit_rounds(2) with eps_q = eps_fp + C + 0.3 x^2: round 0 gives b0 = C + 0.3 mean(x_fp^2); round 1 adds the
  error left on the trajectories of the model corrected by b0, so the result is C + 0.3 mean(x_q^2) with x_q
  those trajectories (recomputed here with the scan sampler, float64 mean)."""
  coeffs, eps, c, fp_sampler = _setup()
  err = eps_bias.make_error_sum(_q2, _fp)
  c_j = jnp.asarray(c)

  def with_bias(bias, scale):
    assert scale is None
    b = jnp.zeros_like(c_j) if bias is None else jnp.asarray(bias)
    sampler = None if bias is None else HostLoopSampler(Partial(_q2_eps_corrected, c_j, b), coeffs, SHAPE)
    return sampler, (jnp.float32(0.5), c_j - b)          # _q2 with C - b: the corrected model's eps

  bias, scale, info = eps_bias.fit_rounds(fp_sampler, err, with_bias, jnp.float32(0.5), 2, 8, 4, 3, 'pixel')
  assert scale is None
  b0 = c + 0.3 * (_reference_x(coeffs, eps, 8, 3) ** 2).mean(axis=1)
  xq = np.asarray(DDIMSampler(Partial(_q2_eps_corrected, c_j, jnp.asarray(b0, jnp.float32)), coeffs, SHAPE)
                  .sample(3, 0, 8, record='all')['recorded'], np.float64)
  np.testing.assert_allclose(bias, c + 0.3 * (xq ** 2).mean(axis=1), rtol=1e-4, atol=1e-5)
  assert [r['trajectories'] for r in info['rounds']] == ['fp', 'quantized, corrected']
  assert np.abs(bias - b0).max() > 1e-2                   # the second round changed it


K = np.asarray([0.3, -0.2, 0.05, 0.6, -0.5])                   # per step


def _q_lin(consts, x, t, step, cond):                 # (1 + K[step]) eps_fp + C[step]
  scale, c, k = consts
  fp = scale * x
  return (1.0 + k[step][:, None, None, None]) * fp + c[step]


@pytest.mark.parametrize('mode', ['pixel', 'channel'])
def test_scale_fit_recovers_a_linear_error_exactly(mode):
  coeffs, eps, c, sampler = _setup()
  if mode == 'channel':
    c = np.broadcast_to(c.mean(axis=(1, 2), keepdims=True), c.shape).copy()
  consts = (jnp.float32(0.5), jnp.asarray(c), jnp.asarray(K, jnp.float32))
  bias, scale, info = eps_bias.fit(sampler, eps_bias.make_error_sum(_q_lin, _fp), consts, jnp.float32(0.5),
                                   num_samples=8, batch=4, seed=2, mode=mode, scale=True)
  want_c = c if mode == 'pixel' else c.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(scale, 1.0 / (1.0 + K), rtol=2e-4)
  np.testing.assert_allclose(bias, want_c, rtol=1e-3, atol=2e-4)
  np.testing.assert_allclose(info['scale_per_step'], scale)


def _q_nonlin(consts, x, t, step, cond):
  scale, c = consts
  return 1.2 * scale * x + c[step] + 0.3 * x * x


def test_scale_fit_is_the_float64_least_squares_fit():
  """d = eps_q - eps_fp = 0.1 x + C + 0.3 x^2 on FP trajectories: per step, the fit's (k, bias) solve
  min sum (d - k eps_fp - bias_pixel)^2 over samples and pixels, recomputed with lstsq on the scan sampler's x."""
  coeffs, eps, c, sampler = _setup()
  bias, scale, _ = eps_bias.fit(sampler, eps_bias.make_error_sum(_q_nonlin, _fp), (jnp.float32(0.5), jnp.asarray(c)),
                                jnp.float32(0.5), num_samples=8, batch=4, seed=5, mode='pixel', scale=True)
  xs = _reference_x(coeffs, eps, 8, 5)                                  # [steps, n, *sample]
  n, p = xs.shape[1], int(np.prod(SHAPE))
  for i in range(STEPS):
    fp = 0.5 * xs[i].reshape(n, p)
    d = (0.1 * xs[i] + c[i].astype(np.float64) + 0.3 * xs[i] ** 2).reshape(n, p)
    design = np.concatenate([fp.reshape(-1, 1), np.tile(np.eye(p), (n, 1))], axis=1)   # [k, bias_0..bias_p-1]
    sol = np.linalg.lstsq(design, d.reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(1.0 / scale[i] - 1.0, sol[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(bias[i].reshape(-1), sol[1:], rtol=1e-3, atol=1e-4)


class _CountingSampler:
  """The FP host-loop sampler, counting its sample() calls."""

  def __init__(self, inner):
    self.inner, self.calls = inner, 0
    self.consts, self.shape = inner.consts, inner.shape

  def sample(self, *a, **kw):
    self.calls += 1
    return self.inner.sample(*a, **kw)


def test_a_cached_fit_reuses_the_fp_trajectories_and_gives_the_same_result():
  """cache: the second fit (another quantized model, same FP model and seed) samples no FP trajectory and
  evaluates no FP eps, and equals an uncached fit of that model; another seed misses the cache."""
  coeffs, eps, c, sampler = _setup()
  counting = _CountingSampler(sampler)
  fp_calls = []
  base = eps_bias.make_error_sum(_q_lin, _fp)
  fns = eps_bias.ErrorFns(lambda *a: (fp_calls.append(1), base.fp(*a))[1], base.err)
  cache = {}
  consts = lambda k: (jnp.float32(0.5), jnp.asarray(c), jnp.asarray(k, jnp.float32))  # noqa: E731
  eps_bias.fit(counting, fns, consts(K), jnp.float32(0.5), 8, 4, 2, 'pixel', scale=True, cache=cache)
  assert counting.calls == 2 and len(fp_calls) == 2 * STEPS
  got = eps_bias.fit(counting, fns, consts(0.5 * K), jnp.float32(0.5), 8, 4, 2, 'pixel', scale=True, cache=cache)
  assert counting.calls == 2 and len(fp_calls) == 2 * STEPS                # nothing recomputed
  want = eps_bias.fit(sampler, base, consts(0.5 * K), jnp.float32(0.5), 8, 4, 2, 'pixel', scale=True)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[1], 1.0 / (1.0 + 0.5 * K), rtol=2e-4)
  eps_bias.fit(counting, fns, consts(K), jnp.float32(0.5), 8, 4, 3, 'pixel', cache=cache)
  assert counting.calls == 4 and len(cache) == 2
