"""--act_ends: the activation search's clipping candidates with both tails clipped at the same percentile
('paired') or every low x high pair ('independent'). Reference: every candidate's quantization MSE in float64
NumPy from np.percentile's linear interpolation."""
import jax
import numpy as np
import pytest

from tcaq_jax.train import act_search
from tcaq_jax.train.config import Config, ConfigError

from np_quant import fq, params  # noqa: E402  (tests/train/np_quant.py)

PCTS = (100.0, 99.99, 99.9, 99.0)


def _reference(x, bits, pairs):
  x64 = x.astype(np.float64)
  los = [x64.min() if p == 100 else np.percentile(x64, 100 - p) for p in PCTS]
  his = [x64.max() if p == 100 else np.percentile(x64, p) for p in PCTS]
  cands = [(los[i], his[j]) for i, j in pairs]
  errs = [np.mean((fq(x64, *params(lo, hi, bits), bits) - x64) ** 2) for lo, hi in cands]
  return params(*cands[int(np.argmin(errs))], bits), min(errs)


@pytest.mark.parametrize('ends', ['paired', 'independent'])
def test_the_search_picks_the_reference_candidate(ends):
  """A bulk in [-0.28, 1] with rare outliers at +8 (0.05%) and at -3 (0.08%): clipping the upper outliers while
  keeping the lower ones is only a candidate when the tails are searched independently, and it is the best."""
  bits = 4
  rng = np.random.default_rng(0)
  x = rng.uniform(-0.28, 1, size=10000).astype(np.float32)
  x[:5], x[5:13] = 8.0, -3.0
  x = rng.permutation(x).reshape(100, 100)
  n = len(PCTS)
  pairs = [(i, i) for i in range(n)] if ends == 'paired' else [(i, j) for i in range(n) for j in range(n)]
  (s_ref, z_ref), err_ref = _reference(x, bits, pairs)
  s, zp = act_search.search_uniform(jax.numpy.asarray(x), bits, PCTS, jax.random.PRNGKey(0), symmetric=False,
                                    ends=ends)
  np.testing.assert_allclose(float(s), s_ref, rtol=1e-3)       # float32 percentile positions; other candidates differ by > 1%
  assert float(zp) == z_ref
  if ends == 'independent':
    (_, _), err_paired = _reference(x, bits, [(i, i) for i in range(n)])
    assert err_ref < 0.98 * err_paired                             # an off-diagonal candidate wins on this input


def test_bad_ends_is_a_named_error():
  with pytest.raises(act_search.ActSearchError, match='ends'):
    act_search.search_uniform(jax.numpy.zeros((8,)), 4, PCTS, jax.random.PRNGKey(0), symmetric=False, ends='x')
  with pytest.raises(ConfigError, match='act_ends'):
    Config.from_flat({'act_ends': 'both'}).resolve()
