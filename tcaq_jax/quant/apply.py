"""quantized_apply: run any Flax model with quantized weights and activations (no quantization code in it).

Two parts (DESIGN.md):
  1. weights: a pure transform over params (`jax.tree_util.tree_map_with_path`): for every layer the policy
     quantizes, kernel -> fake_quant(kernel * r) with per-output-channel scales, AdaRound soft rounding while
     training ('soft'), hard rounding after ('hard'), or round-to-nearest ('nearest').
  2. activations: `flax.linen.intercept_methods` on the `__call__` of nn.Conv / nn.Dense / QuantPoint modules
     fake-quantizes their first argument: x -> fake_quant(x / r) with the state of the current timestep. The
     shortcut conv that eats concat([h, skip]) uses two quantizers split at the boundary; post-Softmax points
     select log2 or uniform per timestep (DAQ).

Quantizer state (`qstate`) is a `tcaq_jax.quant.state.QState`: the step -> slot map and one `LayerQState` per
quantized layer (TCR ratio, weight scales, AdaRound logits, per-slot activation scales, DAQ choice).
`step_index` may be a scalar (sampler) or one index per sample [B] (reconstruction minibatches mixing steps).
Imports nothing from the rest of tcaq_jax except its sibling quantizers.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcaq_jax.quant import log2 as log2q
from tcaq_jax.quant.adaround import adaround_fake_quant
from tcaq_jax.quant.state import LayerQState, QState
from tcaq_jax.quant.tcr import scale_activation, scale_kernel_inputs
from tcaq_jax.quant.uniform import fake_quant

__all__ = ['ApplyError', 'WEIGHT_MODES', 'quantize_weights', 'act_interceptor', 'quantized_apply',
           'submodule', 'block_method', 'slot_of', 'correct_output']

WEIGHT_MODES = ('soft', 'hard', 'nearest', 'fp')


class ApplyError(ValueError):
  """A policy / quantizer state does not fit the model (names the layer path)."""


def _in_paths(path: str, paths: Sequence[str] | None) -> bool:
  if paths is None:
    return True
  return any(p == '' or path == p or path.startswith(p + '/') for p in paths)


def _weight_fq(w, st, bits: int, mode: str, use_r: bool = True):
  """w: kernel (conv HWIO / dense [in, out]) -> W diag(r) fake-quantized per output channel."""
  if use_r and st.r is not None:
    w = scale_kernel_inputs(w, st.r)
  if mode == 'fp':
    return w
  if mode in ('soft', 'hard') and st.alpha is not None:
    return adaround_fake_quant(w, st.alpha, st.w_scale, st.w_zero, bits, hard=(mode == 'hard'))
  return fake_quant(w, jax.lax.stop_gradient(st.w_scale), st.w_zero, bits)


def quantize_weights(params: Any, qstate: QState, policy, mode: str = 'hard',
                     paths: Sequence[str] | None = None) -> Any:
  """params with every policy-selected kernel replaced by its fake-quantized W diag(r).

  mode: 'soft' | 'hard' (AdaRound; layers without alpha round to nearest) | 'nearest' | 'fp' (only the TCR
  rescale). paths: only layers under these module paths are transformed (None = all).
  """
  if mode not in WEIGHT_MODES:
    raise ApplyError(f'weight mode {mode!r} not in {WEIGHT_MODES}')
  layers = qstate.layers

  def fn(kp, leaf):
    keys = [getattr(k, 'key', getattr(k, 'name', str(k))) for k in kp]
    if not keys or keys[-1] != 'kernel':
      return leaf
    path = '/'.join(str(k) for k in keys[:-1])
    spec = policy.layers.get(path)
    st = layers.get(path)
    if spec is None or st is None or not _in_paths(path, paths):
      return leaf
    if spec.weights:
      if st.w_scale is None:
        raise ApplyError(f'layer {path!r}: policy quantizes weights but qstate has no w_scale')
      return _weight_fq(leaf, st, spec.w_bits, mode, use_r=spec.acts)
    if st.r is not None and spec.acts:
      return scale_kernel_inputs(leaf, st.r)
    return leaf

  return jax.tree_util.tree_map_with_path(fn, params)


def slot_of(qstate: QState, step_index) -> jax.Array:
  """Calibration slot(s) of a step index: scalar -> scalar, [B] -> [B]. A step index outside the calibrated
  sampler's steps (negative ones included) gives an invalid slot (never a clamped or wrapped neighbour), whose
  scales read as NaN (see `_at_slot`)."""
  idx = jnp.asarray(step_index, jnp.int32)
  n = qstate.step_slot.shape[0]
  valid = (idx >= 0) & (idx < n)
  return jnp.where(valid, qstate.step_slot[jnp.clip(idx, 0, n - 1)], _INVALID_SLOT)


_INVALID_SLOT = 2 ** 30


def _at_slot(values, slot):
  """values[slot] along axis 0, NaN for an out-of-range slot (`_INVALID_SLOT`): an uncalibrated step makes the
  output NaN, which samplers and evaluators refuse, instead of silently reusing another step's scales."""
  return jnp.take(values, slot, axis=0, mode='fill', fill_value=jnp.nan)


def _bcast(v, x):
  """v: [] or [B] -> broadcastable to x ([B', ...], B' a multiple of B: batch-major head folding)."""
  if v.ndim == 0:
    return v
  b = v.shape[0]
  if x.shape[0] != b:
    if x.shape[0] % b:
      raise ApplyError(f'activation batch {x.shape[0]} is not a multiple of the step_index batch {b}')
    v = jnp.repeat(v, x.shape[0] // b)
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _uniform(x, scale, zero, bits):
  return fake_quant(x, _bcast(scale, x), _bcast(zero, x), bits)


def act_fake_quant(x, st: LayerQState, spec, slot, learn_scale: bool = False, quantize: bool = True):
  """Fake-quantizes one layer input (x / r first when TCR is on). x: [B, ..., C]; slot: scalar or [B].

  quantize=False only applies the TCR division (the FP reparameterised model).
  """
  if st.r is not None and spec.kind in ('conv', 'dense'):
    x = scale_activation(x, st.r)
  if not quantize:
    return x
  scale, zero = _at_slot(st.a_scale, slot), _at_slot(st.a_zero, slot)       # [S] or [B, S]
  if not learn_scale:
    scale = jax.lax.stop_gradient(scale)
  bits = spec.a_bits
  if spec.split:
    s = spec.split
    return jnp.concatenate([_uniform(x[..., :s], scale[..., 0], zero[..., 0], bits),
                            _uniform(x[..., s:], scale[..., 1], zero[..., 1], bits)], axis=-1)
  x_uni = _uniform(x, scale[..., 0], zero[..., 0], bits)
  if spec.kind == 'softmax' and st.use_log2 is not None:
    use = _bcast(_at_slot(st.use_log2, slot), x)
    if st.log2_delta is not None and st.logsqrt2_delta is not None:     # use_log2: 0 uniform, 1 log2, 2 log-sqrt2
      x_l2 = log2q.log2_fake_quant(x, _bcast(_at_slot(st.log2_delta, slot), x), bits)
      x_ls = log2q.logsqrt2_fake_quant(x, _bcast(_at_slot(st.logsqrt2_delta, slot), x), bits)
      return jnp.where(use > 1.5, x_ls, jnp.where(use > 0.5, x_l2, x_uni))      # NaN slot: x_uni is NaN
    if st.log2_delta is not None:
      x_log = log2q.log2_fake_quant(x, _bcast(_at_slot(st.log2_delta, slot), x), bits)
    else:
      x_log = log2q.logsqrt2_fake_quant(x, _bcast(_at_slot(st.logsqrt2_delta, slot), x), bits)
    return jnp.where(use > 0.5, x_log, x_uni)   # NaN slot: x_uni is NaN
  return x_uni


def act_interceptor(qstate: QState, policy, step_index, paths: Sequence[str] | None = None,
                    learn_scale: bool = False, quantize: bool = True, act_mask: dict | None = None):
  """An interceptor (for `nn.intercept_methods`) that fake-quantizes policy-selected layer inputs
  (quantize=False: only divides them by the TCR ratio, keeping the model exact in FP).

  act_mask: {layer path: scalar, may be traced}: where it is 1 the layer's input is quantized, where 0 only
  divided by its TCR ratio (weights untouched), so one compiled program can switch single layers' activation
  quantizers on and off (sensitivity scans); paths missing from it are quantized."""
  slot = slot_of(qstate, step_index)
  layers = qstate.layers

  def interceptor(next_fun, args, kwargs, ctx):
    if ctx.method_name != '__call__' or not args:
      return next_fun(*args, **kwargs)
    path = '/'.join(ctx.module.path)
    spec = policy.layers.get(path)
    if spec is None or not spec.acts or not _in_paths(path, paths):
      return next_fun(*args, **kwargs)
    st = layers.get(path)
    if not quantize:
      if st is None or st.r is None:
        return next_fun(*args, **kwargs)
    elif st is None or st.a_scale is None:
      raise ApplyError(f'layer {path!r}: policy quantizes its input but qstate has no a_scale')
    x = act_fake_quant(args[0], st, spec, slot, learn_scale, quantize)
    if quantize and act_mask is not None and path in act_mask:
      x = jnp.where(act_mask[path] > 0.5, x, act_fake_quant(args[0], st, spec, slot, quantize=False))
    return next_fun(x, *args[1:], **kwargs)

  return interceptor


def submodule(root: nn.Module, path: str) -> nn.Module:
  """The bound submodule at a '/'-joined Flax path ('' = root), for setup()-style models.

  A segment 'name_1_0' resolves to attribute 'name' indexed [1][0] when no attribute 'name_1_0' exists.
  """
  m = root
  for seg in [s for s in path.split('/') if s]:
    if hasattr(m, seg) and not isinstance(getattr(m, seg), (list, tuple)):
      m = getattr(m, seg)
      continue
    mt = re.fullmatch(r'(.+?)((?:_\d+)+)', seg)
    if mt is None or not hasattr(m, mt.group(1)):
      raise ApplyError(f'no submodule {seg!r} in {type(m).__name__} (path {path!r})')
    m = getattr(m, mt.group(1))
    for i in mt.group(2).strip('_').split('_'):
      m = m[int(i)]
  return m


def block_method(path: str):
  """`method` for model.apply that runs only the submodule at `path`: fn(module, *args, **kwargs)."""
  def method(m, *args, **kwargs):
    return submodule(m, path)(*args, **kwargs)
  return method


def quantized_apply(model: nn.Module, variables: Any, qstate: QState, policy, *args, step_index,
                    weight_mode: str = 'hard', act_quant: bool = True, paths: Sequence[str] | None = None,
                    learn_act_scale: bool = False, method=None, **kwargs):
  """model.apply with quantized weights and activations.

  variables: {'params': ...} (other collections pass through); step_index: int scalar or [B] (traced ok);
  weight_mode: see quantize_weights; act_quant: False keeps activations FP (TCR division still applied, so
  weight_mode='fp', act_quant=False reproduces the FP model); paths: quantize only layers
  under these module paths; method: as in model.apply (e.g. block_method(path) to run one block).
  """
  variables = dict(variables)
  variables['params'] = quantize_weights(variables['params'], qstate, policy, weight_mode, paths)
  icpt = act_interceptor(qstate, policy, step_index, paths, learn_act_scale, quantize=act_quant)
  with nn.intercept_methods(icpt):
    return model.apply(variables, *args, method=method, **kwargs)


def correct_output(y, qstate: QState, step_index):
  """(y - qstate.out_bias[step_index]) * qstate.out_scale[step_index]: the whole model's eps corrected (either
  part skipped when None; unchanged without both). The caller applies it to the whole model's output
  (quantized_apply also runs single blocks and submodules, so it does not). step_index: scalar (one correction
  for the batch) or [B] (one per sample); an index outside the calibrated steps gives NaN."""
  bias, scale = qstate.out_bias, qstate.out_scale
  if bias is None and scale is None:
    return y
  idx = jnp.asarray(step_index, jnp.int32)

  def at_step(values):                 # values[idx] along the step axis; NaN outside the calibrated steps
    return _at_slot(values, jnp.where((idx >= 0) & (idx < values.shape[0]), idx, _INVALID_SLOT))

  if bias is not None:
    y = y - at_step(bias).astype(y.dtype)                                   # [*out] or [B, *out]
  if scale is not None:
    s = at_step(scale).astype(y.dtype)                                      # [] or [B]
    y = y * s.reshape(s.shape + (1,) * (y.ndim - s.ndim))
  return y

