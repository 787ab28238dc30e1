"""Quantizer states are pytrees that round-trip through orbax."""
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tcaq_jax import quant as Q


def test_states_roundtrip_orbax(tmp_path):
  w = jnp.linspace(-1., 1., 24).reshape(3, 8)
  s, z = Q.minmax_params(w, 4, channel_axis=-1)
  state = {
      'uniform': Q.UniformQuantizer(scale=s, zero_point=z, bits=4, signed=False),
      'adaround': Q.init_adaround_state(w, s, z, 4),
      'log': Q.LogQuantizer(delta=jnp.array([0.5, 0.7]), bits=8, kind='logsqrt2'),
      'daq': Q.DAQQuantizer(use_log2=jnp.array([True, False]), delta=jnp.ones(2), scale=jnp.full(2, 0.1), bits=8),
  }
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'q', state)
  ckpt.wait_until_finished()
  target = jax.tree_util.tree_map(jnp.zeros_like, state)
  back = ckpt.restore(tmp_path / 'q', target)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
  assert back['log'].kind == 'logsqrt2' and back['adaround'].bits == 4
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(Q.fake_quant_with(w, back['uniform'])),
                                np.asarray(Q.fake_quant_with(w, state['uniform'])))
