"""Integer execution of a quantized model: nn.Conv / nn.Dense layers whose weights and inputs are both
quantized to <= 8 bits run as int8 x int8 -> int32 kernels (`intops`) plus one rescale, and so do the attention
matmuls (q k^T, probs @ v: a model's `QuantMatmul` modules) whose two operand points are quantized per tensor to
<= 8 bits; every other quantized point (> 8-bit layers or operands, weight-only or input-only layers, convs with
feature groups or input dilation, an attention operand whose partner stays FP) keeps the fake-quant path of
`apply.act_interceptor`.

  iw = IntWeights.from_storage(w, w_scale, w_zero, bits, shape, split, bias)   # one layer's integer kernel
  routes, matmuls = int_plan(model, variables, policy, *example_args)  # {path: 'int' | why not}, {path: IntMatmul}
  y = int_apply(model, variables, qstate, policy, {path: iw, **matmuls}, x, t, step_index=i)
  y = int_matmul('bic,bjc->bij', q, st_q, spec_q, k, st_k, spec_k, slot)    # one attention matmul on integers
`variables['params']` holds the float params with TCR folded in and the fallback layers' kernels already
fake-quantized (the export's `dequantized` weights); integer layers need no float kernel there.
Per-step activation scales are picked by `apply.slot_of(step_index)`; the integer path needs a scalar
step_index (the sampler's).

Attention: a QuantMatmul (any module named 'QuantMatmul' with `equation` and `operands`, the names of the sibling
QuantPoints whose outputs are its operands; tcaq_jax/models/qpoint.py) is intercepted and replaced by
`int_matmul` on its raw operands; the two operand QuantPoints then pass their inputs through unchanged (their
outputs must feed only that matmul, as in the models). A post-Softmax operand keeps the fake-quant einsum at the
slots whose DAQ choice is log2 / log-sqrt2 (its codes are exponents).

int32 range: a layer or matmul whose worst case `intops.accumulator_bound(K, a_bits, b_bits)`,
K (2^a - 1)(2^b - 1), exceeds 2^31 - 1 keeps fake quant (route 'int32 accumulator could overflow: ...'), with K
the reduction size: kernel window x input channels for a conv (all input channels, also when split at a
concatenation: an upper bound of each segment's), in_features for a dense layer, the product of the contracted
axes' sizes for a matmul (at the shapes of `int_plan`'s example inputs). At 8/8 bits that is K > 33,025.
`int_apply` refuses (ApplyError) an integer layer whose K at the actual input shapes exceeds it instead of
returning wrapped int32 values.
Imports nothing from the rest of tcaq_jax except its sibling quantizers.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.quant import intops
from tcaq_jax.quant.apply import ApplyError, _at_slot, act_fake_quant, act_interceptor, slot_of
from tcaq_jax.quant.intercept import collect_calls
from tcaq_jax.quant.tcr import scale_activation

__all__ = ['MAX_INT_BITS', 'IntWeights', 'IntMatmul', 'int_support', 'overflow_reason', 'int_plan', 'int_routes',
           'int_interceptor', 'int_apply', 'int_matmul']

MAX_INT_BITS = 8


@flax.struct.dataclass
class IntWeights:
  """One layer's integer kernel. w: int8 codes - offset (kernel shape), or uint8 packed nibbles (<= 4 bits);
  w_scale: f32 [S, Cout]; w_zero: int32 [S, Cout] (offset applied), one row per input segment; bias: f32 [Cout] or None."""
  w: Any
  w_scale: Any
  w_zero: Any
  bias: Any = None
  bits: int = flax.struct.field(pytree_node=False, default=8)
  shape: tuple = flax.struct.field(pytree_node=False, default=())
  packed: bool = flax.struct.field(pytree_node=False, default=False)

  @staticmethod
  def from_storage(w, w_scale, w_zero, bits: int, shape: Sequence[int], split: int | None = None,
                   bias=None) -> 'IntWeights':
    """From stored arrays: w int8 (codes - offset) or packed uint8 (bits <= 4); w_scale, w_zero: the unsigned
    quantizer's keepdims [1, .., Cout], or kernel-shaped [1, .., Cin, Cout] when split at a concatenation
    (constant over each input segment). Keeps one row per input segment: [S, Cout]."""
    rows = [0, split] if split else [0]

    def per_segment(a):
      a = np.broadcast_to(np.asarray(a, np.float32), (1,) * (len(shape) - 2) + tuple(shape[-2:]))
      return a.reshape(shape[-2:])[rows]

    zero = jnp.asarray(per_segment(w_zero) - intops.int8_offset(bits), jnp.int32)
    return IntWeights(jnp.asarray(w), jnp.asarray(per_segment(w_scale)), zero,
                      None if bias is None else jnp.asarray(bias, jnp.float32), int(bits), tuple(shape),
                      int(bits) <= 4)

  def int8(self) -> jax.Array:
    """The int8 kernel (unpacked on the fly for W4)."""
    return intops.unpack_int4(self.w, self.shape) if self.packed else self.w


@flax.struct.dataclass
class IntMatmul:
  """An attention matmul on the integer path: its QuantMatmul's einsum equation and the policy paths of the two
  QuantPoints that quantize its operands. No arrays (a static pytree node)."""
  equation: str = flax.struct.field(pytree_node=False)
  a: str = flax.struct.field(pytree_node=False)
  b: str = flax.struct.field(pytree_node=False)


def _is_quant_matmul(module) -> bool:
  return type(module).__name__ == 'QuantMatmul' and hasattr(module, 'equation') and hasattr(module, 'operands')


def _conv_geometry(module: nn.Conv, x_ndim: int):
  """(kernel, strides, dilation, padding) of a plain nn.Conv, or a string saying why it is not supported."""
  ks = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)

  def bc(v):
    v = 1 if v is None else v
    return (v,) * len(ks) if isinstance(v, int) else tuple(v)

  if x_ndim != len(ks) + 2:
    return f'input rank {x_ndim} is not {len(ks) + 2} (several batch axes)'
  if module.feature_group_count != 1 or any(d != 1 for d in bc(module.input_dilation)):
    return 'feature groups or input dilation'
  if getattr(module, 'mask', None) is not None or not getattr(module, 'shared_weights', True):
    return 'masked or unshared kernel'
  padding = nn.linear.canonicalize_padding(module.padding, len(ks))
  if isinstance(padding, str) and padding not in ('SAME', 'VALID'):
    return f'padding {padding!r}'
  return ks, bc(module.strides), bc(module.kernel_dilation), padding


def overflow_reason(k: int, a_bits: int, b_bits: int) -> str | None:
  """None when an int32 accumulation of reduction size k over a_bits x b_bits codes is exact, else the route
  string saying why not (`intops.accumulator_bound`)."""
  bound = intops.accumulator_bound(k, a_bits, b_bits)
  if bound <= intops.INT32_MAX:
    return None
  return (f'int32 accumulator could overflow: K={int(k)}, bits {int(a_bits)}x{int(b_bits)}: '
          f'K (2^{int(a_bits)} - 1)(2^{int(b_bits)} - 1) = {bound} > 2^31 - 1')


def int_support(module: nn.Module, spec, x_ndim: int) -> str:
  """'int' when the layer can run on the integer path, else the reason it keeps fake quant. For an attention
  operand point ('matmul' / 'softmax'), 'int' means it can be one operand of an integer matmul (`int_plan`
  decides with its partner and the contraction size). Convs / dense layers: K = window x spec.in_features."""
  if spec.kind in ('matmul', 'softmax'):
    if not spec.acts:
      return 'not quantized'
    if spec.a_bits > MAX_INT_BITS or spec.split:
      return f'a{spec.a_bits}{" split" if spec.split else ""}: not one <= {MAX_INT_BITS}-bit quantizer'
    return 'int'
  if not (spec.weights and spec.acts):
    return 'weights or input not quantized'
  if spec.w_bits > MAX_INT_BITS or spec.a_bits > MAX_INT_BITS:
    return f'w{spec.w_bits}a{spec.a_bits}: more than {MAX_INT_BITS} bits'
  if type(module) is nn.Dense:
    return overflow_reason(spec.in_features, spec.a_bits, spec.w_bits) or 'int'
  if type(module) is not nn.Conv:
    return f'{type(module).__name__} is not nn.Conv / nn.Dense'
  geo = _conv_geometry(module, x_ndim)
  if isinstance(geo, str):
    return geo
  return overflow_reason(int(np.prod(geo[0])) * spec.in_features, spec.a_bits, spec.w_bits) or 'int'


def int_plan(model: nn.Module, variables: Any, policy, *args, method=None, **kwargs) -> tuple[dict, dict]:
  """(routes, matmuls), found by tracing one forward (no FLOPs): routes {path: 'int' | reason} for every
  quantized policy layer; matmuls {QuantMatmul path: IntMatmul} for the attention matmuls whose two operand
  points can both run on integers and whose int32 accumulation cannot overflow (those points' route is then
  'int'; module docstring). variables must be complete for a float forward (e.g. the dequantized export)."""
  def record(call):
    if _is_quant_matmul(call.module):
      parent = call.path.rpartition('/')[0]
      a, b = (f'{parent}/{name}' if parent else name for name in call.module.operands)
      sizes[call.path] = intops.contracted_size(call.module.equation, call.args[0].shape, call.args[1].shape)
      return IntMatmul(call.module.equation, a, b)
    return int_support(call.module, policy.layers[call.path], call.args[0].ndim)

  def quantized(path, m):
    spec = policy.layers.get(path)
    return spec is not None and (spec.weights or spec.acts)

  def fwd(v, *a):
    out, rec = collect_calls(lambda: model.apply(v, *a, method=method, **kwargs),
                             select=lambda p, m: _is_quant_matmul(m) or quantized(p, m), record=record,
                             need_args=True)
    found.update(rec)
    return out

  found: dict = {}
  sizes: dict = {}          # QuantMatmul path -> contracted size K
  jax.eval_shape(fwd, variables, *args)
  routes = {s.path: found.get(s.path, 'not called') for s in policy.quantized()}
  operand_ok = {p: r for p, r in routes.items() if policy.layers[p].kind in ('matmul', 'softmax') and r == 'int'}
  for p in operand_ok:
    routes[p] = 'not the operand of a QuantMatmul'
  matmuls = {}
  for path, mm in found.items():
    if not isinstance(mm, IntMatmul):
      continue
    for this, other in ((mm.a, mm.b), (mm.b, mm.a)):
      if this in operand_ok:
        routes[this] = (f'its matmul\'s other operand {other!r} keeps fake quant ({routes.get(other, "FP")})'
                        if other not in operand_ok else 'int')
    if mm.a in operand_ok and mm.b in operand_ok:
      why = overflow_reason(sizes[path], policy.layers[mm.a].a_bits, policy.layers[mm.b].a_bits)
      if why:
        routes[mm.a] = routes[mm.b] = f'{why} (matmul {path!r}, {mm.equation})'
      else:
        matmuls[path] = mm
  return routes, matmuls


def int_routes(model: nn.Module, variables: Any, policy, *args, method=None, **kwargs) -> dict:
  """{path: 'int' | reason} for every quantized policy layer (`int_plan`'s routes)."""
  return int_plan(model, variables, policy, *args, method=method, **kwargs)[0]


def _int_layer(module, x, st, spec, iw: IntWeights, slot):
  """y of one quantized conv / dense on the integer path (TCR division and activation codes included)."""
  if st.r is not None:
    x = scale_activation(x, st.r)
  scale, zero = _at_slot(st.a_scale, slot), _at_slot(st.a_zero, slot)       # [S]
  w = iw.int8()
  c = x.shape[-1]
  bounds = [(0, spec.split), (spec.split, c)] if spec.split else [(0, c)]
  off = intops.int8_offset(spec.a_bits)
  y = 0.
  for i, (lo, hi) in enumerate(bounds):
    xq = intops.act_codes(x[..., lo:hi], scale[i], zero[i], spec.a_bits)
    za = jnp.nan_to_num(zero[i]).astype(jnp.int32) - off      # NaN (uncalibrated step) reaches y via scale
    wi = w[..., lo:hi, :]
    why = overflow_reason(int(np.prod(wi.shape[:-1])), spec.a_bits, iw.bits)
    if why:
      raise ApplyError(f'layer {spec.path!r}: {why}')
    if type(module) is nn.Dense:
      acc = intops.int_dense(xq, za, wi, iw.w_zero[i])
    else:
      ks, strides, dil, padding = _conv_geometry(module, x.ndim)
      pads = intops.conv_pads(padding, x.shape[1:-1], ks, strides, dil)
      acc = intops.int_conv(xq, za, wi, iw.w_zero[i], strides, pads, dil)
    y = y + acc.astype(jnp.float32) * (scale[i] * iw.w_scale[i])
  if iw.bias is not None:
    y = y + iw.bias
  return y


def int_matmul(equation: str, a, st_a, spec_a, b, st_b, spec_b, slot) -> jax.Array:
  """einsum(equation, Q_a(a), Q_b(b)) with Q the operands' per-tensor activation quantizers at calibration slot
  `slot` (a scalar), computed as one exact int32 einsum (`intops.int_einsum`) and one rescale s_a s_b.

  a, b: float operands as the model feeds its quantization points (e.g. q, k [B, N, C]; probs [B, N, M], v);
  st_*: their LayerQState (a_scale / a_zero [K, 1]); spec_*: their LayerSpec (kind 'matmul' or 'softmax',
  a_bits <= 8). A post-Softmax operand with DAQ state (use_log2) keeps fake quant at the slots whose choice is a
  log2 / log-sqrt2 quantizer: its codes are exponents (x = delta 2^(-q/k)), not affine in the value, so no int8
  matmul gives probs @ v; there the result is the float einsum of the dequantized operands, as on the fake path.
  """
  for spec in (spec_a, spec_b):
    if spec.kind not in ('matmul', 'softmax') or not spec.acts or spec.a_bits > MAX_INT_BITS or spec.split:
      raise ApplyError(f'{spec.path!r}: int_matmul needs an unsplit attention operand quantized to <= '
                       f'{MAX_INT_BITS} bits, got kind {spec.kind!r}, a_bits {spec.a_bits}')
  operands = []
  for x, st, spec in ((a, st_a, spec_a), (b, st_b, spec_b)):
    scale, zero = _at_slot(st.a_scale, slot)[0], _at_slot(st.a_zero, slot)[0]
    xq = intops.act_codes(x, scale, zero, spec.a_bits)
    za = jnp.nan_to_num(zero).astype(jnp.int32) - intops.int8_offset(spec.a_bits)   # NaN slot: via scale
    operands.append((xq, za, scale))
  (aq, za, sa), (bq, zb, sb) = operands
  why = overflow_reason(intops.contracted_size(equation, aq.shape, bq.shape), spec_a.a_bits, spec_b.a_bits)
  if why:
    raise ApplyError(f'matmul of {spec_a.path!r} and {spec_b.path!r}: {why}')
  y = intops.int_einsum(equation, aq, za, bq, zb).astype(jnp.float32) * (sa * sb)
  logs = [(x, st, spec) for x, st, spec in ((a, st_a, spec_a), (b, st_b, spec_b))
          if spec.kind == 'softmax' and st.use_log2 is not None]
  if not logs:
    return y
  fake = jnp.einsum(equation, act_fake_quant(a, st_a, spec_a, slot), act_fake_quant(b, st_b, spec_b, slot))
  use_log = sum(_at_slot(st.use_log2, slot) for _, st, _ in logs) > 0.5
  return jnp.where(use_log, fake, y)


def int_interceptor(qstate, policy, int_layers: dict, step_index, paths: Sequence[str] | None = None):
  """Like `apply.act_interceptor`, but the layers in `int_layers` run on integers: {path: IntWeights} for
  convs / dense layers, {QuantMatmul path: IntMatmul} for attention matmuls (their operand points then pass
  their inputs through unquantized)."""
  fake = act_interceptor(qstate, policy, step_index, paths)
  slot = slot_of(qstate, step_index)
  operands = {p for mm in int_layers.values() if isinstance(mm, IntMatmul) for p in (mm.a, mm.b)}

  def interceptor(next_fun, args, kwargs, ctx):
    path = '/'.join(ctx.module.path)
    if ctx.method_name != '__call__' or not args:
      return fake(next_fun, args, kwargs, ctx)
    if path in operands:
      return next_fun(*args, **kwargs)
    op = int_layers.get(path)
    if op is None:
      return fake(next_fun, args, kwargs, ctx)
    if slot.ndim:
      raise ApplyError(f'layer {path!r}: the integer path needs one scalar step_index, got shape {slot.shape}')
    if isinstance(op, IntMatmul):
      layers, specs = qstate.layers, policy.layers
      return int_matmul(op.equation, args[0], layers[op.a], specs[op.a], args[1], layers[op.b], specs[op.b], slot)
    return _int_layer(ctx.module, args[0], qstate.layers[path], policy.layers[path], op, slot)

  return interceptor


def int_apply(model: nn.Module, variables: Any, qstate, policy, int_layers: dict, *args, step_index,
              method=None, **kwargs):
  """model.apply with `int_layers` ({path: IntWeights | IntMatmul}, see `int_interceptor`) on the integer path
  and fake-quantized inputs everywhere else the policy quantizes (weights of the non-integer layers must already
  be fake-quantized in variables['params'])."""
  with nn.intercept_methods(int_interceptor(qstate, policy, int_layers, step_index)):
    return model.apply(variables, *args, method=method, **kwargs)
