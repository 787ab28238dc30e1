"""Converts public PyTorch checkpoints (DDIM CIFAR-10, latent diffusion) to orbax model directories.

  python -m tcaq_jax.models.convert --checkpoint model-790000.ckpt --model ddim_cifar10 --out models/ddim
  python -m tcaq_jax.models.convert --checkpoint model.ckpt --config cin256-v2.yaml --out models/cin

The mapping is generic and driven by the target parameter tree (`jax.eval_shape` of `model.init`): a key
`a.b.0.c.weight` goes to params['a']['b_0']['c'][leaf] (consecutive numeric segments join with `_`:
`input_blocks.1.0.x` -> `input_blocks_1_0/x`), where leaf is whichever of kernel / scale / embedding the
target has (`weight`) or `bias`. Kernels are transposed (conv OIHW -> HWIO, linear [out, in] -> [in, out],
conv1d [O, I, K] -> [K, I, O], or squeezed to a Dense kernel when the target is 2-D).

LDM checkpoints: the state dict sits under ['state_dict']; `model.` is stripped; EMA copies
`model_ema.<key without dots>` replace the raw weights when present (--noema to keep the raw ones); first
stage encoder / quant_conv / loss, schedule buffers and EMA counters are skipped on purpose; `scale_factor`
goes into the config. The output directory gets the orbax params + config.json (checkpoint.save_model_dir)
and `conversion_report.json` (used and skipped keys).

Any missing key, unexpected key or shape mismatch raises one ConversionError listing all of them; so does a
weight holding NaN or Inf (each key named with its count). An existing model in --out is kept unless --overwrite.
Errors come out as one line (`tcaq_jax.cli.run`; --debug for the traceback).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from tcaq_jax import checkpoint
from tcaq_jax.models import configs, family, torch_pickle

__all__ = ['ConversionError', 'abstract_params', 'key_to_path', 'convert_state_dict', 'convert_checkpoint',
           'config_from_yaml', 'REPORT_NAME']

REPORT_NAME = 'conversion_report.json'
_SCHEDULE_BUFFERS = frozenset({
    'betas', 'alphas_cumprod', 'alphas_cumprod_prev', 'sqrt_alphas_cumprod', 'sqrt_one_minus_alphas_cumprod',
    'log_one_minus_alphas_cumprod', 'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod',
    'posterior_variance', 'posterior_log_variance_clipped', 'posterior_mean_coef1', 'posterior_mean_coef2',
    'lvlb_weights', 'logvar'})
_LDM_SKIP_PREFIXES = ('first_stage_model.encoder.', 'first_stage_model.quant_conv.', 'first_stage_model.loss.')
_MAX_LISTED = 60


class ConversionError(ValueError):
  """The checkpoint does not fit the target model (lists missing / unexpected keys and shape mismatches) or
  holds non-finite weights (lists the keys)."""


def abstract_params(config: dict, model=None) -> dict:
  """The model's parameter tree as nested dicts of jax.ShapeDtypeStruct (no computation)."""
  try:
    return family.abstract_params(config, model)
  except family.FamilyError as e:
    raise ConversionError(str(e)) from e


def key_to_path(key: str) -> tuple[tuple[str, ...], str]:
  """`down.0.block.1.conv1.weight` -> (('down_0', 'block_1', 'conv1'), 'weight')."""
  out: list[str] = []
  for seg in key.split('.'):
    if seg.isdigit() and out:
      out[-1] = f'{out[-1]}_{seg}'
    else:
      out.append(seg)
  return tuple(out[:-1]), out[-1]


def _flatten(tree: dict, prefix=()) -> dict:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict) or (hasattr(v, 'items') and not hasattr(v, 'shape')):
      flat.update(_flatten(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = v
  return flat


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def _transform(a: np.ndarray, leaf: str, tshape: tuple) -> np.ndarray:
  if leaf != 'kernel':
    return a
  nt = len(tshape)
  if a.ndim == 4 and nt == 4:
    return a.transpose(2, 3, 1, 0)
  if a.ndim == 4 and nt == 2 and a.shape[2:] == (1, 1):
    return a[:, :, 0, 0].T
  if a.ndim == 2 and nt == 2:
    return a.T
  if a.ndim == 2 and nt == 4:
    return a.T.reshape(1, 1, *a.T.shape)
  if a.ndim == 3 and nt == 2 and a.shape[2] == 1:
    return a[:, :, 0].T
  if a.ndim == 3 and nt == 3:
    return a.transpose(2, 1, 0)
  return a


def _listing(title: str, items: list[str]) -> str:
  if not items:
    return ''
  more = f'\n    ... and {len(items) - _MAX_LISTED} more' if len(items) > _MAX_LISTED else ''
  return f'\n  {title} ({len(items)}):\n    ' + '\n    '.join(items[:_MAX_LISTED]) + more


def _nonfinite(key: str, a: np.ndarray) -> str | None:
  """'key: 2 NaN, 1 Inf of 12 values' when `a` holds non-finite values, else None."""
  finite = np.isfinite(a)
  if finite.all():
    return None
  n_nan = int(np.isnan(a).sum())
  return f'{key}: {n_nan} NaN, {a.size - int(finite.sum()) - n_nan} Inf of {a.size} values'


def convert_state_dict(sd: dict, target: dict, source: str = '<state dict>') -> tuple[dict, list[str]]:
  """Maps {torch key: array} onto the `target` tree (nested dicts of ShapeDtypeStruct).

  Returns (params as nested dicts of float32 numpy, list of used keys). Raises ConversionError listing
  every missing target path, unexpected key and shape mismatch, or else every weight holding NaN / Inf.
  """
  flat_t = _flatten(target)
  modules: dict[tuple, set] = {}
  for path in flat_t:
    modules.setdefault(path[:-1], set()).add(path[-1])
  out, used, unexpected, mismatch, bad, nonfinite = {}, [], [], [], set(), []
  for key in sorted(sd):
    mod, leaf = key_to_path(key)
    have = modules.get(mod, set())
    cands = ('kernel', 'scale', 'embedding', 'weight') if leaf == 'weight' else (leaf,)
    name = next((c for c in cands if c in have), None)
    if name is None:
      unexpected.append(f'{key} {tuple(np.shape(sd[key]))} (no target {"/".join(mod + (leaf,))})')
      continue
    path = mod + (name,)
    tshape = tuple(flat_t[path].shape)
    a = np.asarray(sd[key])
    b = _transform(a, name, tshape)
    if tuple(b.shape) != tshape:
      mismatch.append(f'{key}: found {tuple(a.shape)}, target {"/".join(path)} expects {tshape}')
      bad.add(path)
      continue
    if path in out:
      unexpected.append(f'{key} (maps onto {"/".join(path)} a second time)')
      continue
    out[path] = np.asarray(b, np.float32)
    used.append(key)
    bad_values = _nonfinite(key, out[path])
    if bad_values:
      nonfinite.append(bad_values)
  missing = [f'{"/".join(p)} {tuple(flat_t[p].shape)}' for p in flat_t if p not in out and p not in bad]
  if missing or unexpected or mismatch:
    raise ConversionError(
        f'{source} does not match the target model: {len(missing)} missing, {len(unexpected)} unexpected, '
        f'{len(mismatch)} shape mismatches' + _listing('missing target parameters', missing)
        + _listing('unexpected checkpoint keys', unexpected) + _listing('shape mismatches', mismatch))
  if nonfinite:
    raise ConversionError(f'{source}: refusing to convert, {len(nonfinite)} weights hold NaN / Inf.'
                          + _listing('non-finite weights', nonfinite))
  return _unflatten(out), used


def _is_state_dict(obj) -> bool:
  return isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj) and any(
      isinstance(v, np.ndarray) for v in obj.values())


def _ddim_state_dict(obj, use_ema: bool, source: str) -> tuple[dict, dict]:
  """Plain state dict, {'state_dict': ...}, or the DDIM training list [model, optim, epoch, step, (ema)]."""
  info = {}
  if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']
  elif isinstance(obj, (list, tuple)):
    if len(obj) >= 5 and use_ema and _is_state_dict(obj[-1]):
      obj, info['ema'] = obj[-1], 'DDIM training checkpoint: EMA state dict (last entry)'
    elif obj and _is_state_dict(obj[0]):
      obj, info['ema'] = obj[0], 'DDIM training checkpoint: raw model state dict (first entry)'
  if not _is_state_dict(obj):
    raise ConversionError(f'{source}: no state dict found (got {type(obj).__name__})')
  sd, skipped = {}, {}
  for k, v in obj.items():
    k2 = k[len('module.'):] if k.startswith('module.') else k
    if k2 == 'logvar':
      skipped[k] = 'learned variance of the bayesian model type (unused by the eps model)'
      continue
    sd[k2] = v
  return sd, {'skipped': skipped, **info}


def _scale_factor(v, source: str) -> float:
  a = np.asarray(v)
  if a.size != 1 or not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
    raise ConversionError(f'{source}: key scale_factor must be one finite number, got {a.dtype} {a.shape} '
                          f'{a.ravel()[:3].tolist()}')
  return float(a.reshape(()))


def _ldm_state_dict(obj, use_ema: bool, source: str) -> tuple[dict, dict]:
  if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']
  if not _is_state_dict(obj):
    raise ConversionError(f'{source}: no LDM state dict found (got {type(obj).__name__})')
  raw, ema, skipped, scale_factor = {}, {}, {}, None
  for k, v in obj.items():
    if k in ('model_ema.decay', 'model_ema.num_updates'):
      skipped[k] = 'EMA counter'
    elif k.startswith('model_ema.'):
      ema[k[len('model_ema.'):]] = v
    elif k in _SCHEDULE_BUFFERS:
      skipped[k] = 'noise-schedule buffer (recomputed from config diffusion)'
    elif k == 'scale_factor':
      scale_factor = _scale_factor(v, source)
      skipped[k] = 'moved into config.scale_factor'
    elif k.startswith(_LDM_SKIP_PREFIXES) or k == 'first_stage_model.quantize.used':
      skipped[k] = 'first-stage part not needed for sampling (encoder / quant_conv / loss)'
    elif k.startswith('model.'):
      raw[k[len('model.'):]] = v
    else:
      raw[k] = v
  sd, n_ema, no_ema = {}, 0, []
  for k, v in raw.items():
    ek = k.replace('.', '')
    is_model = not k.startswith(('first_stage_model.', 'cond_stage_model.'))
    if use_ema and is_model and ek in ema:
      sd[k] = ema.pop(ek)
      skipped['model.' + k] = 'replaced by its EMA copy model_ema.' + ek
      n_ema += 1
    else:
      sd[k] = v
      if use_ema and is_model and ema:
        no_ema.append(k)
  if not use_ema:
    for ek in ema:
      skipped['model_ema.' + ek] = 'EMA copy not used (--noema)'
  info = {'skipped': skipped, 'scale_factor': scale_factor, 'ema_used': n_ema,
          'raw_without_ema': no_ema}
  if use_ema and ema:
    info['unmatched_ema'] = sorted('model_ema.' + k for k in ema)
    for k in ema:
      skipped['model_ema.' + k] = 'EMA entry without a matching model.* key'
  return sd, info


def convert_checkpoint(checkpoint_path: str, config: dict, use_ema: bool = True,
                       stub_unknown: bool = False) -> tuple[dict, dict, dict]:
  """Reads and converts a checkpoint. Returns (params numpy tree, config (maybe updated), report dict)."""
  obj = torch_pickle.load(checkpoint_path, stub_unknown=stub_unknown)
  config = dict(config)
  fam = config.get('family')
  if fam == 'ddim':
    sd, info = _ddim_state_dict(obj, use_ema, checkpoint_path)
  elif fam == 'ldm':
    sd, info = _ldm_state_dict(obj, use_ema, checkpoint_path)
    if info.get('scale_factor') is not None:
      config['scale_factor'] = info['scale_factor']
  else:
    raise ConversionError(f'config {config.get("name")!r}: unknown family {fam!r}')
  target = abstract_params(config)
  params, used = convert_state_dict(sd, target, checkpoint_path)
  n = int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
  report = {'checkpoint': os.path.abspath(checkpoint_path), 'bytes': os.path.getsize(checkpoint_path),
            'model': config.get('name'), 'family': fam, 'n_params': n,
            'n_tensors': len(jax.tree.leaves(params)), 'used_keys': used, **info}
  return params, config, report


def _ddim_config_from_yaml(d: dict, name: str) -> dict:
  m, data, diff = d['model'], d.get('data', {}), d.get('diffusion', {})
  return {
      'family': 'ddim', 'name': name, 'in_channels': int(m['in_channels']), 'out_ch': int(m['out_ch']),
      'resolution': int(data.get('image_size', 32)), 'ch': int(m['ch']), 'ch_mult': list(m['ch_mult']),
      'num_res_blocks': int(m['num_res_blocks']), 'attn_resolutions': list(m['attn_resolutions']),
      'dropout': float(m.get('dropout', 0.0)), 'resamp_with_conv': bool(m.get('resamp_with_conv', True)),
      'diffusion': {'beta_schedule': diff.get('beta_schedule', 'linear'),
                    'beta_start': float(diff.get('beta_start', 1e-4)), 'beta_end': float(diff.get('beta_end', 0.02)),
                    'num_timesteps': int(diff.get('num_diffusion_timesteps', 1000))},
  }


def config_from_yaml(path: str, name: str | None = None) -> dict:
  """A model config from an original YAML (ddim repo configs/*.yml or a latent-diffusion config)."""
  import yaml

  from tcaq_jax.models import ldm_configs
  with open(path) as f:
    try:
      d = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise ConversionError(f'{path}: not valid YAML ({" ".join(str(e).split())})') from e
  name = name or os.path.splitext(os.path.basename(path))[0]
  try:
    if isinstance(d, dict) and isinstance(d.get('model'), dict) and 'target' in d['model']:
      return ldm_configs.config_from_yaml(d, name=name)
    if isinstance(d, dict) and isinstance(d.get('model'), dict) and 'ch_mult' in d['model']:
      return _ddim_config_from_yaml(d, name)
  except ldm_configs.YamlConfigError as e:
    raise ConversionError(f'{path}: {e}') from e
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f'{path}: missing or invalid model setting ({type(e).__name__}: {e})') from e
  raise ConversionError(f'{path}: neither a DDIM config (model.ch_mult) nor a latent-diffusion config '
                        f'(model.target)')


def write_model_dir(out_dir: str, params: dict, config: dict, report: dict, overwrite: bool = False) -> None:
  """save_model_dir + conversion_report.json; an existing model in `out_dir` is an error unless `overwrite`."""
  summary = {k: report[k] for k in ('checkpoint', 'model', 'n_params', 'n_tensors') if k in report}
  checkpoint.save_model_dir(out_dir, params, config, extra={'conversion': summary}, overwrite=overwrite)
  with open(os.path.join(out_dir, REPORT_NAME), 'w') as f:
    json.dump(report, f, indent=1, sort_keys=True)


def _with_overwrite_flag(e: Exception) -> str:
  """save_model_dir's message with its keyword argument replaced by the CLI flag (added when absent)."""
  msg = str(e).replace('overwrite=True', '--overwrite')
  if '--overwrite' in msg:
    return msg
  return f'{msg} (--overwrite)' if 'overwrit' in msg else f'{msg}; rerun with --overwrite to replace it'


def _named_config(name: str) -> dict:
  try:
    return configs.get_config(name)
  except KeyError as e:
    raise ConversionError(f'--model: {e.args[0]}') from e


def main(argv):
  """Reads --checkpoint, converts it for --model / --config and writes --out (errors: one line, see cli.run)."""
  del argv  # cli.run refuses positional arguments
  from absl import flags, logging
  checkpoint.quiet_orbax_logs()
  FLAGS = flags.FLAGS
  if bool(FLAGS.model) == bool(FLAGS.config):
    raise ConversionError('give exactly one of --model (a named config) or --config (an original YAML)')
  config = _named_config(FLAGS.model) if FLAGS.model else config_from_yaml(FLAGS.config, FLAGS.name)
  try:
    params, config, report = convert_checkpoint(FLAGS.checkpoint, config, FLAGS.ema, FLAGS.stub_unknown_globals)
  except torch_pickle.UnsafeGlobalError as e:
    raise ConversionError(f'{e}. If the file is trusted to be a Lightning checkpoint whose extra objects only '
                          f'need to be ignored, rerun with --stub_unknown_globals (they become inert stubs).') from e
  try:
    write_model_dir(FLAGS.out, params, config, report, overwrite=FLAGS.overwrite)
  except checkpoint.CheckpointError as e:
    raise checkpoint.CheckpointError(f'--out: {_with_overwrite_flag(e)}') from e
  logging.info('converted %s: %d tensors, %d params -> %s', FLAGS.checkpoint, report['n_tensors'],
               report['n_params'], FLAGS.out)


def _define_flags():
  from absl import flags
  flags.DEFINE_string('checkpoint', None, 'PyTorch checkpoint (.ckpt/.pt/.pth, .safetensors or .npz).')
  flags.DEFINE_string('model', None, 'Named config in tcaq_jax.models.configs (e.g. ddim_cifar10).')
  flags.DEFINE_string('config', None, 'Original YAML config (ddim configs/*.yml or latent-diffusion yaml).')
  flags.DEFINE_string('name', None, 'Config name when --config is used (default: the YAML file stem).')
  flags.DEFINE_string('out', None, 'Output model directory (orbax params + config.json + report).')
  flags.DEFINE_bool('overwrite', False, 'Replace a model already saved (or half-written) in --out.')
  flags.DEFINE_bool('ema', True, 'Use EMA weights when the checkpoint has them.')
  flags.DEFINE_bool('stub_unknown_globals', False,
                    'Replace non-allow-listed pickle globals by inert stubs instead of refusing the file.')
  flags.mark_flags_as_required(['checkpoint', 'out'])


if __name__ == '__main__':
  # Run the imported module, not this __main__ copy: its error classes live in tcaq_jax, so cli.run prints them
  # as one line.
  from tcaq_jax import cli
  from tcaq_jax.models import convert as _convert
  _convert._define_flags()
  cli.run(_convert.main)
