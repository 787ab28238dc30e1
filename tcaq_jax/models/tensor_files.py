"""Readers of the non-pickle checkpoint formats (safetensors, .npz) and the errors of every checkpoint reader
(`torch_pickle.load` dispatches here by extension). Sizes claimed by a file are checked against the file before
anything is allocated; every error names the file and the tensor key.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zipfile

import numpy as np

__all__ = ['TorchPickleError', 'UnsafeGlobalError', 'UnsafeBuildError', 'UnsupportedDtypeError', 'SizeClaimError',
           'SafetensorsHeaderError', 'load_safetensors', 'load_npz']


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class TorchPickleError(ValueError):
  """A checkpoint file is unreadable: truncated, corrupt, or not in a supported format."""


class UnsafeGlobalError(TorchPickleError):
  """The pickle references a global outside the allow-list (`.global_name` is `module.name`)."""

  def __init__(self, path: str, global_name: str):
    self.path, self.global_name = path, global_name
    super().__init__(f'{path}: refused global {global_name!r} (not on the allow-list of tcaq_jax.models.'
                     f'torch_pickle; nothing from the file was executed)')


class UnsafeBuildError(TorchPickleError):
  """The pickle tries to set the state (BUILD) of an object it did not create: a class, function, storage..."""

  def __init__(self, path: str, target: str):
    self.path, self.target = path, target
    super().__init__(f'{path}: refused BUILD (__setstate__) on {target}: a checkpoint may only set the state of '
                     f'objects it created itself (hostile or corrupt file; nothing was changed)')


class UnsupportedDtypeError(TorchPickleError):
  """A tensor has a dtype the reader does not convert (complex, quantized, float8...); names key and type."""


class SizeClaimError(TorchPickleError):
  """The file claims more data than it holds (checked before allocating)."""


class SafetensorsHeaderError(TorchPickleError):
  """A .safetensors header is malformed; names the file and the tensor key."""


_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': np.uint16, 'I64': np.int64,
              'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U64': np.uint64, 'U32': np.uint32,
              'U16': np.uint16, 'U8': np.uint8, 'BOOL': np.bool_}


def _st_header(path: str, blob: bytes) -> tuple[dict, memoryview]:
  """(header dict, data buffer) of a safetensors file; SafetensorsHeaderError when the header is invalid."""
  def bad(why):
    return SafetensorsHeaderError(f'{path}: invalid safetensors header: {why}')
  if len(blob) < 8:
    raise bad(f'the file has {len(blob)} bytes, fewer than the 8-byte header length')
  (n,) = struct.unpack('<Q', blob[:8])
  if n > len(blob) - 8:
    raise bad(f'header length {n} exceeds the file ({len(blob)} bytes; truncated or not safetensors)')
  try:
    header = json.loads(blob[8:8 + n])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise bad(f'it is not JSON ({e})') from e
  if not isinstance(header, dict):
    raise bad(f'it is a JSON {type(header).__name__}, not an object of tensors')
  if not any(k != '__metadata__' for k in header):
    raise bad('it lists no tensors')
  return header, memoryview(blob)[8 + n:]


def _st_tensor(path: str, name: str, info, data: memoryview) -> np.ndarray:
  """One validated tensor of a safetensors file (BF16 / F16 as float32)."""
  def bad(why):
    return SafetensorsHeaderError(f'{path}: invalid safetensors header: tensor {name!r} {why}')
  if not isinstance(info, dict):
    raise bad(f'is a JSON {type(info).__name__}, not an object with dtype, shape and data_offsets')
  for field in ('dtype', 'shape', 'data_offsets'):
    if field not in info:
      raise bad(f'has no {field!r}')
  code, shape, offsets = info['dtype'], info['shape'], info['data_offsets']
  if isinstance(code, str) and code.startswith('C'):
    raise UnsupportedDtypeError(f'{path}: tensor {name!r} has dtype {code}: complex dtypes are unsupported')
  if not isinstance(code, str) or code not in _ST_DTYPES:
    raise UnsupportedDtypeError(f'{path}: tensor {name!r} has unsupported dtype {code!r}')
  if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
    raise bad(f'has shape {shape!r}, not a list of non-negative integers')
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
    raise bad(f'has data_offsets {offsets!r}, not two integers')
  (a, b), dt = offsets, np.dtype(_ST_DTYPES[code])
  if a < 0 or b < a or b > len(data):
    raise bad(f'has data_offsets [{a}, {b}] outside the {len(data)} data bytes (negative, reversed or past the '
              f'end; truncated file?)')
  if b - a != math.prod(shape) * dt.itemsize:
    raise bad(f'has {b - a} bytes for shape {shape} {code} ({math.prod(shape) * dt.itemsize} expected)')
  arr = np.frombuffer(data[a:b], dtype=dt).reshape(shape)
  if code == 'BF16':
    arr = (arr.astype(np.uint32) << 16).view(np.float32)
  elif code == 'F16':
    arr = arr.astype(np.float32)
  return np.array(arr)


def load_safetensors(path: str) -> dict:
  """Reads a .safetensors file: {name: numpy array}; BF16/F16 become float32. The header is validated."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TorchPickleError(f'{path}: no such file')
  with open(path, 'rb') as f:
    blob = f.read()
  header, data = _st_header(path, blob)
  return {name: _st_tensor(path, name, info, data) for name, info in header.items() if name != '__metadata__'}


def _npz_check_sizes(path: str, zf: zipfile.ZipFile) -> None:
  """Refuses an .npy member whose header claims more bytes than the member holds (before numpy allocates)."""
  for info in zf.infolist():
    if not info.filename.endswith('.npy'):
      continue
    with zf.open(info) as m:
      version = np.lib.format.read_magic(m)
      if version not in ((1, 0), (2, 0)):
        continue  # numpy reports anything else itself
      read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, _, dtype = read(m)
    nbytes = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and nbytes > info.file_size:
      raise SizeClaimError(f'{path}: array {info.filename[:-4]!r} claims shape {shape} {dtype} ({nbytes} bytes) '
                           f'but holds {info.file_size} bytes (corrupt or hostile file)')


def load_npz(path: str) -> dict:
  """Reads an .npz without pickles: {name: numpy array}."""
  path = os.fspath(path)
  try:
    with zipfile.ZipFile(path) as zf:
      _npz_check_sizes(path, zf)
    with np.load(path, allow_pickle=False) as z:
      return {k: np.array(z[k]) for k in z.files}
  except TorchPickleError:
    raise
  except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
    raise TorchPickleError(f'{path}: cannot read npz ({type(e).__name__}: {e})') from e
