"""bench/act_sensitivity.py's masked forward: a traced 0/1 mask per layer must reproduce quantized_apply with
the matching policy (all on, all off, one layer alone), and its mask names must be checked."""
import dataclasses
import os

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.export.synthetic import random_params, synthetic_quantized
from tcaq_jax.models import configs, family
from tcaq_jax.quant.apply import act_interceptor, quantize_weights, quantized_apply

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def sens(load_bench):
  return load_bench('act_sensitivity')


@pytest.fixture(scope='module')
def tiny():
  config = configs.get_config('ddim_tiny')
  model = configs.build_model(config)
  params = random_params(config, 0, model)
  q = synthetic_quantized(model, params, config, w_bits=6, a_bits=4, num_steps=4, num_slots=2)
  (x, t), _ = family.example_inputs(config, 2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32)
  return q, x, jnp.asarray([900, 10], jnp.int32), jnp.asarray([0, 3], jnp.int32)


def test_masks_reproduce_the_policy_they_stand_for(sens, tiny):
  q, x, t, steps = tiny
  paths = [p for p, s in q.policy.layers.items() if s.acts and p in q.qstate.layers]
  params_q = quantize_weights(q.params, q.qstate, q.policy, 'hard')
  run = lambda name: np.asarray(sens.masked_apply(q.model, params_q, q.qstate, q.policy,
                                                  sens.mask_of(name, paths), x, t, steps))
  ref = lambda **kw: np.asarray(quantized_apply(q.model, {'params': q.params}, q.qstate, q.policy,
                                                x, t, step_index=steps, weight_mode='hard', **kw))
  full, w_only = ref(), ref(act_quant=False)
  assert np.abs(full - w_only).max() > 1e-3                      # 4-bit activations change the output
  np.testing.assert_allclose(run('all'), full, atol=1e-5)
  np.testing.assert_allclose(run('w_only'), w_only, atol=1e-5)
  # one layer alone: every input divided by its TCR ratio (the quantized weights hold W diag(r)), then only that
  # layer's input quantized, by two stacked library interceptors
  one = next(p for p in paths if q.policy.layers[p].kind == 'conv')
  only = dataclasses.replace(q.qstate, layers={**q.qstate.layers, one: q.qstate.layers[one].replace(r=None)})
  with nn.intercept_methods(act_interceptor(q.qstate, q.policy, steps, quantize=False)):
    with nn.intercept_methods(act_interceptor(only, q.policy, steps, paths=[one])):
      alone = np.asarray(q.model.apply({'params': params_q}, x, t))
  assert np.abs(alone - w_only).max() > 1e-4
  np.testing.assert_allclose(run('+' + one), alone, atol=1e-5)
  assert not np.allclose(run('-' + one), full, atol=1e-6)


def test_mask_names_are_checked(sens):
  paths = ['a/conv', 'b/dense']
  assert sens.mask_of('-a/conv', paths) == {'a/conv': 0.0, 'b/dense': 1.0}
  assert sens.mask_of('+a/conv|b/dense', paths) == {'a/conv': 1.0, 'b/dense': 1.0}
  with pytest.raises(Exception, match='not all, w_only'):
    sens.mask_of('-c/conv', paths)
