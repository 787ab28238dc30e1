"""QState.out_bias: `apply.correct_output` (per sampler step, scalar or per-sample step index) against NumPy,
its checkpoint tree round trip, and quantized_apply leaving it to the eps_fn."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tcaq_jax.quant import apply as A
from tcaq_jax.quant.policy import Policy
from tcaq_jax.quant.state import QState, from_tree, to_tree


def _qstate(bias):
  return QState(step_slot=jnp.zeros((bias.shape[0],), jnp.int32), layers={}, out_bias=jnp.asarray(bias))


def test_correct_output_scalar_and_per_sample_steps():
  rng = np.random.default_rng(0)
  bias = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
  y = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
  q = _qstate(bias)
  np.testing.assert_array_equal(np.asarray(A.correct_output(y, q, 2)), y - bias[2][None])
  np.testing.assert_array_equal(np.asarray(A.correct_output(y, q, jnp.asarray([0, 3, 1]))),
                                y - bias[[0, 3, 1]])
  out = np.asarray(A.correct_output(y, q, jnp.asarray([0, 4, -1])))       # outside the calibrated steps: NaN
  assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1:]))
  assert np.all(np.isnan(np.asarray(A.correct_output(y, q, 7))))
  channel = _qstate(bias.mean(axis=(1, 2), keepdims=True))               # [steps, 1, 1, C] broadcasts
  np.testing.assert_allclose(np.asarray(A.correct_output(y, channel, 1)),
                             y - bias[1].mean(axis=(0, 1))[None, None, None], rtol=1e-6)
  plain = QState(step_slot=jnp.zeros((4,), jnp.int32))
  assert A.correct_output(y, plain, 2) is y


def test_tree_round_trip_keeps_out_bias_and_reads_trees_without_it():
  bias = np.arange(24, dtype=np.float32).reshape(2, 2, 3, 2)
  tree = to_tree(_qstate(bias))
  np.testing.assert_array_equal(np.asarray(from_tree(tree).out_bias), bias)
  old = {'step_slot': np.zeros((2,), np.int32), 'layers': {}}              # a run stored before out_bias
  assert 'out_bias' not in to_tree(from_tree(old)) and from_tree(old).out_bias is None


class _Net(nn.Module):
  def setup(self):
    self.inner = nn.Dense(2)

  def __call__(self, x):
    return self.inner(x) * 2.0


def test_quantized_apply_leaves_the_correction_to_its_caller():
  """quantized_apply also runs single blocks and submodules, whose outputs are not eps: it never subtracts the
  out_bias (the eps_fn of a quantized model does: tests/train/test_pipeline.py)."""
  net = _Net()
  x = jnp.ones((2, 3, 3, 2))
  variables = net.init(jnp.zeros((2,), jnp.uint32), x)
  bias = np.random.default_rng(1).normal(size=(3, 3, 3, 2)).astype(np.float32)
  policy = Policy(layers={}, rules=())
  plain = QState(step_slot=jnp.zeros((3,), jnp.int32))
  np.testing.assert_array_equal(np.asarray(A.quantized_apply(net, variables, _qstate(bias), policy, x, step_index=1)),
                                np.asarray(A.quantized_apply(net, variables, plain, policy, x, step_index=1)))


def test_correct_output_applies_the_scale_after_the_bias():
  """QState.out_scale (--eps_scale): (y - bias[i]) * scale[i], scalar or per-sample step; NaN outside the steps;
  a scale without a bias multiplies alone; the tree round trip keeps it."""
  rng = np.random.default_rng(2)
  bias = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
  scale = rng.uniform(0.8, 1.2, size=(4,)).astype(np.float32)
  y = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
  q = _qstate(bias).replace(out_scale=jnp.asarray(scale))
  np.testing.assert_allclose(np.asarray(A.correct_output(y, q, 2)), (y - bias[2][None]) * scale[2], rtol=1e-6)
  idx = np.asarray([0, 3, 1])
  np.testing.assert_allclose(np.asarray(A.correct_output(y, q, jnp.asarray(idx))),
                             (y - bias[idx]) * scale[idx][:, None, None, None], rtol=1e-6)
  out = np.asarray(A.correct_output(y, q, jnp.asarray([1, 4, -1])))
  assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1:]))
  only = QState(step_slot=jnp.zeros((4,), jnp.int32), out_scale=jnp.asarray(scale))
  np.testing.assert_allclose(np.asarray(A.correct_output(y, only, 1)), y * scale[1], rtol=1e-6)
  back = from_tree(to_tree(q))
  np.testing.assert_array_equal(np.asarray(back.out_scale), scale)
  np.testing.assert_array_equal(np.asarray(back.out_bias), bias)
  assert 'out_scale' not in to_tree(_qstate(bias)) and from_tree(to_tree(_qstate(bias))).out_scale is None
