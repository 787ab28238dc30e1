"""Reconstruction units of a model, and capture of a unit's inputs / outputs during a full forward.

A unit is either a block (the outermost module whose class matches the family's block classes,
`tcaq_jax.models.family.block_class_regex`) or a single quantized layer outside every block (time embedding,
input / output conv, resampling convs), in call order (METHOD.md section 5).

  units = find_units(model, variables, args, kwargs, policy, block_regex)
  capture = make_group_capture(paths, in_forward=q_fwd, out_forward=fp_fwd)     # compiled once, reusable
  io = capture_unit_io(capture, data, batch=64, in_consts=(params, qstate), out_consts=params, path=unit.path)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.quant.apply import quantized_apply, submodule
from tcaq_jax.quant.intercept import collect_calls
from tcaq_jax.quant.state import QState, merge_layers

__all__ = ['Unit', 'BlockError', 'find_units', 'CapturedIO', 'make_group_capture', 'make_io_capture',
           'capture_unit_io', 'capture_outputs', 'output_bytes', 'capture_groups', 'UnitProgram', 'unit_program',
           'io_signature', 'to_relative', 'to_absolute', 'unit_aux', 'unit_apply_fn']


class BlockError(ValueError):
  """No units, or a unit that is never called in the forward pass."""


@dataclasses.dataclass(frozen=True)
class Unit:
  """A reconstruction unit. path: module path; cls: its class name; layers: quantized layer paths inside."""
  path: str
  cls: str
  layers: tuple

  def to_dict(self):
    return {'path': self.path, 'cls': self.cls, 'layers': list(self.layers)}


def _inside(path: str, prefix: str) -> bool:
  return path == prefix or path.startswith(prefix + '/')


def find_units(model: nn.Module, variables: Any, args: Sequence, kwargs: dict | None, policy,
               block_regex: str) -> list[Unit]:
  """Units in call order (block_regex: class names of block modules). Units without a quantized layer are
  dropped."""
  def trace(v, *a):
    _, rec = collect_calls(lambda: model.apply(v, *a, **(kwargs or {})), select=lambda path, m: True,
                           record=lambda c: type(c.module).__name__)
    calls.extend(rec.items())      # static metadata leaves the trace through this closure
    return None

  calls: list[tuple[str, str]] = []
  jax.eval_shape(trace, variables, *args)
  quantized = [s.path for s in policy.quantized()]
  blocks: list[tuple[str, str]] = []
  for path, cls in calls:
    if re.search(block_regex, cls) and not any(_inside(path, b) for b, _ in blocks):
      blocks.append((path, cls))
  units, seen = [], set()
  for path, cls in calls:
    if path in seen:
      continue
    blk = next(((b, c) for b, c in blocks if b == path), None)
    if blk is not None:
      seen.add(path)
      layers = tuple(q for q in quantized if _inside(q, path))
      if layers:
        units.append(Unit(path, cls, layers))
    elif path in quantized and not any(_inside(path, b) for b, _ in blocks):
      seen.add(path)
      units.append(Unit(path, cls, (path,)))
  if not units:
    raise BlockError(f'{type(model).__name__}: no reconstruction units (policy quantizes nothing?)')
  return units


@dataclasses.dataclass
class CapturedIO:
  """A unit's captured call: array leaves stacked over the set, plus how to rebuild (args, kwargs).

  leaves: list of arrays [N, ...] (dynamic leaves of (args, kwargs)); statics: python leaves (None for
  dynamic positions); treedef: of (args, kwargs). output: [N, ...] array (or pytree) of the unit's output.
  """
  leaves: list
  statics: list
  treedef: Any
  output: Any = None

  def rebuild(self, leaves: Sequence) -> tuple[tuple, dict]:
    it = iter(leaves)
    full = [next(it) if s is None else s for s in self.statics]
    return jax.tree_util.tree_unflatten(self.treedef, full)


def make_group_capture(paths: Sequence[str], in_forward: Callable | None = None,
                       out_forward: Callable | None = None):
  """One compiled recorder for the units at `paths` (contiguous in call order): (fn(in_consts, out_consts,
  *data_batch), meta). fn returns ({path: dynamic input leaves}, {path: output}).

  in_forward(in_consts, *data_batch) runs the model whose *inputs* to the units are recorded (the partially
  quantized model); out_forward(out_consts, *data_batch) the model whose unit *outputs* are recorded (FP). Both
  run in one jitted call (consts are jit arguments, not baked-in constants); XLA drops what follows the last
  unit. A group serves every unit in it (`capture_unit_io(..., path=)` keeps one), so a model's units need one
  compile per group instead of one per unit, at the price of running the forward on to the group's last unit.
  Reuse it across calls with the same forwards (PAR rounds).
  """
  paths = tuple(paths)
  selected = frozenset(paths)
  meta: dict = {'paths': paths}

  def record(forward, consts, d, what):
    _, rec = collect_calls(lambda: forward(consts, *d), select=lambda p, m: p in selected, record=what)
    missing = [p for p in paths if p not in rec]
    if missing:
      raise BlockError(f'unit {missing[0]!r} was not called by the forward pass')
    return rec

  def run(ic, oc, *d):
    ins, outs = {}, {}
    if in_forward is not None:
      for p, (args, kwargs) in record(in_forward, ic, d, lambda c: (c.args, c.kwargs)).items():
        flat, treedef = jax.tree_util.tree_flatten((args, kwargs))
        meta[p] = {'treedef': treedef, 'statics': [None if isinstance(v, jax.Array) else v for v in flat]}
        ins[p] = [v for v in flat if isinstance(v, jax.Array)]
    if out_forward is not None:
      outs = record(out_forward, oc, d, lambda c: c.output)
    return ins, outs

  return jax.jit(run), meta


def capture_groups(units: Sequence[Unit], size: int) -> list[tuple[str, ...]]:
  """Consecutive units (call order) in groups of `size` (<= 1: one unit per group): one capture program each."""
  paths = [u.path for u in units]
  size = max(int(size), 1)
  return [tuple(paths[i:i + size]) for i in range(0, len(paths), size)]


def make_io_capture(path: str, in_forward: Callable | None = None, out_forward: Callable | None = None):
  """The compiled recorder of the one unit at `path` (a group of one; see `make_group_capture`)."""
  return make_group_capture((path,), in_forward, out_forward)


def _run_batched(fn, data: Sequence[np.ndarray], batch: int, in_consts: Any, out_consts: Any):
  """Yields (dynamic inputs, outputs, trim) of a recorder over a data set in batches of exactly `batch` (a short
  batch is padded to the compiled shape; trim cuts an array back to the real samples)."""
  n = int(data[0].shape[0])
  for i in range(0, n, batch):
    d = [np.asarray(a[i:i + batch]) for a in data]
    m = d[0].shape[0]
    if m < batch:          # a short (last or only) batch is padded to the compiled shape, then trimmed
      d = [np.concatenate([a, np.repeat(a[-1:], batch - m, axis=0)]) for a in d]
    dyn, out = fn(in_consts, out_consts, *[jnp.asarray(a) for a in d])
    yield dyn, out, ((lambda a, m=m: a[:m]) if m < batch else (lambda a: a))


def _concat(parts: list) -> Any:
  return jax.tree.map(lambda *o: jnp.concatenate(o, axis=0), *parts)


def capture_unit_io(capture, data: Sequence[np.ndarray], batch: int = 64, in_consts: Any = None,
                    out_consts: Any = None, path: str | None = None, output: Any = None) -> CapturedIO:
  """Runs a `make_group_capture` / `make_io_capture` recorder over a data set (arrays [N, ...] sliced along
  axis 0) in batches of exactly `batch` (a short batch is padded, so every call shares one compiled shape) and
  keeps unit `path`'s call (default: the recorder's only unit).

  Returns CapturedIO with device arrays (inputs when the recorder has an in_forward; output when it has an
  out_forward, else `output` as given: e.g. from `capture_outputs`). Blocks until the arrays are computed, so a
  caller's timer bills the capture's compute to the capture.
  """
  fn, meta = capture
  if path is None:
    if len(meta['paths']) != 1:
      raise BlockError(f'the recorder captures {len(meta["paths"])} units: name one with path=')
    path = meta['paths'][0]
  elif path not in meta['paths']:
    raise BlockError(f'unit {path!r} is not captured by this recorder ({list(meta["paths"])})')
  ins, outs = [], []
  for dyn, out, trim in _run_batched(fn, data, batch, in_consts, out_consts):
    ins.append([trim(a) for a in dyn.get(path, [])])
    outs.append(None if out.get(path) is None else jax.tree.map(trim, out[path]))
    del dyn, out                                # the group's other units are dropped batch by batch
  leaves = [jnp.concatenate([b[j] for b in ins], axis=0) for j in range(len(ins[0]))] if ins[0] else []
  if outs[0] is not None:
    output = _concat(outs)
  jax.block_until_ready((leaves, output))
  m = meta.get(path, {})
  return CapturedIO(leaves, m.get('statics', []), m.get('treedef'), output)


def capture_outputs(capture, data: Sequence[np.ndarray], batch: int = 64, out_consts: Any = None) -> dict:
  """{path: output [N, ...]} of every unit of a recorder made with an out_forward only (one pass over the set
  serves all its units: the FP targets of a whole round)."""
  fn, meta = capture
  outs = [{p: jax.tree.map(trim, o) for p, o in out.items()}
          for _, out, trim in _run_batched(fn, data, batch, None, out_consts)]
  res = {p: _concat([o[p] for o in outs]) for p in meta['paths']}
  return jax.block_until_ready(res)


def output_bytes(capture, data: Sequence[np.ndarray], batch: int, out_consts: Any = None) -> int:
  """Bytes `capture_outputs` would hold for this set (from shapes only; nothing runs)."""
  fn, _ = capture
  d = [jax.ShapeDtypeStruct((batch,) + tuple(a.shape[1:]), jnp.asarray(a[:1]).dtype) for a in data]
  _, out = jax.eval_shape(fn, None, out_consts, *d)
  per_batch = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(out))
  return int(per_batch * data[0].shape[0] / batch)


def _relative(path: str, prefix: str) -> str:
  return '' if path == prefix else path[len(prefix) + 1:]


def to_relative(tree: dict, unit: Unit) -> dict:
  """{absolute layer path: x} -> {path relative to the unit: x} (only the unit's layers)."""
  return {_relative(p, unit.path): v for p, v in tree.items() if _inside(p, unit.path)}


def to_absolute(tree: dict, unit: Unit) -> dict:
  """Inverse of `to_relative`."""
  return {(unit.path if not p else f'{unit.path}/{p}'): v for p, v in tree.items()}


@dataclasses.dataclass(frozen=True)
class UnitProgram:
  """A unit as a standalone module: `module` is an unbound copy of the unit's submodule (its params are the
  subtree at unit.path), `policy` the unit's layer specs with paths relative to it, `signature` a hashable
  description of both. Units with equal signatures (same class, hyper-parameters and quantizers; inputs of the
  same shapes) compute the same function of (params, quantizer state, inputs), so their compiled
  reconstruction functions are shared."""
  module: nn.Module
  policy: Any
  signature: tuple


def unit_program(model: nn.Module, params: dict, policy, unit: Unit) -> UnitProgram:
  from tcaq_jax.quant.policy import Policy

  sub = submodule(model.bind({'params': params}), unit.path).clone(parent=None)
  hyper = tuple((f.name, repr(getattr(sub, f.name))) for f in dataclasses.fields(sub)
                if f.name not in ('parent', 'name'))
  specs = {_relative(p, unit.path): dataclasses.replace(s, path=_relative(p, unit.path))
           for p, s in policy.layers.items() if _inside(p, unit.path)}
  rel = Policy(layers=specs, rules=[], preset=policy.preset)
  signature = (type(sub).__name__, hyper, tuple(sorted(dataclasses.astuple(s) for s in specs.values())))
  return UnitProgram(sub, rel, signature)


def io_signature(io: CapturedIO) -> tuple:
  """Hashable structure of a unit's captured inputs: treedef, static leaves, per-sample shapes and dtypes."""
  return (str(io.treedef), repr(io.statics), tuple((tuple(a.shape[1:]), str(a.dtype)) for a in io.leaves))


def unit_aux(params: dict, qstate: QState, unit: Unit) -> dict:
  """Frozen arrays a unit needs: its params subtree and its layers' quantizer state (paths relative to the
  unit) with the step map."""
  node = params
  for seg in unit.path.split('/'):
    node = node[seg]
  return {'params': node, 'qstate': qstate.replace(layers=to_relative(qstate.layers, unit), out_bias=None, out_scale=None)}


def unit_apply_fn(program: UnitProgram, io: CapturedIO, weight_mode: str = 'soft',
                  learn_act_scale: bool = False) -> Callable:
  """apply_fn(theta, aux, inputs_batch, steps_batch) -> the unit's quantized output (for recon.reconstruct).

  theta: {relative layer path: LayerQState} (the trained fields: alpha, a_scale) merged over aux['qstate'].
  """
  def apply_fn(theta, aux, xb, sb):
    qs = aux['qstate']
    qs = qs.replace(layers=merge_layers(qs.layers, theta))
    args, kwargs = io.rebuild(xb)
    return quantized_apply(program.module, {'params': aux['params']}, qs, program.policy, *args, step_index=sb,
                           weight_mode=weight_mode, learn_act_scale=learn_act_scale, **kwargs)

  return apply_fn
