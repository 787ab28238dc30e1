"""Reads PyTorch checkpoints into numpy without torch and without running code from the file.

`load(path)` handles
  * torch.save zip files (`<dir>/data.pkl` + `<dir>/data/<key>` storages), torch >= 1.6;
  * legacy (non-zip) torch.save files (`_use_new_zipfile_serialization=False`);
  * `.safetensors` (header parsed here, so bf16 works without torch);
  * `.npz` (numpy, `allow_pickle=False`).
Tensors come back as numpy arrays (a copy, C-contiguous); bf16 / fp16 tensors come back as float32.

The pickle is read by a restricted unpickler: `find_class` only resolves an allow-list of globals to
local re-implementations (`torch._utils._rebuild_tensor_v2`, the `torch.*Storage` types, ...) or to
harmless builtins (`collections.OrderedDict`, `set`, `argparse.Namespace`, numpy array rebuilding). Any
other global raises `UnsafeGlobalError` naming `module.name`, before anything is called. With
`stub_unknown=True` (for Lightning checkpoints carrying callback / hyper-parameter objects) an unknown
global becomes an inert `Stub` that only records its arguments; still nothing from the file runs.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

__all__ = ['TorchPickleError', 'UnsafeGlobalError', 'Stub', 'load', 'load_torch', 'load_safetensors',
           'load_npz']


class TorchPickleError(ValueError):
  """A checkpoint file is unreadable: truncated, corrupt, or not in a supported format."""


class UnsafeGlobalError(TorchPickleError):
  """The pickle references a global outside the allow-list (`.global_name` is `module.name`)."""

  def __init__(self, path: str, global_name: str):
    self.path, self.global_name = path, global_name
    super().__init__(f'{path}: refused global {global_name!r} (not on the allow-list of tcaq_jax.models.'
                     f'torch_pickle; nothing from the file was executed)')


_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bf16', 'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:
  """Stands for a `torch.<X>Storage` class: only its element dtype is used."""

  def __init__(self, name: str):
    self.name = name
    dt = _STORAGE_DTYPES[name]
    self.bf16 = dt == 'bf16'
    self.dtype = np.dtype(np.uint16 if self.bf16 else dt)


class _Storage:
  def __init__(self, array: np.ndarray, bf16: bool):
    self.array, self.bf16 = array, bf16


class _LazyTensor:
  """A tensor view of a storage, resolved to numpy once all storages are read."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def resolve(self, path: str) -> np.ndarray:
    st = self.storage
    if not isinstance(st, _Storage):
      raise TorchPickleError(f'{path}: tensor refers to a non-storage object {type(st).__name__}')
    arr = st.array
    if any(n == 0 for n in self.size):
      out = np.zeros(self.size, arr.dtype)
    else:
      extent = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
      if self.offset < 0 or min(self.stride, default=0) < 0 or extent > arr.size:
        raise TorchPickleError(f'{path}: tensor of size {self.size} stride {self.stride} offset {self.offset} '
                               f'exceeds its storage of {arr.size} elements (corrupt file)')
      base = arr[self.offset:]
      out = np.lib.stride_tricks.as_strided(base, self.size, [s * arr.itemsize for s in self.stride])
      out = np.array(out, order='C')
    if st.bf16:
      out = (out.astype(np.uint32) << 16).view(np.float32)
    elif out.dtype == np.float16:
      out = out.astype(np.float32)
    return out


class _TensorType:
  """Stands for `torch.Tensor` / `torch.nn.Parameter` as an argument of `_rebuild_from_type_v2`."""


class Stub:
  """An inert stand-in for a refused global (only with stub_unknown=True); records what it was given."""
  global_name = '?'

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state = args, kwargs, None

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):  # dict subclasses rebuilt with SETITEMS
    self.__dict__.setdefault('items', {})[key] = value

  def append(self, value):  # list subclasses rebuilt with APPENDS
    self.__dict__.setdefault('items_list', []).append(value)

  def extend(self, values):
    for v in values:
      self.append(v)

  def __repr__(self):
    return f'Stub({self.global_name})'


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  return func(*args)


def _safe_globals() -> dict:
  g = {
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
      ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
      ('torch', 'Tensor'): _TensorType, ('torch.nn.parameter', 'Parameter'): _TensorType,
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('argparse', 'Namespace'): argparse.Namespace,
      ('_codecs', 'encode'): codecs.encode,
  }
  for mod in ('builtins', '__builtin__'):
    for name, obj in (('set', set), ('frozenset', frozenset), ('slice', slice), ('complex', complex)):
      g[(mod, name)] = obj
  for name in _STORAGE_DTYPES:
    g[('torch', name)] = _StorageType(name)
  g[('torch.storage', 'UntypedStorage')] = _StorageType('UntypedStorage')
  from numpy._core import multiarray as _ma
  for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    g[(mod, '_reconstruct')] = _ma._reconstruct
    g[(mod, 'scalar')] = _np_scalar
  g[('numpy', 'ndarray')] = np.ndarray
  g[('numpy', 'dtype')] = np.dtype
  return g


def _np_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise pickle.UnpicklingError('numpy scalar with an object dtype is not allowed')
  return np.frombuffer(data, dtype=dtype, count=1)[0]


_SAFE = None


class _Unpickler(pickle.Unpickler):
  """Resolves globals only through the allow-list; storages through `storage_loader`."""

  def __init__(self, f, path: str, storage_loader=None, stub_unknown: bool = False):
    super().__init__(f)
    global _SAFE
    if _SAFE is None:
      _SAFE = _safe_globals()
    self._path, self._storage_loader, self._stub = path, storage_loader, stub_unknown

  def find_class(self, module, name):
    obj = _SAFE.get((module, name))
    if obj is not None:
      return obj
    if self._stub:
      return type(name, (Stub,), {'global_name': f'{module}.{name}'})
    raise UnsafeGlobalError(self._path, f'{module}.{name}')

  def persistent_load(self, pid):
    if self._storage_loader is None:
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
    return self._storage_loader(pid)


def _resolve(obj, path: str, seen=None):
  """Replaces _LazyTensor leaves (inside dicts, lists, tuples, sets, stubs) by numpy arrays."""
  if isinstance(obj, _LazyTensor):
    return obj.resolve(path)
  if isinstance(obj, dict):
    for k in list(obj):
      obj[k] = _resolve(obj[k], path)
    return obj
  if isinstance(obj, list):
    for i, v in enumerate(obj):
      obj[i] = _resolve(v, path)
    return obj
  if isinstance(obj, tuple):
    return tuple(_resolve(v, path) for v in obj)
  if isinstance(obj, (Stub, argparse.Namespace)):
    for k, v in list(vars(obj).items()):
      setattr(obj, k, _resolve(v, path))
    return obj
  return obj


def _load_zip(path: str, zf: zipfile.ZipFile, stub_unknown: bool):
  names = zf.namelist()
  pkl = [n for n in names if n == 'data.pkl' or (n.endswith('/data.pkl') and n.count('/') == 1)]
  if len(pkl) != 1:
    raise TorchPickleError(f'{path}: zip archive has no single <dir>/data.pkl record (not a torch.save file?)')
  prefix = pkl[0][:-len('data.pkl')]
  big = False
  if prefix + 'byteorder' in names:
    big = zf.read(prefix + 'byteorder').decode().strip() == 'big'
  cache = {}

  def load_storage(pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    st_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(st_type, _StorageType):
      raise pickle.UnpicklingError(f'storage type {st_type!r} is not a torch storage')
    if key not in cache:
      rec = f'{prefix}data/{key}'
      try:
        raw = zf.read(rec)
      except KeyError as e:
        raise TorchPickleError(f'{path}: storage record {rec!r} is missing (truncated or corrupt file)') from e
      dt = st_type.dtype.newbyteorder('>') if big else st_type.dtype
      if st_type.name != 'UntypedStorage' and len(raw) != numel * dt.itemsize:
        raise TorchPickleError(f'{path}: storage {rec!r} has {len(raw)} bytes, expected {numel}x{dt.itemsize}')
      arr = np.frombuffer(raw, dtype=dt)
      cache[key] = _Storage(arr.astype(dt.newbyteorder('=')) if big else arr, st_type.bf16)
    return cache[key]

  data = zf.read(pkl[0])
  obj = _Unpickler(io.BytesIO(data), path, load_storage, stub_unknown).load()
  return _resolve(obj, path)


def _load_legacy(path: str, f, stub_unknown: bool):
  plain = lambda: _Unpickler(f, path).load()  # noqa: E731
  magic = plain()
  if magic != _LEGACY_MAGIC:
    raise TorchPickleError(f'{path}: not a torch.save file (no zip archive and no legacy magic number)')
  plain()  # protocol version
  plain()  # sys info
  storages = {}

  def load_storage(pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r} (only tensor storages are supported)')
    _, st_type, root_key, _, numel, view_meta = pid
    if not isinstance(st_type, _StorageType):
      raise pickle.UnpicklingError(f'storage type {st_type!r} is not a torch storage')
    root_key = str(root_key)
    if root_key not in storages:
      storages[root_key] = _Storage(np.zeros(int(numel), st_type.dtype), st_type.bf16)
    st = storages[root_key]
    if view_meta is not None:
      _, off, size = view_meta
      return _Storage(st.array[int(off):int(off) + int(size)], st.bf16)
    return st

  obj = _Unpickler(f, path, load_storage, stub_unknown).load()
  keys = plain()
  for key in keys:
    st = storages.get(str(key))
    if st is None:
      raise TorchPickleError(f'{path}: storage {key!r} listed but never referenced (corrupt file)')
    head = f.read(8)
    if len(head) != 8:
      raise TorchPickleError(f'{path}: file ends before storage {key!r} (truncated)')
    (numel,) = struct.unpack('<q', head)
    nbytes = numel * st.array.itemsize
    raw = f.read(nbytes)
    if numel != st.array.size or len(raw) != nbytes:
      raise TorchPickleError(f'{path}: storage {key!r} is truncated or has the wrong size '
                             f'({len(raw)} bytes read, {st.array.size} elements expected)')
    st.array[:] = np.frombuffer(raw, dtype=st.array.dtype)
  return _resolve(obj, path)


def load_torch(path: str, stub_unknown: bool = False) -> Any:
  """Unpickles a torch.save file (zip or legacy) into Python containers of numpy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TorchPickleError(f'{path}: no such file')
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as zf:
        return _load_zip(path, zf, stub_unknown)
    with open(path, 'rb') as f:
      head = f.read(4)
      f.seek(0)
      if head[:2] == b'PK':
        raise TorchPickleError(f'{path}: zip archive is incomplete (truncated download?)')
      return _load_legacy(path, f, stub_unknown)
  except TorchPickleError:
    raise
  except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, zipfile.LargeZipFile, struct.error,
          ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
    raise TorchPickleError(f'{path}: cannot read checkpoint ({type(e).__name__}: {e}); the file is truncated, '
                           f'corrupt or not a torch.save file') from e


_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': np.uint16, 'I64': np.int64,
              'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def load_safetensors(path: str) -> dict:
  """Reads a .safetensors file: {name: numpy array}; BF16/F16 become float32."""
  with open(path, 'rb') as f:
    blob = f.read()
  try:
    (n,) = struct.unpack('<Q', blob[:8])
    header = json.loads(blob[8:8 + n])
  except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TorchPickleError(f'{path}: not a valid safetensors file ({e})') from e
  data = memoryview(blob)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    dt = _ST_DTYPES.get(info['dtype'])
    if dt is None:
      raise TorchPickleError(f'{path}: tensor {name!r} has unsupported dtype {info["dtype"]}')
    a, b = info['data_offsets']
    if b > len(data):
      raise TorchPickleError(f'{path}: tensor {name!r} lies beyond the end of the file (truncated)')
    arr = np.frombuffer(data[a:b], dtype=dt).reshape(info['shape'])
    if info['dtype'] == 'BF16':
      arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif info['dtype'] == 'F16':
      arr = arr.astype(np.float32)
    out[name] = np.array(arr)
  return out


def load_npz(path: str) -> dict:
  """Reads an .npz without pickles: {name: numpy array}."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: np.array(z[k]) for k in z.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise TorchPickleError(f'{path}: cannot read npz ({e})') from e


def load(path: str, stub_unknown: bool = False) -> Any:
  """Any supported checkpoint file -> Python containers of numpy arrays (see module doc)."""
  path = os.fspath(path)
  if path.endswith('.safetensors'):
    return load_safetensors(path)
  if path.endswith('.npz'):
    return load_npz(path)
  return load_torch(path, stub_unknown=stub_unknown)
