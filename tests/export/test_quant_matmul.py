"""The attention matmuls' interception module (tcaq_jax/models/qpoint.py `QuantMatmul`) leaves the float models
as they were: no parameters (checkpoint param trees unchanged), not a policy layer, no shift of the recorded
call indices of the policy layers (the activation search folds them into PRNG keys), and the blocks' outputs are
bit for bit those of the einsum written inline (the code before the module); its output against a float64
NumPy einsum of the operands it receives, which are the outputs of the QuantPoints it names. The whole-model
FP outputs (demo, ddim_tiny, three tiny LDMs) were compared before / after the change bit for bit
(docs/results/export.md); tests/models/ compare the models against PyTorch references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tcaq_jax.models.layers import AttnBlock
from tcaq_jax.models.ldm_layers import AttentionBlock, CrossAttention
from tcaq_jax.quant.intercept import collect_calls
from tcaq_jax.quant.policy import discover_layers

_X = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 32))
_CTX = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 24))
# block, its inputs, its parameterised submodules (the checkpoint's names)
BLOCKS = {
    'ddim AttnBlock': (AttnBlock(32), (_X,), {'norm', 'q', 'k', 'v', 'proj_out'}),
    'ldm AttentionBlock': (AttentionBlock(32, num_heads=2), (_X,), {'norm', 'qkv', 'proj_out'}),
    'ldm CrossAttention': (CrossAttention(32, heads=2, dim_head=8), (_X.reshape(2, 16, 32), _CTX),
                           {'to_q', 'to_k', 'to_v', 'to_out_0'}),
}


def _is_matmul(m):
  return type(m).__name__ == 'QuantMatmul'


@pytest.mark.parametrize('name', list(BLOCKS))
def test_quant_matmul_adds_no_params_no_policy_layer_and_no_call_index(name):
  block, args, names = BLOCKS[name]
  variables = jax.eval_shape(block.init, jax.random.PRNGKey(0), *args)
  assert set(variables) == {'params'} and set(variables['params']) == names
  layers = discover_layers(block, variables, *args)
  points = [(i.path, i.kind) for i in layers if i.kind in ('matmul', 'softmax')]
  assert points == [('qk_q', 'matmul'), ('qk_k', 'matmul'), ('av_v', 'matmul'), ('attn_probs', 'softmax')]
  assert not any(i.path.endswith('_matmul') for i in layers)
  policy_paths = {i.path for i in layers}

  def indices(v, *a):
    _, rec = collect_calls(lambda: block.apply(v, *a), select=lambda p, m: p in policy_paths,
                           record=lambda c: c.index)
    found.update(rec)

  found: dict = {}
  jax.eval_shape(indices, variables, *args)
  assert list(found) == [i.path for i in layers] and list(found.values()) == list(range(len(layers)))


@pytest.mark.parametrize('name', list(BLOCKS))
def test_float_outputs_are_the_inline_einsum_bit_for_bit(name):
  block, args, _ = BLOCKS[name]
  variables = block.init(jax.random.PRNGKey(2), *args)

  def inline(next_fun, a, kwargs, ctx):      # the code before QuantMatmul: jnp.einsum in the block's own body
    if _is_matmul(ctx.module) and ctx.method_name == '__call__':
      return jnp.einsum(ctx.module.equation, *a)
    return next_fun(*a, **kwargs)

  def with_inline(v, *a):
    with nn.intercept_methods(inline):
      return block.apply(v, *a)

  got = jax.jit(block.apply)(variables, *args)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(with_inline)(variables, *args)))

  points = {'qk_q', 'qk_k', 'attn_probs', 'av_v'}
  _, rec = collect_calls(lambda: block.apply(variables, *args),
                         select=lambda p, m: p in points or _is_matmul(m),
                         record=lambda c: (getattr(c.module, 'operands', None), getattr(c.module, 'equation', None),
                                           c.args, c.output))
  assert set(rec) == points | {'qk_matmul', 'av_matmul'}
  for path in ('qk_matmul', 'av_matmul'):
    operands, equation, (a, b), y = rec[path]
    assert tuple(operands) == (('qk_q', 'qk_k') if path == 'qk_matmul' else ('attn_probs', 'av_v'))
    for x, point in zip((a, b), operands):      # its operands are the named points' outputs
      np.testing.assert_array_equal(np.asarray(x), np.asarray(rec[point][3]))
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ref = np.einsum(equation, a64, b64)
    k = a.shape[-1] if path == 'qk_matmul' else b.shape[1]      # contracted length (channels / keys)
    bound = (k + 2) * 2.0 ** -24 * np.einsum(equation, np.abs(a64), np.abs(b64))
    assert y.dtype == jnp.float32 and np.all(np.abs(np.asarray(y, np.float64) - ref) <= bound), path
