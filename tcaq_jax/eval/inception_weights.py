"""FID Inception weights: convert pytorch-fid's .pth (read by the safe pickle reader, no code execution) into a
model dir, and read it back with its structure checked.

  python -m tcaq_jax.eval.inception --weights pt_inception-2015-12-05-6726825d.pth --out DIR   # [--overwrite]
  params = load(DIR)
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from tcaq_jax.eval.inception import NUM_CLASSES, InceptionError, init_params

__all__ = ['convert_state_dict', 'save', 'load', 'convert', 'define_flags', 'main']

_BN_RENAME = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}


def convert_state_dict(state_dict: dict) -> dict:
  """PyTorch FID Inception state dict {key: array} -> Flax params (nested dicts of float32 numpy arrays).

  Checks the result against the model's structure: a missing, unexpected or mis-shaped key, or a weight holding
  NaN / Inf, raises InceptionError naming it. `num_batches_tracked` entries are ignored.
  """
  params: dict = {}
  for key, value in state_dict.items():
    parts = key.split('.')
    if parts[-1] == 'num_batches_tracked':
      continue
    try:
      arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
      raise InceptionError(f'key {key!r} of the FID Inception state dict is not numeric ({e})') from e
    if parts[0] == 'fc':
      leaf = {'weight': 'kernel', 'bias': 'bias'}.get(parts[-1])
      if leaf is None or len(parts) != 2:
        raise InceptionError(f'unexpected key {key!r} in the FID Inception state dict')
      path, arr = ['fc', leaf], (arr.T if leaf == 'kernel' else arr)
    elif len(parts) >= 3 and parts[-2] == 'conv' and parts[-1] == 'weight' and arr.ndim != 4:
      raise InceptionError(f'key {key!r} of the FID Inception state dict has shape {arr.shape}, not 4-D OIHW')
    elif len(parts) >= 3 and parts[-2] == 'conv' and parts[-1] == 'weight':
      path, arr = parts[:-1] + ['kernel'], arr.transpose(2, 3, 1, 0)
    elif len(parts) >= 3 and parts[-2] == 'bn' and parts[-1] in _BN_RENAME:
      path = parts[:-1] + [_BN_RENAME[parts[-1]]]
    else:
      raise InceptionError(f'unexpected key {key!r} in the FID Inception state dict (aux head or a different '
                           f'network? expected pytorch-fid\'s pt_inception-2015-12-05 weights)')
    if not np.isfinite(arr).all():
      raise InceptionError(f'key {key!r} of the FID Inception state dict holds '
                           f'{int(arr.size - np.isfinite(arr).sum())} non-finite values (NaN / Inf)')
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = arr
  _check_structure(params)
  return params


def _check_structure(params: Any) -> None:
  """Raises InceptionError unless `params` has exactly the FID Inception's paths and shapes."""
  expected = jax.eval_shape(init_params)
  flat_exp = {'/'.join(str(k.key) for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
  flat_got = {'/'.join(str(k.key) for k in path): np.shape(leaf)
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted(set(flat_exp) - set(flat_got))
  extra = sorted(set(flat_got) - set(flat_exp))
  if missing or extra:
    raise InceptionError(f'FID Inception parameters do not match: missing {missing[:5]} ({len(missing)}), '
                         f'unexpected {extra[:5]} ({len(extra)})')
  for k, shape in flat_exp.items():
    if tuple(flat_got[k]) != tuple(shape):
      raise InceptionError(f'FID Inception parameter {k}: shape {tuple(flat_got[k])}, expected {tuple(shape)}')


def save(directory: str, params: Any, source: str | None = None, overwrite: bool = False) -> None:
  """Writes converted parameters as a model directory (orbax, `tcaq_jax.checkpoint.save_model_dir`); an existing
  model there is a CheckpointError unless `overwrite`."""
  from tcaq_jax import checkpoint
  config = {'family': 'fid_inception', 'name': 'pt_inception-2015-12-05', 'num_classes': NUM_CLASSES}
  checkpoint.save_model_dir(directory, params, config, extra={'source': source}, overwrite=overwrite)


def load(directory: str) -> Any:
  """Reads a directory written by the converter -> params (nested dicts of arrays), structure checked."""
  from tcaq_jax import checkpoint
  params, config = checkpoint.load_model_dir(directory)
  if config.get('family') != 'fid_inception':
    raise InceptionError(f'{directory!r} holds a {config.get("family")!r} model, not the FID Inception')
  _check_structure(params)
  return params


def _read_pth(path: str) -> dict:
  if not os.path.isfile(path):
    raise InceptionError(f'--weights file {path!r} does not exist')
  from tcaq_jax.models import torch_pickle
  try:
    sd = torch_pickle.load(path)
  except torch_pickle.TorchPickleError as e:
    raise InceptionError(f'cannot read --weights {path!r}: {e}') from e
  if isinstance(sd, dict) and isinstance(sd.get('state_dict'), dict):
    sd = sd['state_dict']
  if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
    raise InceptionError(f'{path!r} holds a {type(sd).__name__}, expected a state dict (string keys -> tensors)')
  return {k: np.asarray(v) for k, v in sd.items()}


def convert(weights: str, out: str, overwrite: bool = False) -> Any:
  """Reads a pytorch-fid .pth (safe pickle reader, no code execution), writes `out`; returns the params."""
  params = convert_state_dict(_read_pth(weights))
  save(out, params, source=os.path.basename(weights), overwrite=overwrite)
  return params


def _with_overwrite_flag(e: Exception) -> str:
  """save_model_dir's message with its keyword argument replaced by the CLI flag (added when absent)."""
  msg = str(e).replace('overwrite=True', '--overwrite')
  if '--overwrite' in msg:
    return msg
  return f'{msg} (--overwrite)' if 'overwrit' in msg else f'{msg}; rerun with --overwrite to replace it'


def main(argv):
  """The converter CLI (errors: one line, see tcaq_jax.cli.run)."""
  del argv  # cli.run refuses positional arguments
  from absl import flags, logging

  from tcaq_jax import checkpoint
  f = flags.FLAGS
  checkpoint.quiet_orbax_logs()
  try:
    params = convert(f.weights, f.out, overwrite=f.overwrite)
  except checkpoint.CheckpointError as e:
    raise InceptionError(f'--out: {_with_overwrite_flag(e)}') from e
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  logging.info('wrote the FID Inception (%d arrays, %d values) from %s to %s', len(jax.tree.leaves(params)), n,
               f.weights, f.out)


def define_flags():
  from absl import flags
  flags.DEFINE_string('weights', None, 'pytorch-fid weight file pt_inception-2015-12-05-*.pth')
  flags.DEFINE_string('out', None, 'output model directory (orbax)')
  flags.DEFINE_bool('overwrite', False, 'replace a model already saved (or half-written) in --out')
  flags.mark_flags_as_required(['weights', 'out'])
