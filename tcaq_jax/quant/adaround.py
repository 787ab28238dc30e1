"""AdaRound (Nagel et al. 2020) as used by BRECQ: learnable rounding of weights.

  h(alpha)  = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)          zeta = 1.1, gamma = -0.1
  w_hat     = (clip(floor(w / s) + h + zp, qmin, qmax) - zp) * s           soft (training)
  hard h    = 1[alpha >= 0]                                                  (inference)
  init      alpha = -log((zeta - gamma) / (frac - gamma) - 1), frac = w/s - floor(w/s)   (so h(alpha) = frac)
  reg       sum(1 - |2h - 1|^b),  b annealed 20 -> 2 after a 20% warmup (reg off during warmup)

Shapes: w any shape; scale, zero_point broadcastable to w (per output channel keepdims); alpha shaped like w.
"""
import functools

import flax.struct
import jax
import jax.numpy as jnp

from tcaq_jax.quant.uniform import qrange

ZETA = 1.1
GAMMA = -0.1


@jax.jit
def init_alpha(w, scale, zero_point=None):
  """alpha such that soft_rounding(alpha) equals the rounding residual frac = w/s - floor(w/s).

  zero_point is unused (the residual does not depend on an integer zero point); kept for the agreed API.
  """
  del zero_point
  v = jnp.asarray(w, jnp.float32) / scale
  return alpha_for(v - jnp.floor(v))


def alpha_for(h):
  """The alpha whose (unclipped) rectified sigmoid equals h in (gamma, zeta): the inverse of `soft_rounding`."""
  return -jnp.log((ZETA - GAMMA) / (h - GAMMA) - 1.)


def reinit_from_hard(alpha, margin: float = 0.25):
  """Alphas that keep `alpha`'s hard rounding with soft value 0.5 +- margin (no longer clipped: gradients flow)."""
  return alpha_for(jnp.where(hard_rounding(alpha) > 0.5, 0.5 + margin, 0.5 - margin)).astype(alpha.dtype)


def saturated(alpha, xp=jnp):
  """1 where soft_rounding(alpha) is clipped at 0 or 1 (zero gradient), else 0. xp=numpy computes it on the host
  (no XLA compile per shape; the sigmoid in NumPy)."""
  if xp is jnp:
    h = soft_rounding(alpha)
  else:
    sig = 0.5 * (1. + xp.tanh(0.5 * xp.asarray(alpha, xp.float32)))      # sigmoid without overflow
    h = xp.clip(sig * (ZETA - GAMMA) + GAMMA, 0., 1.)
  return ((h <= 0.) | (h >= 1.)).astype(xp.float32)


def soft_rounding(alpha):
  """h = clip(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1), same shape as alpha."""
  return jnp.clip(jax.nn.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0., 1.)


def hard_rounding(alpha):
  """h = 1[alpha >= 0] as float32."""
  return (alpha >= 0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('bits', 'hard', 'signed'))
def adaround_fake_quant(w, alpha, scale, zero_point, bits, hard=False, signed=False):
  """Fake-quantized weights with learnable rounding; gradients flow to alpha (not to w or scale's floor).

  w: any shape; alpha: shape of w; scale, zero_point: broadcastable; hard: python bool.
  """
  qmin, qmax = qrange(bits, signed)
  w = jnp.asarray(w, jnp.float32)
  w_floor = jax.lax.stop_gradient(jnp.floor(w / scale))
  h = hard_rounding(alpha) if hard else soft_rounding(alpha)
  codes = jnp.clip(w_floor + h + zero_point, qmin, qmax)
  return (codes - zero_point) * scale


def rounding_regularizer(alpha, b):
  """sum(1 - |2h - 1|^b) over all elements (scalar). 0 when every h is 0 or 1, maximal at h = 0.5."""
  h = soft_rounding(alpha)
  return jnp.sum(1. - jnp.abs(2. * h - 1.) ** b)


def b_schedule(step, total, warmup=0.2, b_start=20., b_end=2.):
  """BRECQ LinearTempDecay + warmup gate. step: 0-based int (may be traced); total: python int.

  Returns (b, reg_on): for step < warmup * total: (b_start, 0.); afterwards
  b = b_end + (b_start - b_end) * max(0, 1 - (step - warmup*total) / (total - warmup*total)), reg_on = 1.
  """
  step = jnp.asarray(step, jnp.float32)
  start = warmup * total
  rel = (step - start) / max(total - start, 1e-9)
  b = jnp.where(step < start, b_start, b_end + (b_start - b_end) * jnp.maximum(0., 1. - rel))
  reg_on = (step >= start).astype(jnp.float32)
  return b, reg_on


def adaround_loss_reg(alpha, step, total, lam=0.01, warmup=0.2, b_start=20., b_end=2.):
  """lambda * reg_on * rounding_regularizer(alpha, b) at this step (scalar)."""
  b, on = b_schedule(step, total, warmup, b_start, b_end)
  return lam * on * rounding_regularizer(alpha, b)


@flax.struct.dataclass
class AdaRoundState:
  """Per-layer AdaRound state (a pytree). alpha: shape of w; scale, zero_point: broadcastable to w."""
  alpha: jax.Array
  scale: jax.Array
  zero_point: jax.Array
  bits: int = flax.struct.field(pytree_node=False, default=8)
  signed: bool = flax.struct.field(pytree_node=False, default=False)


def init_adaround_state(w, scale, zero_point, bits, signed=False):
  """AdaRoundState with alpha from the rounding residual."""
  return AdaRoundState(alpha=init_alpha(w, scale, zero_point), scale=jnp.asarray(scale, jnp.float32),
                       zero_point=jnp.asarray(zero_point, jnp.float32), bits=bits, signed=signed)


def adaround_fake_quant_with(w, st, hard=False):
  """adaround_fake_quant(w, st.alpha, st.scale, st.zero_point, st.bits, hard, st.signed)."""
  return adaround_fake_quant(w, st.alpha, st.scale, st.zero_point, st.bits, hard, st.signed)
