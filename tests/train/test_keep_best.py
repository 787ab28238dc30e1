"""--keep_best (issue 14): a unit's reconstruction is kept only if it lowers the unit's output error on held-out
calibration samples; the held-out split (train/par.split_holdout); --par_alpha=reinit."""
import numpy as np
import pytest

from tcaq_jax.quantized import load_quantized
from tcaq_jax.train import par
from tcaq_jax.train.pipeline import Hooks, _alpha_stats, _reinit_alpha, run
from tcaq_jax.quant.adaround import hard_rounding, soft_rounding
from tcaq_jax.quant.state import LayerQState

from calib_settings import BASE, UNITS  # noqa: E402  (tests/train/calib_settings.py)


def _data(n):
  return {'x': np.arange(n, dtype=np.float32)[:, None], 'step': np.arange(n) % 3}


def test_split_holdout_keeps_the_reconstruction_subset_when_samples_are_left():
  data = _data(100)
  train, hold = par.split_holdout(data, 40, 16, seed=5)
  np.testing.assert_array_equal(train['x'], par.recon_subset(data, 40, 5)['x'])   # training set unchanged
  assert hold['x'].shape[0] == 16 and not set(hold['x'][:, 0]) & set(train['x'][:, 0])
  # too few left outside the subset: the rest comes from it, at most a quarter of it
  train, hold = par.split_holdout(data, 0, 16, seed=5)
  assert train['x'].shape[0] == 84 and hold['x'].shape[0] == 16
  assert sorted(np.concatenate([train['x'][:, 0], hold['x'][:, 0]])) == list(range(100))
  train, hold = par.split_holdout(_data(8), 0, 64, seed=5)
  assert (train['x'].shape[0], hold['x'].shape[0]) == (6, 2)
  train, hold = par.split_holdout(data, 40, 0, seed=5)
  assert hold is None and train['x'].shape[0] == 40


def test_reinit_alpha_keeps_the_hard_rounding_and_unsaturates():
  alpha = np.array([-30.0, -0.2, 0.0, 0.3, 25.0], np.float32)
  theta = {'a': LayerQState(alpha=alpha), 'b': LayerQState(a_scale=np.ones(1, np.float32))}
  assert _alpha_stats(theta) == pytest.approx(2 / 5)              # the two large alphas are clipped
  new = _reinit_alpha(theta)
  np.testing.assert_array_equal(hard_rounding(new['a'].alpha), hard_rounding(alpha))
  np.testing.assert_allclose(soft_rounding(new['a'].alpha), [0.25, 0.25, 0.75, 0.75, 0.75], atol=1e-6)
  assert _alpha_stats(new) == 0.0 and new['b'] is theta['b']


def test_a_unit_made_worse_is_reverted_to_its_start(tmp_path):
  """The first unit's loss is negated (gradient ascent): with --keep_best its held-out error does not fall, so
  its start is kept: its layers' final state equals the state saved right after initialisation."""
  cfg = dict(BASE, par_rounds=0, keep_best=True, holdout_samples=64, lr=1e-2, out_dir=str(tmp_path / 'a'),
             policy_override=('.*:fp', f'^{UNITS[0]}/:w4a8', f'^{UNITS[1]}/:w4a8'), png_samples=0)
  worse = lambda loss, it: -loss
  start = {}
  keep_start = lambda state: start.setdefault('q', state.qstate) if state.ckpt_step == 0 else None
  rep = run(cfg, hooks=Hooks(after_save=keep_start, loss_hook=lambda r, k: worse if k == 0 else None))
  first = rep['units'][0]
  assert first['unit'] == UNITS[0] and first['kept'] == 'start'
  assert first['holdout_after'] >= first['holdout_before'] and first['holdout_samples'] == 2
  assert all(u['kept'] in ('start', 'reconstructed') and np.isfinite(u['holdout_before']) for u in rep['units'])
  assert all(0.0 <= u['alpha_saturated'] <= 1.0 for u in rep['units'])
  final = load_quantized(str(tmp_path / 'a')).qstate
  layers = [p for p in final.layers if p.startswith(UNITS[0] + '/')]
  assert layers and any(final.layers[p].alpha is not None for p in layers)
  for path in layers:
    for name, v in final.layers[path].set_fields().items():
      np.testing.assert_array_equal(np.asarray(v), np.asarray(getattr(start['q'].layers[path], name)),
                                    err_msg=f'{path}:{name}')
