"""Collect-by-interception: run a Flax forward and record what chosen submodules receive and return.

One helper for every "run the model, look at layer X's input" need (policy discovery, calibration statistics,
activation search, a unit's captured inputs and outputs):

  out, rec = collect_calls(lambda: model.apply(v, x, t), select=lambda path, m: path in paths,
                           record=lambda c: jnp.max(jnp.abs(c.args[0])))
  rec: {path: record(call)} for the first call of every selected module, in call order (parents before
  their children).

Works inside `jax.jit` / `jax.eval_shape`. Imports nothing from the rest of tcaq_jax.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

__all__ = ['Call', 'module_path', 'collect_calls']


@dataclasses.dataclass
class Call:
  """One intercepted `__call__`: module path, the bound module, its inputs and output, and its position among
  the recorded calls (0, 1, ...)."""
  path: str
  module: nn.Module
  args: tuple
  kwargs: dict
  output: Any
  index: int


def module_path(module: nn.Module) -> str:
  """'/'-joined Flax path of a bound module ('' for the root)."""
  return '/'.join(module.path)


def collect_calls(fn: Callable[[], Any], select: Callable[[str, nn.Module], bool],
                  record: Callable[[Call], Any] = lambda c: c, first_only: bool = True,
                  need_args: bool = False) -> tuple[Any, dict]:
  """Runs fn() intercepting every module `__call__`; returns (fn's output, {path: record(call)}).

  select(path, module) picks the calls to record; first_only keeps only a module's first call (a module
  called twice appears once). Paths appear in the order their calls start. need_args: skip calls without
  positional arguments.
  """
  found: dict = {}

  def interceptor(next_fun, args, kwargs, ctx):
    if ctx.method_name != '__call__' or (need_args and not args):
      return next_fun(*args, **kwargs)
    path = module_path(ctx.module)
    if (first_only and path in found) or not select(path, ctx.module):
      return next_fun(*args, **kwargs)
    index = len(found)
    found[path] = None                       # reserve the slot: call order, not completion order
    out = next_fun(*args, **kwargs)
    found[path] = record(Call(path, ctx.module, tuple(args), dict(kwargs), out, index))
    return out

  with nn.intercept_methods(interceptor):
    out = fn()
  return out, found
