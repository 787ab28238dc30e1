"""Orbax save / restore / resume of params, quantizer state and a JSON config.

A checkpoint directory holds numbered steps (orbax `CheckpointManager`): every save is atomic (orbax
writes to a temporary folder and renames it when complete), the last `keep` steps are kept, and
`restore` without a step takes the latest *complete* one, so a process killed mid-write loses at most the
step it was writing.

Each step holds up to three items:
  params : a pytree of arrays (model parameters)
  qstate : a pytree of arrays / flax.struct dataclasses (quantizer state), optional
  meta   : a JSON-serialisable dict (model config, flags, policy, progress), optional

Usage:
  save(run_dir, step=3, params=params, qstate=qstate, meta={'block': 3})
  ckpt = restore(run_dir)                       # latest step; pytrees come back as nested dicts
  ckpt = restore(run_dir, qstate_target=qstate) # rebuild dataclasses with a template
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ['CheckpointError', 'save', 'restore', 'latest_step', 'all_steps', 'save_model_dir', 'load_model_dir',
           'quiet_orbax_logs']

_ITEMS = ('params', 'qstate', 'meta')


class CheckpointError(RuntimeError):
  """A checkpoint directory is missing, empty, corrupt or does not match what the caller expects."""


class _DropOrbaxInfo(logging.Filter):
  """Drops INFO / DEBUG records logged from orbax's own source files (warnings and errors pass)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


_ORBAX_FILTER = _DropOrbaxInfo()


def quiet_orbax_logs(quiet: bool = True) -> None:
  """Orbax logs several INFO lines per save / restore through absl; entry points call this to keep their logs
  readable. quiet=False restores them. Affects only records from orbax's files."""
  absl_logger = logging.getLogger('absl')
  if quiet:
    absl_logger.addFilter(_ORBAX_FILTER)
  else:
    absl_logger.removeFilter(_ORBAX_FILTER)


def _manager(directory: str, keep: int | None = 3, create: bool = True) -> ocp.CheckpointManager:
  directory = os.path.abspath(os.fspath(directory))
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options, item_names=_ITEMS)


def all_steps(directory: str) -> list[int]:
  """Complete steps saved in `directory` (ascending); [] when there is none or the folder is absent."""
  if not os.path.isdir(directory):
    return []
  return sorted(_manager(directory, create=False).all_steps())


def latest_step(directory: str) -> int | None:
  steps = all_steps(directory)
  return steps[-1] if steps else None


def _to_host(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


def save(directory: str, step: int, params: Any, qstate: Any = None, meta: dict | None = None,
         keep: int | None = 3) -> None:
  """Atomically writes `step` to `directory`; keeps the last `keep` steps (None keeps all)."""
  items = {'params': ocp.args.StandardSave(_to_host(params))}
  if qstate is not None:
    items['qstate'] = ocp.args.StandardSave(_to_host(qstate))
  if meta is not None:
    try:
      json.dumps(meta)
    except TypeError as e:
      raise CheckpointError(f'meta for {directory} step {step} is not JSON-serialisable: {e}') from e
    items['meta'] = ocp.args.JsonSave(meta)
  mngr = _manager(directory, keep=keep)
  mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
  mngr.wait_until_finished()
  mngr.close()


def restore(directory: str, step: int | None = None, params_target: Any = None,
            qstate_target: Any = None) -> dict:
  """Restores a step (default: the latest complete one).

  Returns {'step': int, 'params': pytree, 'qstate': pytree or None, 'meta': dict or None}. Without a
  target, pytrees come back as nested dicts of numpy arrays; with a target (a pytree of arrays or
  `jax.ShapeDtypeStruct`s) they come back with the target's structure, and a shape mismatch raises
  CheckpointError naming the directory.
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f'checkpoint directory {directory!r} does not exist')
  mngr = _manager(directory, create=False)
  steps = sorted(mngr.all_steps())
  if not steps:
    raise CheckpointError(f'checkpoint directory {directory!r} holds no complete step')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f'step {step} not in {directory!r} (complete steps: {steps})')
  step_dir = os.path.join(os.path.abspath(directory), str(step))
  present = set(os.listdir(step_dir))
  items = {}
  for name, target in (('params', params_target), ('qstate', qstate_target)):
    if name in present:
      items[name] = ocp.args.StandardRestore(_abstract(target) if target is not None else None)
  if 'meta' in present:
    items['meta'] = ocp.args.JsonRestore()
  if 'params' not in items:
    raise CheckpointError(f'{step_dir} has no params item (found {sorted(present)})')
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f'could not restore {step_dir}: {e}') from e
  finally:
    mngr.close()
  return {'step': step, 'params': out['params'], 'qstate': out.get('qstate') if 'qstate' in items else None,
          'meta': out.get('meta') if 'meta' in items else None}


def _abstract(tree: Any) -> Any:
  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree.map(leaf, tree)


def save_model_dir(directory: str, params: Any, config: dict, extra: dict | None = None,
                   overwrite: bool = False) -> None:
  """Writes a model directory: orbax params at step 0 plus `config.json` (read by `models.load`).

  An existing model in `directory` is an error unless `overwrite` (then its step 0 is replaced).
  """
  os.makedirs(directory, exist_ok=True)
  if all_steps(directory):
    if not overwrite:
      raise CheckpointError(f'{directory!r} already holds a saved model; choose another output directory '
                            'or pass overwrite=True')
    shutil.rmtree(os.path.join(directory, '0'), ignore_errors=True)
  meta = {'config': config, **(extra or {})}
  save(directory, 0, params, meta=meta, keep=1)
  tmp = os.path.join(directory, 'config.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(directory, 'config.json'))


def load_model_dir(directory: str) -> tuple[Any, dict]:
  """Reads a directory written by `save_model_dir`: returns (params as nested dicts, config dict)."""
  cfg_path = os.path.join(directory, 'config.json')
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f'{directory!r} is not a model directory: {cfg_path} is missing')
  with open(cfg_path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f'{cfg_path} is not valid JSON: {e}') from e
  ckpt = restore(directory)
  return ckpt['params'], config
