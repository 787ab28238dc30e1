"""--act_criterion=output (issue 14 part 6): activation clipping chosen by the layer's output error, not by the
error of its input. Reference: the output errors of every candidate computed in float64 NumPy."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.quant.policy import LayerSpec
from tcaq_jax.train import act_search

from np_quant import fq, params as qparams  # noqa: E402  (tests/train/np_quant.py)


@pytest.mark.parametrize('criterion', ['input', 'output'])
def test_clipping_follows_the_criterion(criterion):
  """Input channel 0 carries rare huge values but its weights are tiny; channel 1 is the signal. Clipping the
  outliers costs input MSE but almost no output error, and gives channel 1 a 1000x finer step: the input
  criterion keeps min-max (100), the output criterion picks the clipped range, as the float64 reference says."""
  bits = 4
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8, 2)).astype(np.float32)
  x[:, :, 0] = 0.0
  x[0, 0, 0] = 4000.0                                            # rare huge values in channel 0
  x[1, 0, 0] = -4000.0
  model = nn.Dense(3)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  params = {'kernel': params['kernel'].at[0].set(1e-6), 'bias': params['bias']}
  policy = types.SimpleNamespace(layers={'': LayerSpec('', 'dense', 2, bits, bits)})
  pcts = (100.0, 99.0)
  fn = act_search.make_search(lambda c, xb: model.apply({'params': c}, xb), policy, (), pcts, daq=False,
                              criterion=criterion)
  got = jax.device_get(fn(params, {}, jax.random.PRNGKey(0), jnp.asarray(x)))['']
  x64, w64, b64 = x.astype(np.float64), np.asarray(params['kernel'], np.float64), np.asarray(params['bias'], np.float64)
  errs = []
  cands = [(x64.min(), x64.max()), (np.percentile(x64, 1.0), np.percentile(x64, 99.0))]
  for lo, hi in cands:
    s, z = qparams(lo, hi, bits)
    xq = fq(x64, s, z, bits)
    errs.append(np.mean((xq - x64) ** 2) if criterion == 'input' else
                np.mean(((xq @ w64 + b64) - (x64 @ w64 + b64)) ** 2))
  best = int(np.argmin(errs))
  assert best == (0 if criterion == 'input' else 1)
  s_want, _ = qparams(*cands[best], bits)
  np.testing.assert_allclose(float(np.asarray(got['a_scale']).reshape(())), s_want, rtol=1e-4)


def test_unknown_criterion_is_refused():
  policy = types.SimpleNamespace(layers={})
  with pytest.raises(act_search.ActSearchError, match='criterion'):
    act_search.make_search(lambda c: None, policy, criterion='bogus')
