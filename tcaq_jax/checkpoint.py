"""Orbax save / restore / resume of params, quantizer state and a JSON config.

A checkpoint directory holds numbered steps (orbax `CheckpointManager`): every save is atomic (orbax
writes to a temporary folder and renames it when complete), the last `keep` steps are kept, and
`restore` without a step takes the latest *complete* one, so a process killed mid-write loses at most the
step it was writing.

Each step holds up to three items:
  params : a pytree of arrays (model parameters)
  qstate : a pytree of arrays / flax.struct dataclasses (quantizer state), optional
  meta   : a JSON-serialisable dict (model config, flags, policy, progress), optional

Integrity: once orbax has finished a step, `save` writes `<step>/tcaq_manifest.json` (atomically: a
temporary file, fsync, rename) holding the size and SHA-256 of every other file of the step:
  {"format": "tcaq_jax.checkpoint.manifest", "version": 1, "algorithm": "sha256",
   "files": {"params/_METADATA": {"size": 597, "sha256": "<64 hex>"}, ...}}
(paths relative to the step folder, '/'-separated). `restore` checks every listed file before reading
the step: a missing file or a size / checksum mismatch raises CheckpointError naming the directory, the
step and the file. Files not listed are ignored (orbax's index files, which are listed, decide what is
read). Steps written before manifests existed (and a step whose writer died between orbax's rename and
the manifest) have no manifest: they restore unverified, as before.

Without an explicit step, a latest step that fails verification or cannot be read is skipped: `restore`
falls back to the newest earlier step that restores and logs a warning naming the skipped step(s); when
none does, one CheckpointError lists every step tried and why. A later `save` of a skipped step's
number replaces it.

Usage:
  save(run_dir, step=3, params=params, qstate=qstate, meta={'block': 3})
  ckpt = restore(run_dir)                       # latest good step; pytrees come back as nested dicts
  ckpt = restore(run_dir, qstate_target=qstate) # rebuild dataclasses with a template
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any

from absl import logging as absl_logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from tcaq_jax import atomic_io

__all__ = ['CheckpointError', 'MANIFEST', 'save', 'restore', 'latest_step', 'all_steps', 'save_model_dir',
           'load_model_dir', 'quiet_orbax_logs']

_ITEMS = ('params', 'qstate', 'meta')
MANIFEST = 'tcaq_manifest.json'
_MANIFEST_FORMAT = 'tcaq_jax.checkpoint.manifest'
_MANIFEST_VERSION = 1


class CheckpointError(RuntimeError):
  """A checkpoint directory is missing, empty, corrupt or does not match what the caller expects."""


class _BadStep(CheckpointError):
  """One step cannot be used (fails verification or cannot be read); `restore` may fall back past it."""

  def __init__(self, directory: str, step: int, reason: str):
    super().__init__(f'checkpoint {directory!r} step {step}: {reason}')
    self.step, self.reason = step, reason


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


def _step_dir(directory: str, step: int) -> str:
  return os.path.join(os.path.abspath(os.fspath(directory)), str(int(step)))


def all_steps(directory: str) -> list[int]:
  """Complete steps saved in `directory` (ascending); [] when there is none or the folder is absent."""
  if not os.path.isdir(directory):
    return []
  return sorted(_manager(directory, create=False).all_steps())


def latest_step(directory: str) -> int | None:
  """The newest complete step of `directory` (None when none). Not verified: `restore` may fall back to an
  earlier step when this one is corrupt (its result's 'step' says which one it used)."""
  steps = all_steps(directory)
  return steps[-1] if steps else None


def _to_host(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


# ------------------------------------------------------------------------------------------- manifest

def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _step_files(step_dir: str) -> list[str]:
  """Every file of a step folder except the manifest (and its temporary), '/'-separated, sorted."""
  skip = {MANIFEST, MANIFEST + '.tmp'}
  out = []
  for root, _, names in os.walk(step_dir):
    rel_root = os.path.relpath(root, step_dir)
    for name in names:
      rel = name if rel_root == '.' else os.path.join(rel_root, name)
      if rel not in skip:
        out.append(rel.replace(os.sep, '/'))
  return sorted(out)


def _write_manifest(step_dir: str) -> None:
  """Writes MANIFEST (size + SHA-256 of every file) into a finished step folder, atomically."""
  files = {}
  for rel in _step_files(step_dir):
    path = os.path.join(step_dir, *rel.split('/'))
    files[rel] = {'size': os.path.getsize(path), 'sha256': _sha256(path)}
  doc = {'format': _MANIFEST_FORMAT, 'version': _MANIFEST_VERSION, 'algorithm': 'sha256', 'files': files}
  atomic_io.write_json(os.path.join(step_dir, MANIFEST), doc, fsync=True, indent=1, sort_keys=True)


def _read_manifest(directory: str, step: int, step_dir: str) -> dict | None:
  """The manifest's {relative path: {'size', 'sha256'}} (None for a step written without one)."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      doc = json.load(f)
    ok = doc['format'] == _MANIFEST_FORMAT and doc['version'] == _MANIFEST_VERSION and doc['files']
    files = {str(k): (int(v['size']), str(v['sha256'])) for k, v in doc['files'].items()} if ok else None
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise _BadStep(directory, step, f'{MANIFEST} is unreadable ({type(e).__name__}: {_first_line(e)})') from e
  if not files or any('..' in k.split('/') or k.startswith('/') for k in files):
    raise _BadStep(directory, step, f'{MANIFEST} is not a version-{_MANIFEST_VERSION} manifest')
  return files


def _verify(directory: str, step: int, step_dir: str) -> bool:
  """Checks every file listed in the step's manifest; False when the step has no manifest (not verified)."""
  files = _read_manifest(directory, step, step_dir)
  if files is None:
    return False
  for rel, (size, digest) in sorted(files.items()):
    path = os.path.join(step_dir, *rel.split('/'))
    if not os.path.isfile(path):
      raise _BadStep(directory, step, f'file {rel} listed in {MANIFEST} is missing')
    if os.path.getsize(path) != size or _sha256(path) != digest:
      raise _BadStep(directory, step, f'file {rel} does not match its SHA-256 in {MANIFEST} '
                                      '(corrupt or modified after the save)')
  return True


# ----------------------------------------------------------------------------------------------- save

def _save_args(directory: str, step: int, params: Any, qstate: Any, meta: dict | None) -> ocp.args.Composite:
  items = {}
  if params is not None:
    items['params'] = ocp.args.StandardSave(_to_host(params))
  elif qstate is None:
    raise CheckpointError(f'step {step} of {directory} would hold neither params nor qstate')
  if qstate is not None:
    items['qstate'] = ocp.args.StandardSave(_to_host(qstate))
  if meta is not None:
    try:
      json.dumps(meta)
    except TypeError as e:
      raise CheckpointError(f'meta for {directory} step {step} is not JSON-serialisable: {e}') from e
    items['meta'] = ocp.args.JsonSave(meta)
  return ocp.args.Composite(**items)


def save(directory: str, step: int, params: Any, qstate: Any = None, meta: dict | None = None,
         keep: int | None = 3) -> None:
  """Atomically writes `step` to `directory`, then its checksum manifest; keeps the last `keep` steps (None
  keeps all). An existing step with the same number (e.g. one `restore` skipped as corrupt) is replaced.
  params may be None when qstate is given (a calibration's intermediate steps: its FP params are stored once,
  beside the steps); such a step restores with params None."""
  step = int(step)
  args = _save_args(directory, step, params, qstate, meta)
  step_dir = _step_dir(directory, step)
  if os.path.exists(step_dir):
    absl_logging.warning('checkpoint %r: replacing the existing step %d', directory, step)
    shutil.rmtree(step_dir)
  mngr = _manager(directory, keep=keep)
  try:
    mngr.save(step, args=args, force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  _write_manifest(step_dir)


# -------------------------------------------------------------------------------------------- restore

def _first_line(e: BaseException, limit: int = 200) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  text = lines[0] if lines else type(e).__name__
  return text if len(text) <= limit else text[:limit] + '...'


def _key_str(path: tuple) -> str:
  """'a/b/0/c' for a jax key path (dict keys, sequence indices and attribute names alike)."""
  parts = (getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))) for k in path)
  return '/'.join(str(p) for p in parts)


def _shapes(tree: Any) -> list[tuple[str, tuple]]:
  return [(_key_str(p), tuple(getattr(x, 'shape', ()) or ()))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_target(directory: str, step: int, step_dir: str, name: str, target: Any) -> None:
  """Raises CheckpointError at the first key whose presence or shape differs between item `name` and `target`."""
  try:
    stored_md = ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.join(step_dir, name)))
  except Exception as e:  # noqa: BLE001  (any failure to read the metadata = unusable step)
    raise _BadStep(directory, step, f'{name} metadata is unreadable ({type(e).__name__}: {_first_line(e)})') from e
  stored = dict(_shapes(getattr(stored_md, 'tree', stored_md)))
  wanted = _shapes(_abstract(target))
  where = f'checkpoint {directory!r} step {step}: {name}'
  for key, shape in wanted:
    if key not in stored:
      raise CheckpointError(f'{where} has no key {key!r} that the target has')
    if stored[key] != shape:
      raise CheckpointError(f'{where} key {key!r} has shape {stored[key]} in the checkpoint but {shape} in '
                            'the target')
  extra = sorted(set(stored) - {k for k, _ in wanted})
  if extra:
    raise CheckpointError(f'{where} has key {extra[0]!r} that the target lacks ({len(extra)} such keys)')


def _restore_args(directory: str, step: int, step_dir: str, present: set, targets: dict) -> ocp.args.Composite:
  items = {}
  for name, target in targets.items():
    if name in present:
      if target is not None:
        _check_target(directory, step, step_dir, name, target)
      items[name] = ocp.args.StandardRestore(_abstract(target) if target is not None else None)
  if 'meta' in present:
    items['meta'] = ocp.args.JsonRestore()
  return ocp.args.Composite(**items)


def _restore_step(directory: str, step: int, targets: dict) -> dict:
  """Verifies (manifest), checks the targets against and restores one step."""
  step_dir = _step_dir(directory, step)
  _verify(directory, step, step_dir)
  present = set(os.listdir(step_dir))
  if 'params' not in present and 'qstate' not in present:
    raise _BadStep(directory, step, f'no params or qstate item (found {sorted(present)})')
  args = _restore_args(directory, step, step_dir, present, targets)
  mngr = _manager(directory, create=False)
  try:
    out = mngr.restore(step, args=args)
  except Exception as e:  # noqa: BLE001  (orbax / tensorstore raise many types on bad data)
    raise _BadStep(directory, step, f'could not read it ({type(e).__name__}: {_first_line(e)})') from e
  finally:
    mngr.close()
  return {'step': step, 'params': out['params'] if 'params' in args else None, 'qstate': out['qstate'] if 'qstate' in args else None,
          'meta': out['meta'] if 'meta' in args else None}


def restore(directory: str, step: int | None = None, params_target: Any = None,
            qstate_target: Any = None) -> dict:
  """Restores a step (default: the latest complete one that verifies).

  Returns {'step': int, 'params': pytree or None, 'qstate': pytree or None, 'meta': dict or None}. Without a
  target, pytrees come back as nested dicts of numpy arrays; with a target (a pytree of arrays or
  `jax.ShapeDtypeStruct`s) they come back with the target's structure, and a missing / extra key or a
  shape mismatch raises CheckpointError naming the directory, the step and the first mismatching key.

  The step's files are checked against its manifest first (steps saved without one are read unverified).
  With `step` given, a step that fails verification or cannot be read raises CheckpointError naming it (and
  the file). Without, the newest step that restores is used: skipped newer steps are named in a warning, and
  when no step restores one CheckpointError lists every step tried and why.
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f'checkpoint directory {directory!r} does not exist')
  steps = all_steps(directory)
  if not steps:
    raise CheckpointError(f'checkpoint directory {directory!r} holds no complete step')
  targets = {'params': params_target, 'qstate': qstate_target}
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'step {step} not in {directory!r} (complete steps: {steps})')
    return _restore_step(directory, int(step), targets)
  skipped = []
  for s in reversed(steps):
    try:
      out = _restore_step(directory, s, targets)
    except _BadStep as e:
      skipped.append(e)
      continue
    if skipped:
      absl_logging.warning('checkpoint %r: restored step %d instead of the latest; skipped %s', directory, s,
                           '; '.join(f'step {e.step}: {e.reason}' for e in skipped))
    return out
  raise CheckpointError(f'no step of checkpoint {directory!r} could be restored: '
                        + '; '.join(f'step {e.step}: {e.reason}' for e in skipped))


def _abstract(tree: Any) -> Any:
  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree.map(leaf, tree)


# ----------------------------------------------------------------------------------------- model dirs

def save_model_dir(directory: str, params: Any, config: dict, extra: dict | None = None,
                   overwrite: bool = False) -> None:
  """Writes a model directory: orbax params at step 0 plus `config.json` (read by `models.load`).

  An existing model in `directory` is an error unless `overwrite` (then its step 0 is replaced). The error
  names no flag: callers (CLIs) add the name of theirs.
  """
  os.makedirs(directory, exist_ok=True)
  steps = all_steps(directory)
  if steps:
    if not overwrite:
      raise CheckpointError(f'{directory!r} already holds a saved model (step {steps[-1]}); choose another '
                            'output directory or allow overwriting')
    shutil.rmtree(os.path.join(directory, '0'), ignore_errors=True)
  meta = {'config': config, **(extra or {})}
  save(directory, 0, params, meta=meta, keep=1)
  atomic_io.write_json(os.path.join(directory, 'config.json'), config, indent=2, sort_keys=True)


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
