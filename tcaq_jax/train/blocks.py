"""Reconstruction units per model family, and capture of a unit's inputs / outputs during a full forward.

A unit is either a block (the outermost module whose class is a residual / attention / transformer block of
the family) or a single quantized layer outside every block (time embedding, input / output conv, resampling
convs), in call order (METHOD.md section 5).

  units = find_units(model, variables, args, kwargs, policy, family='ddim')
  io = capture_unit_io(forward, unit.path, data_args, data_kwargs, batch=64)   # inputs or outputs over a set
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['BLOCK_CLASSES', 'Unit', 'find_units', 'CapturedIO', 'capture_unit_io']

BLOCK_CLASSES = {
    'ddim': r'^(ResnetBlock|AttnBlock)$',
    'ldm': r'^(ResBlock|AttentionBlock|SpatialTransformer)$',
}


class BlockError(ValueError):
  """Unknown family, no units, or a unit that is never called in the forward pass."""


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
               family: str = 'ddim', block_regex: str | None = None) -> list[Unit]:
  """Units in call order. Units without any quantized layer are dropped."""
  if block_regex is None:
    if family not in BLOCK_CLASSES:
      raise BlockError(f'unknown model family {family!r} for block units; known {sorted(BLOCK_CLASSES)}')
    block_regex = BLOCK_CLASSES[family]
  calls: list[tuple[str, str]] = []

  def icpt(next_fun, a, kw, ctx):
    if ctx.method_name == '__call__':
      calls.append(('/'.join(ctx.module.path), type(ctx.module).__name__))
    return next_fun(*a, **kw)

  with nn.intercept_methods(icpt):
    jax.eval_shape(lambda v, *a: model.apply(v, *a, **(kwargs or {})), variables, *args)
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


def capture_unit_io(path: str, data: Sequence[np.ndarray], batch: int = 64, in_forward: Callable | None = None,
                    in_consts: Any = None, out_forward: Callable | None = None, out_consts: Any = None,
                    cache: dict | None = None) -> CapturedIO:
  """Records the (args, kwargs) and/or the output of the module at `path` over a data set, in batches.

  in_forward(in_consts, *data_batch) runs the model whose *inputs* to the unit are recorded (the partially
  quantized model); out_forward(out_consts, *data_batch) the model whose unit *output* is recorded (FP). Both
  run in one jitted call (consts are jit arguments, not baked-in constants); XLA drops what follows the unit.
  data: arrays [N, ...] sliced along axis 0. cache: a dict keeping the compiled function between calls with
  the same forwards (e.g. across PAR rounds). Returns CapturedIO with device arrays.
  """
  key = ('capture', path, in_forward is not None, out_forward is not None)
  entry = cache.get(key) if cache is not None else None
  if entry is None:
    meta: dict = {}

    def record(forward, consts, d):
      rec = {}

      def icpt(next_fun, a, kw, ctx):
        if ctx.method_name == '__call__' and 'out' not in rec and '/'.join(ctx.module.path) == path:
          out = next_fun(*a, **kw)
          rec['in'] = (tuple(a), dict(kw))
          rec['out'] = out
          return out
        return next_fun(*a, **kw)

      with nn.intercept_methods(icpt):
        forward(consts, *d)
      if 'out' not in rec:
        raise BlockError(f'unit {path!r} was not called by the forward pass')
      return rec

    def run(ic, oc, *d):
      dyn, out = [], None
      if in_forward is not None:
        rec = record(in_forward, ic, d)
        flat, treedef = jax.tree_util.tree_flatten(rec['in'])
        meta['treedef'] = treedef
        meta['statics'] = [None if isinstance(v, jax.Array) else v for v in flat]
        dyn = [v for v in flat if isinstance(v, jax.Array)]
      if out_forward is not None:
        out = record(out_forward, oc, d)['out']
      return dyn, out

    entry = (jax.jit(run), meta)
    if cache is not None:
      cache[key] = entry
  fn, meta = entry
  n = int(data[0].shape[0])
  ins, outs = [], []
  for i in range(0, n, batch):
    d = [jnp.asarray(a[i:i + batch]) for a in data]
    dyn, out = fn(in_consts, out_consts, *d)
    ins.append(dyn)
    outs.append(out)
  leaves = [jnp.concatenate([b[j] for b in ins], axis=0) for j in range(len(ins[0]))] if ins[0] else []
  output = jax.tree.map(lambda *o: jnp.concatenate(o, axis=0), *outs) if out_forward is not None else None
  return CapturedIO(leaves, meta.get('statics', []), meta.get('treedef'), output)


def prune_tree(tree: dict, prefixes: Sequence[str]) -> dict:
  """The sub-dict of a nested params dict holding only the subtrees at the given '/'-paths."""
  out: dict = {}
  for pre in prefixes:
    segs = [s for s in pre.split('/') if s]
    src, dst = tree, out
    ok = True
    for seg in segs[:-1]:
      if not isinstance(src, dict) or seg not in src:
        ok = False
        break
      src = src[seg]
      dst = dst.setdefault(seg, {})
    if ok and segs and isinstance(src, dict) and segs[-1] in src:
      dst[segs[-1]] = src[segs[-1]]
  return out


def unit_aux(params: dict, qstate: dict, unit: Unit) -> dict:
  """Frozen arrays a unit needs: its params subtree, its layers' quantizer state and the step map."""
  return {'params': prune_tree(params, [unit.path]),
          'layers': {p: st for p, st in qstate['layers'].items() if _inside(p, unit.path)},
          'step_slot': qstate['step_slot']}


def unit_apply_fn(model: nn.Module, policy, unit: Unit, io: CapturedIO, weight_mode: str = 'soft',
                  learn_act_scale: bool = False) -> Callable:
  """apply_fn(theta, aux, inputs_batch, steps_batch) -> the unit's quantized output (for recon.reconstruct).

  theta: {layer path: {'alpha': .., ['a_scale': ..]}} overrides of aux['layers'].
  """
  from tcaq_jax.quant.apply import block_method, quantized_apply

  method = block_method(unit.path)

  def apply_fn(theta, aux, xb, sb):
    layers = dict(aux['layers'])
    for p, st in theta.items():
      layers[p] = {**layers[p], **st}
    args, kwargs = io.rebuild(xb)
    qs = {'step_slot': aux['step_slot'], 'layers': layers}
    return quantized_apply(model, {'params': aux['params']}, qs, policy, *args, step_index=sb,
                           weight_mode=weight_mode, paths=[unit.path], learn_act_scale=learn_act_scale,
                           method=method, **kwargs)

  return apply_fn
