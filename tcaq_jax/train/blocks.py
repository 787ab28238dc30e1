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


def capture_unit_io(forward: Callable, path: str, data: Sequence[np.ndarray], batch: int = 64,
                    want_inputs: bool = True, want_output: bool = True) -> CapturedIO:
  """Runs `forward(*data_batch)` (a function calling model.apply; it may add its own interceptors) over the
  set in batches and records the (args, kwargs) and/or output of the module at `path`.

  data: arrays [N, ...] (e.g. x_t, t, step_index, labels) sliced along axis 0. Returns CapturedIO whose
  arrays live on device. XLA drops the part of the forward after the unit (dead code).
  """
  meta: dict = {}

  def run(*d):
    rec = {}

    def icpt(next_fun, a, kw, ctx):
      if ctx.method_name == '__call__' and '/'.join(ctx.module.path) == path and 'out' not in rec:
        out = next_fun(*a, **kw)
        rec['in'] = (tuple(a), dict(kw))
        rec['out'] = out
        return out
      return next_fun(*a, **kw)

    with nn.intercept_methods(icpt):
      forward(*d)
    if 'out' not in rec:
      raise BlockError(f'unit {path!r} was not called by the forward pass')
    flat, treedef = jax.tree_util.tree_flatten(rec['in'])
    meta['treedef'] = treedef
    meta['statics'] = [None if isinstance(v, jax.Array) else v for v in flat]
    dyn = [v for v in flat if isinstance(v, jax.Array)]
    return (dyn if want_inputs else []), (rec['out'] if want_output else None)

  fn = jax.jit(run)
  n = int(data[0].shape[0])
  ins, outs = [], []
  for i in range(0, n, batch):
    d = [jnp.asarray(a[i:i + batch]) for a in data]
    dyn, out = fn(*d)
    ins.append(dyn)
    outs.append(out)
  leaves = [jnp.concatenate([b[j] for b in ins], axis=0) for j in range(len(ins[0]))] if want_inputs else []
  output = jax.tree.map(lambda *o: jnp.concatenate(o, axis=0), *outs) if want_output else None
  return CapturedIO(leaves, meta['statics'], meta['treedef'], output)
