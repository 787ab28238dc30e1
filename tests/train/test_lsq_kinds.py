"""--lsq_kinds: with --learn_act_scale, only quantization points of the listed kinds get their activation step
size in the trained fields (the others keep their searched steps); every kind by default; unknown kinds are a
ConfigError naming the flag."""
import jax.numpy as jnp
import pytest

from tcaq_jax.quant.state import LayerQState, QState
from tcaq_jax.train.config import LSQ_KINDS, Config, ConfigError
from tcaq_jax.train.pipeline import Setup, _trainable


def test_only_the_listed_kinds_learn_their_step_sizes():
  cfg = Config.from_flat(dict(model_config='ddim_tiny', w_bits=6, a_bits=6, num_steps=4, calib_steps=2,
                              calib_samples=2, png_samples=0, progress=False)).resolve()
  assert cfg.lsq_kinds == LSQ_KINDS and cfg.learn_act_scale
  setup = Setup(cfg)
  unit = next(u for u in setup.units if 'attn' in u.path)
  kinds = {p: setup.policy.layers[p].kind for p in unit.layers}
  assert {'matmul', 'softmax'} <= set(kinds.values()) and set(kinds.values()) & {'conv', 'dense'}
  layers = {p: LayerQState(alpha=jnp.zeros((2,)), a_scale=jnp.ones((3,))) for p in unit.layers}
  qstate = QState(step_slot=jnp.zeros((4,), jnp.int32), layers=layers)
  every = _trainable(qstate, unit, True, policy=setup.policy, lsq_kinds=LSQ_KINDS)
  assert all(every[p].a_scale is not None for p in unit.layers)
  some = _trainable(qstate, unit, True, policy=setup.policy, lsq_kinds=('conv', 'dense'))
  for p, kind in kinds.items():
    assert (some[p].a_scale is not None) == (kind in ('conv', 'dense')), p
    assert some[p].alpha is not None
  off = _trainable(qstate, unit, False, policy=setup.policy, lsq_kinds=LSQ_KINDS)
  assert all(th.a_scale is None for th in off.values())
  with pytest.raises(ConfigError, match='--lsq_kinds'):
    Config.from_flat(dict(model_config='ddim_tiny', lsq_kinds=('conv', 'attention'))).resolve()
