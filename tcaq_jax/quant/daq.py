"""DAQ: per-(layer, timestep) choice of the quantizer for post-Softmax values.

Two rules. `output_errors` + `choose_by_error` (the project's default): the quantizer among uniform / log2 /
log-sqrt2 with the lowest mean squared error of the attention output probs @ V. The paper's rule, below: a
likelihood-ratio test between a log2 and a uniform quantizer.

Test (Clauset, Shalizi & Newman 2009 style, maximum likelihood on the values x >= x_min, x > 0, n of them):
  power law    alpha = 1 + n / sum ln(x / x_min)
               ll_pl = n ln(alpha - 1) - n ln(x_min) - alpha sum ln(x / x_min)
  exponential  lambda = n / sum (x - x_min)          (shifted to start at x_min)
               ll_exp = n ln(lambda) - lambda sum (x - x_min)
  R = ll_pl - ll_exp;  R > 0 favours the power law -> log2 quantizer, else uniform.
x_min is unknown in the paper. Default (our choice): the `x_min_quantile` (0.1) quantile of the positive values,
so the test sees the bulk of the distribution; pass `x_min` to fix it. `normalized=True` returns Vuong's
statistic R / (sqrt(n) sigma) instead (sigma = std of the pointwise log-likelihood differences).
"""
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.quant.log2 import log2_search_delta, log_fake_quant
from tcaq_jax.quant.ranges import lp_search_params
from tcaq_jax.quant.uniform import fake_quant

_TINY = 1e-30


def default_x_min(values, x_min_quantile=0.1):
  """x_min_quantile-quantile of the positive entries of values (any shape) -> scalar."""
  x = jnp.asarray(values, jnp.float32).reshape(-1)
  return jnp.nanquantile(jnp.where(x > 0, x, jnp.nan), x_min_quantile)


@functools.partial(jax.jit, static_argnames=('normalized',))
def powerlaw_vs_exponential_llr(values, x_min=None, x_min_quantile=0.1, normalized=False):
  """Log-likelihood ratio R (power law vs exponential) of the values >= x_min. values: any shape -> scalar."""
  x = jnp.asarray(values, jnp.float32).reshape(-1)
  if x_min is None:
    x_min = default_x_min(x, x_min_quantile)
  x_min = jnp.maximum(jnp.asarray(x_min, jnp.float32), _TINY)
  mask = (x > 0) & (x >= x_min)
  n = jnp.sum(mask).astype(jnp.float32)
  safe = jnp.where(mask, x, x_min)
  ln_ratio = jnp.log(safe / x_min)               # 0 where masked out
  excess = safe - x_min
  alpha = 1. + n / jnp.maximum(jnp.sum(ln_ratio), _TINY)
  lam = n / jnp.maximum(jnp.sum(excess), _TINY)
  l_pl = jnp.log(alpha - 1.) - jnp.log(x_min) - alpha * ln_ratio
  l_exp = jnp.log(lam) - lam * excess
  d = jnp.where(mask, l_pl - l_exp, 0.)
  r = jnp.sum(d)
  if not normalized:
    return r
  mean = r / jnp.maximum(n, 1.)
  sigma = jnp.sqrt(jnp.sum(jnp.where(mask, (d - mean) ** 2, 0.)) / jnp.maximum(n, 1.))
  return r / (jnp.sqrt(jnp.maximum(n, 1.)) * jnp.maximum(sigma, _TINY))


@jax.jit
def choose_log2(values_per_step, x_min=None, x_min_quantile=0.1):
  """values_per_step: [T, N] samples of one post-Softmax layer per timestep -> bool [T] (True = log2)."""
  v = jnp.asarray(values_per_step, jnp.float32)
  v = v.reshape(v.shape[0], -1)
  f = lambda row: powerlaw_vs_exponential_llr(row, x_min, x_min_quantile) > 0
  return jax.vmap(f)(v)


def choice_table(samples, x_min=None, x_min_quantile=0.1):
  """{layer path: [T, N] values} -> {layer path: numpy bool [T]} (the offline per-(layer, step) DAQ table)."""
  return {k: np.asarray(choose_log2(v, x_min, x_min_quantile)) for k, v in samples.items()}


@flax.struct.dataclass
class DAQQuantizer:
  """Per-timestep post-Softmax quantizer (pytree). use_log2: bool [T]; delta: [T] (log grid);
  scale: [T] (uniform, unsigned, zero point 0); bits, log_kind static."""
  use_log2: jax.Array
  delta: jax.Array
  scale: jax.Array
  bits: int = flax.struct.field(pytree_node=False, default=8)
  log_kind: str = flax.struct.field(pytree_node=False, default='log2')


def init_daq_quantizer(values_per_step, bits=8, log_kind='log2', x_min=None, x_min_quantile=0.1):
  """DAQQuantizer from samples [T, N] (N values of the layer at each calibration step): the choice, a log delta
  (`log2_search_delta`) and a uniform scale (Lp search, p = 2, zero point 0) for every step."""
  v = jnp.asarray(values_per_step, jnp.float32)
  v = v.reshape(v.shape[0], -1)
  use = choose_log2(v, x_min, x_min_quantile)
  delta = jax.vmap(lambda row: log2_search_delta(row, bits, log_kind))(v)
  scale = jax.vmap(lambda row: lp_search_params(row, bits, None, p=2.0, symmetric=True)[0].reshape(()))(v)
  return DAQQuantizer(use_log2=use, delta=delta, scale=scale, bits=bits, log_kind=log_kind)


def daq_fake_quant(x, q, step_index):
  """Fake-quantize post-Softmax x (any shape, >= 0) with the quantizer chosen for step_index (int, may be
  traced)."""
  delta = q.delta[step_index]
  scale = q.scale[step_index]
  return jax.lax.cond(q.use_log2[step_index],
                      lambda: log_fake_quant(x, delta, q.bits, q.log_kind),
                      lambda: fake_quant(x, scale, 0., q.bits, signed=False))


# ------------------------------------------------------------------------------------------ output-error rule
CHOICES = ('uniform', 'log2', 'logsqrt2')


def attention_output(probs, v):
  """probs @ v for the attention layouts of tcaq_jax's models: probs [B, N, M] with v [B, M, C] (DDIM), or
  probs [B, h, N, M] with v [B, M, h, d] (LDM) -> [B, N, C] / [B, N, h, d]."""
  if probs.ndim == 3:
    return jnp.einsum('bij,bjc->bic', probs, v)
  return jnp.einsum('bhts,bshd->bthd', probs, v)


@functools.partial(jax.jit, static_argnames=('bits',))
def output_errors(probs, v, uniform_scale, log2_delta, logsqrt2_delta, bits):
  """Mean squared error of the attention output (probs @ v) when the probabilities are fake-quantized by each of
  CHOICES: uniform (unsigned, zero point 0, `uniform_scale`), log2 (`log2_delta`), log-sqrt2 (`logsqrt2_delta`).
  v: None -> the error of the probabilities themselves. Returns float32 [3]."""
  cands = (fake_quant(probs, uniform_scale, 0., bits),
           log_fake_quant(probs, log2_delta, bits, 'log2'),
           log_fake_quant(probs, logsqrt2_delta, bits, 'logsqrt2'))
  if v is None:
    return jnp.stack([jnp.mean((c - probs) ** 2) for c in cands])
  ref = attention_output(probs, v)
  return jnp.stack([jnp.mean((attention_output(c, v) - ref) ** 2) for c in cands])


def choose_by_error(errors) -> np.ndarray:
  """errors [K, 3] (per slot, CHOICES order) -> int [K] index of the lowest (uniform on ties)."""
  return np.argmin(np.asarray(errors), axis=-1).astype(np.int32)
