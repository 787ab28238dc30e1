"""`--method=qdiff` (Q-Diffusion's released recipe) end to end on ddim_tiny (tests/train/calib_settings.py): round 0
is AdaRound with activations FP, round 1 learns only the activation scales (initialised symmetric min-max after
round 0) with the rounding fixed; the split shortcut has split weight scales."""
import numpy as np

from tcaq_jax.quantized import load_quantized
from tcaq_jax.train.pipeline import Hooks, run

from calib_settings import BASE  # noqa: E402  (tests/train/calib_settings.py)


def test_qdiff_two_passes(tmp_path):
  snaps = []

  def after_save(state):
    st = state.qstate.layers['up_0/block_1/nin_shortcut']
    snaps.append((state.progress.round, state.progress.next_unit, np.asarray(st.alpha),
                  None if st.a_scale is None else np.asarray(st.a_scale)))

  report = run(dict(BASE, out_dir=str(tmp_path / 'q'), method='qdiff', recon_units='^up_0/block_1$',
                    png_samples=0, iters_scale=0.0005), Hooks(after_save=after_save))
  units = report['units']
  assert [(u['unit'], u['round'], u['iters']) for u in units] == [('up_0/block_1', 0, 10), ('up_0/block_1', 1, 2)]
  init = snaps[0]
  assert init[3] is None                                      # no activation ranges before the AdaRound pass
  after_w = [s for s in snaps if s[0] == 0 and s[1] > 0]
  assert after_w[0][3] is None and not np.array_equal(after_w[0][2], init[2])      # alpha trained, acts FP
  act_init = next(s for s in snaps if s[0] == 1 and s[3] is not None)
  final = snaps[-1]
  np.testing.assert_array_equal(final[2], act_init[2])      # the activation pass keeps the rounding
  assert not np.array_equal(final[3], act_init[3])          # ... and learns the scales
  q = load_quantized(str(tmp_path / 'q')).qstate.layers
  sc = q['up_0/block_1/nin_shortcut']
  assert sc.w_scale.shape[-2:] == sc.alpha.shape[-2:] and sc.a_scale.shape == (1, 2)
  assert np.all(np.asarray(q['up_0/block_1/conv1'].a_zero) == 128)            # symmetric signed 8-bit codes
  assert report['daq_choices'] == {}
