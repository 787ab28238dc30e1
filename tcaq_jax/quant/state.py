"""Typed quantizer state of a whole model: one `LayerQState` per quantized layer, gathered in a `QState`.

Both are `flax.struct.dataclass` pytrees: they pass through `jax.jit`, `jax.grad` and orbax as they are. A field
that a layer does not use is None (an empty subtree: not a leaf, not saved, not traced).

  QState(step_slot: int32 [n_steps]             sampler step index -> calibration slot (K slots)
         layers: {path: LayerQState}             keyed by Flax module path ('up_1/block_0/nin_shortcut')
         out_bias: [n_steps, *out] or None       per sampler step, subtracted from the whole model's output
                                                 (the mean quantization error of eps: `apply.correct_output`)
         out_scale: [n_steps] or None)           per sampler step, multiplies the output after the bias
                                                 (PTQD's correlated-noise correction 1 / (1 + k))
  LayerQState(
      r:              [Cin]            TCR ratio: kernel * r, activation / r (used when the input is quantized)
      w_scale, w_zero: keepdims [.., Cout]   per-output-channel weight quantizer
      alpha:          kernel shape     AdaRound logits
      a_scale, a_zero: [K, S]          per-slot activation quantizer (S = 2 when split at a concat)
      log2_delta or logsqrt2_delta: [K]    post-Softmax log quantizer (DAQ)
      use_log2:       [K] float        DAQ choice per slot: 0 uniform, 1 the log quantizer whose delta is set;
                                       with both deltas set 1 = log2, 2 = log-sqrt2)

`merge(base, update)` is the one way to combine states: fields set in `update` override those of `base`.
`to_tree` / `from_tree` give the nested-dict form orbax stores (module paths joined by '.', since orbax dislikes
'/' in keys); `from_tree` also reads the earlier layout (paths nested, fields under '__state__').
Imports nothing from the rest of tcaq_jax.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax.numpy as jnp

__all__ = ['LayerQState', 'QState', 'FIELDS', 'merge_layers', 'to_tree', 'from_tree']

Array = Any


@flax.struct.dataclass
class LayerQState:
  """Quantizer state of one layer (every field optional; see the module docstring for shapes)."""
  r: Array = None
  w_scale: Array = None
  w_zero: Array = None
  alpha: Array = None
  a_scale: Array = None
  a_zero: Array = None
  log2_delta: Array = None
  logsqrt2_delta: Array = None
  use_log2: Array = None

  def has(self, name: str) -> bool:
    return getattr(self, name) is not None

  def set_fields(self) -> dict:
    """{field: value} of the fields that are set."""
    return {f: getattr(self, f) for f in FIELDS if getattr(self, f) is not None}

  def merge(self, update: 'LayerQState | Mapping | None') -> 'LayerQState':
    """self with the fields set in `update` (a LayerQState or a {field: value} mapping) replaced."""
    if update is None:
      return self
    new = update.set_fields() if isinstance(update, LayerQState) else {k: v for k, v in update.items()
                                                                       if v is not None}
    unknown = set(new) - set(FIELDS)
    if unknown:
      raise KeyError(f'LayerQState has no field(s) {sorted(unknown)}; fields: {FIELDS}')
    return self.replace(**new)


FIELDS = tuple(f.name for f in dataclasses.fields(LayerQState))


@flax.struct.dataclass
class QState:
  """Quantizer state of a model: the step -> slot map, the per-layer states and the output correction."""
  step_slot: Array
  layers: dict = flax.struct.field(default_factory=dict)
  out_bias: Array = None
  out_scale: Array = None

  def layer(self, path: str) -> LayerQState | None:
    return self.layers.get(path)

  def merge(self, updates: Mapping[str, 'LayerQState | Mapping']) -> 'QState':
    """A QState whose layers are `merge_layers(self.layers, updates)`."""
    return self.replace(layers=merge_layers(self.layers, updates))

  def subset(self, prefix: str) -> 'QState':
    """Only the layers at or under module path `prefix`."""
    return self.replace(layers={p: st for p, st in self.layers.items()
                                if p == prefix or p.startswith(prefix + '/')})


def merge_layers(layers: Mapping[str, LayerQState], updates: Mapping[str, Any]) -> dict:
  """{path: LayerQState}: `layers` with each `updates[path]` merged in (new paths are added)."""
  out = dict(layers)
  for path, upd in updates.items():
    out[path] = out.get(path, LayerQState()).merge(upd)
  return out


def to_tree(qstate: QState) -> dict:
  """QState -> {'step_slot': .., 'layers': {'a.b.c': {field: array}}[, 'out_bias': ..][, 'out_scale': ..]}
  (for orbax)."""
  tree = {'step_slot': qstate.step_slot,
          'layers': {path.replace('/', '.'): st.set_fields() for path, st in qstate.layers.items()}}
  if qstate.out_bias is not None:
    tree['out_bias'] = qstate.out_bias
  if qstate.out_scale is not None:
    tree['out_scale'] = qstate.out_scale
  return tree


def from_tree(tree: Mapping) -> QState:
  """Inverse of `to_tree` (arrays as jnp); also reads the earlier nested '__state__' layout."""
  layers = {}

  def walk(node, prefix):
    for k, v in node.items():
      if k == '__state__':
        layers['/'.join(prefix)] = v
      else:
        walk(v, prefix + [k])

  raw = tree['layers']
  if any(isinstance(v, Mapping) and not set(v) <= set(FIELDS) for v in raw.values()):
    walk(raw, [])                                   # earlier layout: nested path segments
  else:
    layers = {k.replace('.', '/'): v for k, v in raw.items()}
  bias, scale = tree.get('out_bias'), tree.get('out_scale')
  return QState(step_slot=jnp.asarray(tree['step_slot'], jnp.int32),
                layers={p: LayerQState(**{n: jnp.asarray(a) for n, a in st.items()}) for p, st in layers.items()},
                out_bias=None if bias is None else jnp.asarray(bias),
                out_scale=None if scale is None else jnp.asarray(scale))

