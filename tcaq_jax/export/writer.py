"""Exports a finished calibration run (a `tcaq_jax.train.calibrate` out_dir) as a small integer model dir.

  manifest = export_quantized(load_quantized(run_dir), out_dir, source=run_dir)
  manifest = export_run(run_dir, out_dir)          # refuses an unfinished run
The weights written are exactly the fake-quant path's (quantized_apply with hard rounding): the codes are read
back from `quantize_weights(..., 'hard')` and checked to dequantize bit for bit to the same values. The dir is
written into a temporary sibling and renamed into place at the end, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np
from flax import traverse_util

from tcaq_jax.export.format import ExportError, decode_codes, encode_codes, storage_of, write_files
from tcaq_jax.quant.apply import quantize_weights
from tcaq_jax.quant.uniform import qrange

__all__ = ['ACT_FIELDS', 'export_quantized', 'export_run', 'float_bytes']

ACT_FIELDS = ('r', 'a_scale', 'a_zero', 'log2_delta', 'logsqrt2_delta', 'use_log2')


def float_bytes(params) -> int:
  """Bytes of the params as float32 (the float checkpoint's weights)."""
  return int(sum(np.size(a) for a in jax.tree.leaves(params)) * 4)


def _weight_codes(path, fq, st, bits) -> np.ndarray:
  """Unsigned codes of one fake-quantized kernel fq = (codes - zero) * scale (per output channel)."""
  fq = np.asarray(fq, np.float32)
  scale = np.asarray(st.w_scale, np.float32)
  zero = np.asarray(st.w_zero, np.float32)
  qmin, qmax = qrange(bits)
  codes = np.clip(np.round(fq / scale) + zero, qmin, qmax)
  if not np.array_equal((codes - zero) * scale, fq):
    raise ExportError(f'layer {path!r}: its fake-quantized weights are not (codes - zero) * scale; the run\'s '
                      'weight quantizer state is inconsistent')
  return codes.astype(np.int64)


def _layer_arrays(policy, qstate, qparams) -> tuple[dict, dict]:
  """(arrays, layer table) of the quantized layers; also drops their kernels from qparams (flat dict)."""
  arrays, table = {}, {}
  for spec in policy.quantized():
    st = qstate.layers.get(spec.path)
    if st is None:
      raise ExportError(f'layer {spec.path!r}: the policy quantizes it but the run has no quantizer state')
    row = {'kind': spec.kind, 'w_bits': spec.w_bits, 'a_bits': spec.a_bits, 'split': spec.split}
    if spec.weights:
      key = tuple(spec.path.split('/')) + ('kernel',)
      if st.w_scale is None or st.w_zero is None or key not in qparams:
        raise ExportError(f'layer {spec.path!r}: weights quantized by the policy but no weight scale / zero '
                          'point / kernel in the run')
      fq = qparams.pop(key)
      codes = _weight_codes(spec.path, fq, st, spec.w_bits)
      arrays[f'w:{spec.path}'] = encode_codes(codes, spec.w_bits)
      arrays[f'w_scale:{spec.path}'] = np.asarray(st.w_scale, np.float32)
      arrays[f'w_zero:{spec.path}'] = np.asarray(st.w_zero, np.float32)
      assert np.array_equal(decode_codes(arrays[f'w:{spec.path}'], spec.w_bits, codes.shape), codes)
      row.update(storage=storage_of(spec.w_bits), shape=list(codes.shape))
    if spec.acts:
      for name in ACT_FIELDS:
        if getattr(st, name) is not None:
          arrays[f'act:{spec.path}:{name}'] = np.asarray(getattr(st, name))
    table[spec.path] = row
  return arrays, table


def export_quantized(q, out_dir: str, source: str = '', overwrite: bool = False) -> dict:
  """Writes the exported dir of a loaded calibration (`tcaq_jax.quantized.QuantizedModel`); returns the
  manifest (its 'sizes' hold the exported and the float bytes)."""
  policy, qstate, meta = q.policy, q.qstate, q.meta
  if not any(s.weights for s in policy.layers.values()):
    raise ExportError(f'{source or "the run"}: its policy quantizes no weights (no integer form to export)')
  cfg = meta.get('config', {})
  sampler = {k: cfg.get(k) for k in ('num_steps', 'skip_type', 'eta', 'guidance_scale')}
  if None in (sampler['num_steps'], sampler['skip_type'], sampler['eta']):
    raise ExportError(f'{source or "the run"}: records no sampler settings (num_steps / skip_type / eta)')
  if os.path.exists(out_dir) and not overwrite and os.listdir(out_dir):
    raise ExportError(f'--out={out_dir!r} exists and is not empty: pass --overwrite or choose another dir')
  qparams = traverse_util.flatten_dict(jax.device_get(quantize_weights(q.params, qstate, policy, 'hard')))
  arrays, table = _layer_arrays(policy, qstate, qparams)
  arrays.update({'param:' + '/'.join(k): np.asarray(v, np.float32) for k, v in qparams.items()})
  arrays['step_slot'] = np.asarray(qstate.step_slot, np.int32)
  if qstate.out_bias is not None:
    arrays['out_bias'] = np.asarray(qstate.out_bias, np.float32)
  if qstate.out_scale is not None:
    arrays['out_scale'] = np.asarray(qstate.out_scale, np.float32)
  float_b = float_bytes(q.params)
  manifest = {'model_config': q.config, 'policy': policy.to_dict(), 'sampler': sampler, 'layers': table,
              'source': {'run_dir': source, 'method': cfg.get('method'), 'model_fingerprint':
                         meta.get('model_fingerprint'), 'bits': {k: cfg.get(k) for k in
                                                                 ('w_bits', 'a_bits', 'softmax_bits')}}}
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.export-', dir=parent)
  try:
    weight_b = int(sum(a.nbytes for k, a in arrays.items() if k.startswith(('w:', 'w_scale:', 'w_zero:'))))
    manifest['sizes'] = {'float_params_bytes': float_b, 'quantized_weights_bytes': weight_b,
                         'other_bytes': int(sum(a.nbytes for a in arrays.values())) - weight_b}
    manifest = write_files(tmp, manifest, arrays)
    total = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    manifest['sizes']['export_bytes'] = total            # reported; the manifest on disk has the parts above
    old = None
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix='.export-old-', dir=parent)
      os.rename(out_dir, os.path.join(old, 'dir'))
    os.rename(tmp, out_dir)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def export_run(run_dir: str, out_dir: str, overwrite: bool = False) -> dict:
  """Exports the latest checkpoint of a finished calibration run dir (ExportError for an unfinished one)."""
  from tcaq_jax import checkpoint
  from tcaq_jax.quantized import load_quantized
  progress = (checkpoint.restore(run_dir)['meta'] or {}).get('progress', {})
  if not progress.get('done'):
    raise ExportError(f'{run_dir!r}: calibration not finished (progress {progress}); resume it with the same '
                      '--out_dir, then export')
  return export_quantized(load_quantized(run_dir), out_dir, source=run_dir, overwrite=overwrite)
