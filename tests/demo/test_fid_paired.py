"""bench/fid_paired.py's paired bootstrap of a FID difference, on synthetic features: identical rows differ by
exactly 0 in every draw; a row whose features are shifted away from the real ones is worse in every draw, with the
full-sample difference inside the draws' 95% interval; the difference equals FID(a) - FID(b) computed directly."""
import numpy as np
import pytest

from tcaq_jax.eval.metrics import feature_stats, frechet_distance


@pytest.fixture(scope='module')
def paired(load_bench):
  return load_bench('fid_paired')


def test_paired_bootstrap(paired):
  rng = np.random.default_rng(0)
  fr, fa = rng.normal(size=(300, 4)), rng.normal(size=(200, 4))
  same = paired.paired_bootstrap(fr, fa, fa.copy(), draws=20)
  assert same['diff'] == 0 and same['std'] == 0 and same['b_better_share'] == 0
  far = fa + 1.5
  res = paired.paired_bootstrap(fr, far, fa, draws=50)
  direct = frechet_distance(*feature_stats(fr), *feature_stats(far)) - frechet_distance(*feature_stats(fr),
                                                                                         *feature_stats(fa))
  np.testing.assert_allclose(res['diff'], direct, rtol=1e-9)
  assert res['diff'] > 5 and res['b_better_share'] == 1.0 and res['std'] > 0
  assert res['lo95'] <= res['diff'] <= res['hi95']
