"""Named no-op quantisation points and attention matmuls.

Models contain no quantisation code. Where an activation that is *not* the input of a Conv/Dense must be
quantised (attention matmul operands, post-Softmax probabilities), the model passes it through a
`QuantPoint`. In full precision it is the identity; `tcaq_jax.quant.apply` intercepts its `__call__`
(via `flax.linen.intercept_methods`) and fake-quantises the value with the state found at the module path.

`kind` tells the policy what the value is:
  'matmul'  : an attention matmul operand (q, k, v)        -> activation bit width
  'softmax' : post-Softmax attention probabilities          -> softmax bit width, DAQ (log2 / uniform)

The attention matmuls themselves (q k^T, probs @ v) go through a `QuantMatmul`: in full precision exactly
`jnp.einsum(equation, a, b)`; it names the two sibling QuantPoints that quantise its operands, so that an
integer backend (`tcaq_jax.quant.intexec`) can intercept it and run the einsum on the operands' integer codes.
It has no parameters and is not a policy layer (its operands are).
"""
import flax.linen as nn
import jax.numpy as jnp


class QuantPoint(nn.Module):
  """Identity; an interception point for activation quantisers.

  x: any shape. Returns x unchanged.
  """
  kind: str = 'matmul'

  def __call__(self, x):
    return x


class QuantMatmul(nn.Module):
  """jnp.einsum(equation, a, b); an interception point for integer attention matmuls.

  operands: names of the sibling QuantPoints (same parent module) whose outputs are a and b.
  a, b: the two einsum operands (e.g. q [B, N, C] and k [B, M, C] for 'bic,bjc->bij').
  """
  equation: str
  operands: tuple[str, str]

  def __call__(self, a, b):
    return jnp.einsum(self.equation, a, b)
