"""The on-disk form of an exported quantized model: a directory holding two files.

  manifest.json   {"format": "tcaq_jax.export", "version": 1, "model_config": {...}, "policy": {...},
                   "sampler": {"num_steps", "skip_type", "eta"}, "source": {run dir, method, bits, fingerprint},
                   "layers": {path: {"w_bits", "a_bits", "storage", "shape"}}, "sizes": {...},
                   "files": {"arrays.npz": {"size": bytes, "sha256": hex}}}
  arrays.npz      (uncompressed) named arrays:
                   'param:<module path>/<leaf>'   float32 params: biases, norms, FP kernels, and kernels of
                                                   input-only quantized layers with TCR folded in
                   'w:<path>'                     weight codes: int8 (codes - 128) at 8 bits, int8 codes at 5-7
                                                   bits, uint8 with two 4-bit codes per byte at <= 4 bits
                                                   (`intops.pack_int4`), int16 (codes - 2^15) above 8 bits
                   'w_scale:<path>', 'w_zero:<path>'   float32 [Cout] per-output-channel scale / zero point
                   'act:<path>:<field>'           activation quantizer state (TCR r, a_scale / a_zero [K, S],
                                                   log2_delta / logsqrt2_delta [K], use_log2 [K])
                   'step_slot'                    int32 [num_steps]: sampler step -> calibration slot
                   'out_bias'                     float32 [num_steps, *out] (version 2, when the run has one):
                                                   subtracted from the model's output at each sampler step
                   'out_scale'                    float32 [num_steps] (version 3, when the run has one): multiplies
                                                   the output after the bias at each sampler step
Weights of a weight-quantized layer are AdaRound hard-rounded codes of W diag(r) (TCR folded, r kept for the
input division). `read_arrays` checks the version and the npz's size and SHA-256 before reading.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

__all__ = ['ExportError', 'FORMAT', 'VERSION', 'READS', 'MANIFEST', 'ARRAYS', 'storage_of', 'encode_codes',
           'decode_codes', 'sha256', 'write_files', 'read_manifest', 'read_arrays']

FORMAT = 'tcaq_jax.export'
VERSION = 3                      # 2: adds the optional 'out_bias'; 3: the optional 'out_scale' (earlier
READS = (1, 2, 3)                #    versions read as ones without them)
MANIFEST = 'manifest.json'
ARRAYS = 'arrays.npz'


class ExportError(ValueError):
  """A run that cannot be exported, or an exported dir that cannot be read (the message names which)."""


def storage_of(bits: int) -> str:
  """Storage of b-bit unsigned weight codes: 'int4x2' (<= 4 bits, packed), 'int8' (5..8), 'int16' (9..16)."""
  return 'int4x2' if bits <= 4 else 'int8' if bits <= 8 else 'int16'


def encode_codes(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned integer codes (any shape) -> their stored array (see the module docstring)."""
  from tcaq_jax.quant.intops import int8_offset, pack_int4
  codes = np.asarray(codes).astype(np.int64)
  st = storage_of(bits)
  if st == 'int4x2':
    return pack_int4(codes)
  if st == 'int8':
    return (codes - int8_offset(bits)).astype(np.int8)
  return (codes - 2 ** 15).astype(np.int16)


def decode_codes(stored: np.ndarray, bits: int, shape) -> np.ndarray:
  """Inverse of encode_codes: the unsigned codes as int32 of `shape` (for the dequantized weights)."""
  from tcaq_jax.quant.intops import int8_offset, unpack_int4
  st = storage_of(bits)
  if st == 'int4x2':
    return np.asarray(unpack_int4(stored, shape)).astype(np.int32)
  off = int8_offset(bits) if st == 'int8' else 2 ** 15
  return (np.asarray(stored).astype(np.int32) + off).reshape(shape)


def sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def write_files(directory: str, manifest: dict, arrays: dict) -> dict:
  """Writes arrays.npz and manifest.json (with the npz's size and SHA-256) into `directory`; returns the
  manifest as written."""
  path = os.path.join(directory, ARRAYS)
  with open(path, 'wb') as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  manifest = dict(manifest, format=FORMAT, version=VERSION,
                  files={ARRAYS: {'size': os.path.getsize(path), 'sha256': sha256(path)}})
  with open(os.path.join(directory, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  return manifest


def read_manifest(directory: str) -> dict:
  """The manifest of an exported dir; ExportError when it is missing, unreadable or of another version."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise ExportError(f'{directory!r} is not an exported model dir (no {MANIFEST}); export a calibration run '
                      'with `python -m tcaq_jax.export --run_dir RUN --out DIR`')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f'{path}: unreadable or truncated manifest ({e})') from e
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise ExportError(f'{path}: not a {FORMAT} manifest')
  if manifest.get('version') not in READS:
    raise ExportError(f'{directory!r} was written by export format version {manifest.get("version")!r}; this '
                      f'tcaq_jax reads versions {", ".join(map(str, READS))}: re-export the calibration run')
  return manifest


def read_arrays(directory: str, manifest: dict) -> dict:
  """{name: np.ndarray} of arrays.npz after checking its size and SHA-256 against the manifest."""
  want = manifest.get('files', {}).get(ARRAYS)
  path = os.path.join(directory, ARRAYS)
  if want is None or not os.path.isfile(path):
    raise ExportError(f'{directory!r}: {ARRAYS} is missing')
  size = os.path.getsize(path)
  if size != want['size']:
    raise ExportError(f'{path} is truncated or was replaced: {size} bytes, the manifest says {want["size"]}')
  if sha256(path) != want['sha256']:
    raise ExportError(f'{path} is corrupted: its SHA-256 differs from the manifest\'s')
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}
