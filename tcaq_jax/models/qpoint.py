"""Named no-op quantisation points.

Models contain no quantisation code. Where an activation that is *not* the input of a Conv/Dense must be
quantised (attention matmul operands, post-Softmax probabilities), the model passes it through a
`QuantPoint`. In full precision it is the identity; `tcaq_jax.quant.apply` intercepts its `__call__`
(via `flax.linen.intercept_methods`) and fake-quantises the value with the state found at the module path.

`kind` tells the policy what the value is:
  'matmul'  : an attention matmul operand (q, k, v)        -> activation bit width
  'softmax' : post-Softmax attention probabilities          -> softmax bit width, DAQ (log2 / uniform)
"""
import flax.linen as nn


class QuantPoint(nn.Module):
  """Identity; an interception point for activation quantisers.

  x: any shape. Returns x unchanged.
  """
  kind: str = 'matmul'

  def __call__(self, x):
    return x
