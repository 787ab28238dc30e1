"""Step sequences and schedules vs the original repositories' formulas, recomputed here in NumPy.

References (formulas copied by meaning, not imported):
  ermongroup/ddim runners/diffusion.py sample_image: uniform skip = T // S, seq = range(0, T, skip);
    quad seq = [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), S) ** 2)].
  CompVis/latent-diffusion ldm/modules/diffusionmodules/util.py make_ddim_timesteps: same rules, + 1;
    make_beta_schedule('linear'): torch.linspace(sqrt(b0), sqrt(b1), T, float64) ** 2;
    make_ddim_sampling_parameters: alphas_prev = [alphacums[0]] + alphacums[seq[:-1]].
"""
import numpy as np
import pytest

from tcaq_jax.diffusion import schedules as S


def _ddim_repo_seq(T, steps, skip_type):
  if skip_type == 'uniform':
    skip = T // steps
    return list(range(0, T, skip))
  seq = np.linspace(0, np.sqrt(T * 0.8), steps) ** 2
  return [int(s) for s in list(seq)]


def _ldm_seq(T, steps, method):
  if method == 'uniform':
    c = T // steps
    out = np.asarray(list(range(0, T, c)))
  else:
    out = ((np.linspace(0, np.sqrt(T * .8), steps)) ** 2).astype(int)
  return out + 1


@pytest.mark.parametrize('skip_type', ['uniform', 'quad'])
def test_cifar10_100_steps_match_ddim_repo(skip_type):
  got = S.ddim_timesteps(1000, 100, skip_type, style='ddim')
  want = _ddim_repo_seq(1000, 100, skip_type)
  assert got.tolist() == want
  if skip_type == 'quad':  # METHOD.md: starts 0, 0, 0, 0 and ends at 800
    assert want[:4] == [0, 0, 0, 0] and want[4] != 0 and want[-1] == 800
    assert got.tolist()[:5] == [0, 0, 0, 0, 1]


@pytest.mark.parametrize('steps', [20, 200, 400])
@pytest.mark.parametrize('method', ['uniform', 'quad'])
def test_ldm_steps_match_make_ddim_timesteps(steps, method):
  got = S.ddim_timesteps(1000, steps, method, style='ldm')
  want = _ldm_seq(1000, steps, method)
  assert got.shape == want.shape and np.array_equal(got, want)


def test_ldm_uniform_known_values():
  assert S.ddim_timesteps(1000, 20, 'uniform', 'ldm').tolist() == list(range(1, 1000, 50))
  assert S.ddim_timesteps(1000, 200, 'uniform', 'ldm').tolist() == list(range(1, 1000, 5))
  # LDM's rule gives 500 steps for S=400 (c = 1000 // 400 = 2); the original does not correct it.
  assert len(S.ddim_timesteps(1000, 400, 'uniform', 'ldm')) == 500


def test_beta_schedules():
  np.testing.assert_array_equal(S.beta_schedule('linear', 1e-4, 0.02, 1000),
                                np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
  ldm = S.beta_schedule('ldm_linear', 0.0015, 0.0195, 1000)
  np.testing.assert_allclose(ldm, np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000) ** 2, rtol=0, atol=1e-15)
  assert ldm[0] == pytest.approx(0.0015) and ldm[-1] == pytest.approx(0.0195)
  ab = S.alphas_cumprod(S.beta_schedule('linear', 1e-4, 0.02, 1000))
  want = np.array([np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:k + 1]) for k in (0, 499, 999)])
  np.testing.assert_allclose(ab[[0, 499, 999]], want, rtol=1e-12)


def test_coefficients_ddim_and_ldm_conventions():
  ab = S.alphas_cumprod(S.beta_schedule('linear', 1e-4, 0.02, 1000))
  seq = S.ddim_timesteps(1000, 10, 'uniform', 'ddim')
  c = S.ddim_coefficients(ab, seq, eta=0.5, style='ddim')
  assert c.timesteps.tolist() == seq[::-1].tolist()
  np.testing.assert_array_equal(c.alphas, ab[seq[::-1]])
  # ddim repo: compute_alpha prepends beta=0, so "t = -1" has alpha_bar 1.
  np.testing.assert_array_equal(c.alphas_prev, np.concatenate([ab[seq[::-1][1:]], [1.0]]))
  lc = S.ddim_coefficients(ab, seq + 1, eta=0.0, style='ldm')
  assert lc.alphas_prev[-1] == ab[0] and np.all(lc.sigmas == 0)


def test_errors_name_the_problem():
  with pytest.raises(S.ScheduleError, match='skip_type'):
    S.ddim_timesteps(1000, 10, 'cosine')
  with pytest.raises(S.ScheduleError, match='beta schedule'):
    S.beta_schedule('nope', 0, 1, 10)
  with pytest.raises(S.ScheduleError, match='lacks key'):
    S.schedule_from_config({'name': 'x', 'diffusion': {'beta_schedule': 'linear'}})
