"""Reads PyTorch checkpoints into numpy without torch and without running code from the file.

`load(path)` handles
  * torch.save zip files (`<dir>/data.pkl` + `<dir>/data/<key>` storages), torch >= 1.6;
  * legacy (non-zip) torch.save files (`_use_new_zipfile_serialization=False`);
  * `.safetensors` (header parsed and validated here, so bf16 works without torch);
  * `.npz` (numpy, `allow_pickle=False`).
Tensors come back as numpy arrays (a copy, C-contiguous, one per reference); bf16 / fp16 tensors come back as
float32. Complex and other exotic dtypes raise UnsupportedDtypeError naming the key and the storage type.

The pickle is read by a restricted unpickler (the pure-Python `pickle._Unpickler`, so every opcode can be
checked):
  * `find_class` only resolves an allow-list of globals to local re-implementations
    (`torch._utils._rebuild_tensor_v2`, the `torch.*Storage` types, ...) or to harmless builtins
    (`collections.OrderedDict`, `set`, `argparse.Namespace`, numpy array rebuilding). Any other global raises
    `UnsafeGlobalError` naming `module.name`, before anything is called. With `stub_unknown=True` (for
    Lightning checkpoints carrying callback / hyper-parameter objects) an unknown global becomes an inert
    `Stub` that only records its arguments; still nothing from the file runs.
  * BUILD (`__setstate__`) is only applied to objects the file itself created in this load (OrderedDict,
    argparse.Namespace and Stub instances, numpy arrays and dtypes), never to a class, a function, a storage or
    any other object the reader hands out; anything else raises `UnsafeBuildError`. The allow-list table and
    its storage types are built afresh for every load, so no state survives from one file to the next.
  * Sizes the file claims (storage lengths, pickle byte strings, safetensors offsets, npz shapes) are checked
    against the file's size before anything is allocated (`SizeClaimError`); the tensors of one file may
    expand to at most max(16x the file size, 1 GiB).
"""
from __future__ import annotations

import argparse
import codecs
import collections
import io
import json
import math
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

__all__ = ['TorchPickleError', 'UnsafeGlobalError', 'UnsafeBuildError', 'UnsupportedDtypeError',
           'SizeClaimError', 'SafetensorsHeaderError', 'Stub', 'load', 'load_torch', 'load_safetensors',
           'load_npz']


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


_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bf16', 'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_EXPAND_FACTOR, _EXPAND_FLOOR = 16, 1 << 30
_TEXT_CODECS = frozenset({'latin1', 'latin_1', 'iso8859_1', 'utf8', 'utf_8', 'ascii'})


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _unsupported_reason(name: str) -> str:
  if name.startswith('Complex'):
    return f'complex dtypes are unsupported (storage type torch.{name})'
  return f'dtype of storage type torch.{name} is unsupported'


class _StorageType:
  """Stands for a `torch.<X>Storage` class: only its element dtype is used (None when unsupported)."""

  def __init__(self, name: str):
    self.name = name
    dt = _STORAGE_DTYPES.get(name)
    self.unsupported = None if dt is not None else _unsupported_reason(name)
    self.bf16 = dt == 'bf16'
    self.dtype = None if dt is None else np.dtype(np.uint16 if self.bf16 else dt)


class _Storage:
  """The elements of one storage (array None for an unsupported dtype, whose bytes are never read)."""

  def __init__(self, array, st_type: _StorageType):
    self.array, self.bf16, self.type = array, st_type.bf16, st_type


class _LazyTensor:
  """A tensor view of a storage, resolved to numpy once all storages are read."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def check_dtype(self, path: str, where: str) -> None:
    st = self.storage
    if not isinstance(st, _Storage):
      raise TorchPickleError(f'{path}: tensor {where!r} refers to a non-storage object {type(st).__name__}')
    if st.type.unsupported:
      raise UnsupportedDtypeError(f'{path}: tensor {where!r}: {st.type.unsupported}')

  def _geometry(self, path: str, where: str) -> tuple[int, tuple, tuple]:
    ok = _is_int(self.offset) and self.offset >= 0 and isinstance(self.size, tuple) and isinstance(
        self.stride, tuple) and len(self.size) == len(self.stride) and all(
            _is_int(n) and n >= 0 for n in self.size + self.stride)
    if not ok:
      raise TorchPickleError(f'{path}: tensor {where!r} has an invalid size {self.size!r} / stride '
                             f'{self.stride!r} / offset {self.offset!r} (corrupt file)')
    return int(self.offset), tuple(map(int, self.size)), tuple(map(int, self.stride))

  def resolve(self, path: str, where: str, charge) -> np.ndarray:
    self.check_dtype(path, where)
    offset, size, stride = self._geometry(path, where)
    arr, numel = self.storage.array, math.prod(size)
    charge(numel * (4 if self.storage.bf16 or arr.dtype == np.float16 else arr.itemsize), where)
    if numel == 0:
      out = np.zeros(size, arr.dtype)
    else:
      extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
      if extent > arr.size:
        raise TorchPickleError(f'{path}: tensor {where!r} of size {size} stride {stride} offset {offset} '
                               f'exceeds its storage of {arr.size} elements (corrupt file)')
      view = np.lib.stride_tricks.as_strided(arr[offset:], size, [s * arr.itemsize for s in stride])
      out = np.array(view, order='C')
    if self.storage.bf16:
      out = (out.astype(np.uint32) << 16).view(np.float32)
    elif out.dtype == np.float16:
      out = out.astype(np.float32)
    return out


class _TensorType:
  """Stands for `torch.Tensor` / `torch.nn.Parameter` as an argument of `_rebuild_from_type_v2`."""


class _NdarrayType:
  """Stands for `numpy.ndarray` as the first argument of `_reconstruct` (not callable: no uninitialised memory)."""


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


def _np_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise pickle.UnpicklingError('numpy scalar: only plain dtypes with byte data are allowed')
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _np_reconstruct(subtype, shape, dtype):
  """numpy's `_reconstruct(ndarray, (0,), b'b')`: an empty array that BUILD then fills."""
  if not isinstance(subtype, _NdarrayType) or not (isinstance(shape, tuple) and all(map(_is_int, shape))
                                                   and math.prod(shape) == 0):
    raise pickle.UnpicklingError(f'numpy _reconstruct({type(subtype).__name__}, {shape!r}) is not allowed')
  return np.empty(tuple(shape), np.uint8)


def _np_dtype(obj, align=False, copy=False):
  """numpy.dtype, always a fresh copy (never a shared built-in dtype that BUILD could change)."""
  del copy
  return np.dtype(obj, bool(align), True)


def _encode(obj, encoding='utf-8', errors='strict'):
  """`_codecs.encode` for the text codecs pickles use for bytes (no arbitrary codec lookup)."""
  if not isinstance(obj, str) or encoding.lower().replace('-', '_') not in _TEXT_CODECS:
    raise pickle.UnpicklingError(f'_codecs.encode with codec {encoding!r} is not allowed')
  return codecs.encode(obj, encoding, errors)


def _safe_globals() -> dict:
  """The allow-list, built afresh for every unpickler (nothing in it is shared between loads)."""
  g = {
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
      ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
      ('torch', 'Tensor'): _TensorType, ('torch.nn.parameter', 'Parameter'): _TensorType,
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('argparse', 'Namespace'): argparse.Namespace,
      ('_codecs', 'encode'): _encode,
      ('numpy', 'ndarray'): _NdarrayType(), ('numpy', 'dtype'): _np_dtype,
      ('torch.storage', 'UntypedStorage'): _StorageType('UntypedStorage'),
  }
  for mod in ('builtins', '__builtin__'):
    for name, obj in (('set', set), ('frozenset', frozenset), ('slice', slice), ('complex', complex)):
      g[(mod, name)] = obj
  for name in _STORAGE_DTYPES:
    g[('torch', name)] = _StorageType(name)
  for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    g[(mod, '_reconstruct')] = _np_reconstruct
    g[(mod, 'scalar')] = _np_scalar
  return g


def _describe(obj) -> str:
  if isinstance(obj, type):
    return f'class {obj.__module__}.{obj.__qualname__}'
  t = type(obj)
  return f'a {t.__module__}.{t.__qualname__} object'


def _check_array_state(path: str, state) -> None:
  parts = state[1:] if isinstance(state, tuple) and len(state) == 5 else state
  if not (isinstance(parts, tuple) and len(parts) == 4 and isinstance(parts[1], np.dtype)
          and not parts[1].hasobject and isinstance(parts[3], (bytes, bytearray))):
    raise TorchPickleError(f'{path}: numpy array state is not a plain (non-object) array with byte data')


class _Unpickler(pickle._Unpickler):  # noqa: SLF001  (the pure-Python one: its opcodes can be overridden)
  """Resolves globals only through a per-load allow-list; storages through `storage_loader`; guards BUILD."""

  dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001

  def __init__(self, f, path: str, storage_loader=None, stub_unknown: bool = False):
    super().__init__(f)
    self._path, self._storage_loader, self._stub = path, storage_loader, stub_unknown
    self._globals = _safe_globals()

  def find_class(self, module, name):
    obj = self._globals.get((module, name))
    if obj is not None:
      return obj
    if module == 'torch' and isinstance(name, str) and name.endswith('Storage') and name.isidentifier():
      return _StorageType(name)  # a data type, not code: refused with its key once a tensor uses it
    if self._stub:
      return type(name, (Stub,), {'global_name': f'{module}.{name}'})
    raise UnsafeGlobalError(self._path, f'{module}.{name}')

  def persistent_load(self, pid):
    if self._storage_loader is None:
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
    return self._storage_loader(pid)

  def _build(self):
    state = self.stack.pop()
    inst = self.stack[-1]
    if isinstance(inst, Stub):
      inst.__setstate__(state)
    elif type(inst) is np.ndarray or isinstance(inst, np.dtype):
      if type(inst) is np.ndarray:
        _check_array_state(self._path, state)
      inst.__setstate__(state)
    elif type(inst) in (collections.OrderedDict, argparse.Namespace):
      self._set_attributes(inst, state)
    else:
      raise UnsafeBuildError(self._path, _describe(inst))

  def _set_attributes(self, inst, state):
    parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
    for part in parts:
      if part is None:
        continue
      if not (isinstance(part, dict) and all(isinstance(k, str) and not k.startswith('__') for k in part)):
        raise UnsafeBuildError(self._path, f'{_describe(inst)} (state must be plain attribute names)')
      inst.__dict__.update(part)

  def _bytearray8(self):
    (n,) = struct.unpack('<Q', self.read(8))
    data = self.read(n)
    if len(data) != n:
      raise pickle.UnpicklingError(f'BYTEARRAY8 claims {n} bytes, the file holds {len(data)}')
    self.append(bytearray(data))

  dispatch[pickle.BUILD[0]] = _build
  dispatch[pickle.BYTEARRAY8[0]] = _bytearray8


class _Bounded:
  """File wrapper whose reads never ask for more than the bytes left (a hostile length must not be allocated)."""

  def __init__(self, f, size: int):
    self._f, self._size = f, size

  def read(self, n=-1):
    left = max(self._size - self._f.tell(), 0)
    return self._f.read(left if n is None or n < 0 or n > left else n)

  def readline(self):
    return self._f.readline()


def _walk(obj, leaf, where='', active=None):
  """Replaces _LazyTensor leaves (inside dicts, lists, tuples, stubs, namespaces) by `leaf(t, key path)`."""
  if isinstance(obj, _LazyTensor):
    return leaf(obj, where or '<root>')
  if not isinstance(obj, (dict, list, tuple, Stub, argparse.Namespace)):
    return obj
  active = set() if active is None else active
  if id(obj) in active:  # a cycle built with the memo
    return obj
  active.add(id(obj))
  join = lambda k: f'{where}/{k}' if where else str(k)  # noqa: E731
  if isinstance(obj, dict):
    for k in list(obj):
      obj[k] = _walk(obj[k], leaf, join(k), active)
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      obj[i] = _walk(v, leaf, join(i), active)
  elif isinstance(obj, tuple):
    obj = tuple(_walk(v, leaf, join(i), active) for i, v in enumerate(obj))
  else:
    for k, v in list(vars(obj).items()):
      vars(obj)[k] = _walk(v, leaf, join(k), active)
  active.discard(id(obj))
  return obj


def _resolve(obj, path: str, file_bytes: int):
  """Tensors -> numpy arrays; refuses a file whose tensors expand past max(16 x its size, 1 GiB)."""
  budget, used = max(_EXPAND_FACTOR * file_bytes, _EXPAND_FLOOR), [0]

  def charge(nbytes, where):
    used[0] += nbytes
    if used[0] > budget:
      raise SizeClaimError(f'{path}: tensor {where!r} brings the tensors to {used[0]} bytes, more than '
                           f'{budget} (16x the file\'s {file_bytes} bytes, or 1 GiB); corrupt or hostile file')

  return _walk(obj, lambda t, where: t.resolve(path, where, charge))


def _check_dtypes(obj, path: str) -> None:
  """Raises UnsupportedDtypeError (naming the key) for the first tensor with an unsupported storage type."""
  def leaf(t, where):
    t.check_dtype(path, where)
    return t
  _walk(obj, leaf)


def _storage_type(pid) -> _StorageType:
  st_type = pid[1]
  if not isinstance(st_type, _StorageType):
    raise pickle.UnpicklingError(f'storage type {st_type!r} is not a torch storage')
  return st_type


def _numel(path: str, key: str, numel) -> int:
  if not _is_int(numel) or numel < 0:
    raise TorchPickleError(f'{path}: storage {key!r} has an invalid element count {numel!r} (corrupt file)')
  return int(numel)


def _load_zip(path: str, zf: zipfile.ZipFile, stub_unknown: bool):
  names = zf.namelist()
  pkl = [n for n in names if n == 'data.pkl' or (n.endswith('/data.pkl') and n.count('/') == 1)]
  if len(pkl) != 1:
    raise TorchPickleError(f'{path}: zip archive has no single <dir>/data.pkl record (not a torch.save file?)')
  prefix = pkl[0][:-len('data.pkl')]
  file_bytes = os.path.getsize(path)
  big = False
  if prefix + 'byteorder' in names:
    big = zf.read(prefix + 'byteorder').decode().strip() == 'big'
  cache = {}

  def read_record(key, st_type, numel):
    rec = f'{prefix}data/{key}'
    try:
      info = zf.getinfo(rec)
    except KeyError as e:
      raise TorchPickleError(f'{path}: storage record {rec!r} is missing (truncated or corrupt file)') from e
    want = numel * (1 if st_type.name == 'UntypedStorage' else st_type.dtype.itemsize)
    if info.compress_size > file_bytes or (st_type.name != 'UntypedStorage' and info.file_size != want):
      raise SizeClaimError(f'{path}: storage {rec!r} holds {info.file_size} bytes ({info.compress_size} stored) '
                           f'but the pickle claims {numel} x {st_type.name} ({want} bytes); the file has '
                           f'{file_bytes} bytes (corrupt or hostile file)')
    return rec, zf.read(rec)

  def load_storage(pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    st_type, key = _storage_type(pid), str(pid[2])
    if key not in cache:
      if st_type.unsupported:
        cache[key] = _Storage(None, st_type)  # refused with the tensor's key in _resolve
        return cache[key]
      rec, raw = read_record(key, st_type, _numel(path, key, pid[4]))
      dt = st_type.dtype.newbyteorder('>') if big else st_type.dtype
      if len(raw) % dt.itemsize:
        raise TorchPickleError(f'{path}: storage {rec!r} has {len(raw)} bytes, not a multiple of {dt.itemsize}')
      arr = np.frombuffer(raw, dtype=dt)
      cache[key] = _Storage(arr.astype(dt.newbyteorder('=')) if big else arr, st_type)
    return cache[key]

  data = zf.read(pkl[0])
  obj = _Unpickler(io.BytesIO(data), path, load_storage, stub_unknown).load()
  return _resolve(obj, path, file_bytes)


def _load_legacy(path: str, f, stub_unknown: bool):
  file_bytes = os.path.getsize(path)
  bf = _Bounded(f, file_bytes)
  plain = lambda: _Unpickler(bf, path).load()  # noqa: E731
  magic = plain()
  if magic != _LEGACY_MAGIC:
    raise TorchPickleError(f'{path}: not a torch.save file (no zip archive and no legacy magic number)')
  plain()  # protocol version
  plain()  # sys info
  storages, claimed = {}, [0]

  def new_storage(root_key, st_type, numel):
    nbytes = numel * st_type.dtype.itemsize
    claimed[0] += nbytes
    if claimed[0] > file_bytes:
      more = '' if claimed[0] == nbytes else f', {claimed[0]} bytes with the storages before it'
      raise SizeClaimError(f'{path}: storage {root_key!r} claims {numel} x {st_type.name} ({nbytes} bytes{more}), '
                           f'more than the whole file ({file_bytes} bytes; corrupt or hostile file)')
    return _Storage(np.zeros(numel, st_type.dtype), st_type)

  def load_storage(pid):
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r} (only tensor storages are supported)')
    st_type, root_key, view_meta = _storage_type(pid), str(pid[2]), pid[5]
    if root_key not in storages:
      numel = _numel(path, root_key, pid[4])
      storages[root_key] = _Storage(None, st_type) if st_type.unsupported else new_storage(root_key, st_type,
                                                                                          numel)
    st = storages[root_key]
    if view_meta is None or st.array is None:
      return st
    _, off, size = view_meta
    if not (_is_int(off) and _is_int(size) and 0 <= off and 0 <= size and off + size <= st.array.size):
      raise TorchPickleError(f'{path}: view {view_meta!r} of storage {root_key!r} lies outside its '
                             f'{st.array.size} elements (corrupt file)')
    return _Storage(st.array[int(off):int(off) + int(size)], st_type)

  obj = _Unpickler(bf, path, load_storage, stub_unknown).load()
  _check_dtypes(obj, path)
  keys = plain()
  for key in keys:
    st = storages.get(str(key))
    if st is None:
      raise TorchPickleError(f'{path}: storage {key!r} listed but never referenced (corrupt file)')
    if st.array is None:
      raise UnsupportedDtypeError(f'{path}: storage {key!r}: {st.type.unsupported}')
    head = f.read(8)
    if len(head) != 8:
      raise TorchPickleError(f'{path}: file ends before storage {key!r} (truncated)')
    (numel,) = struct.unpack('<q', head)
    nbytes = st.array.nbytes
    raw = f.read(nbytes) if numel == st.array.size else b''
    if numel != st.array.size or len(raw) != nbytes:
      raise TorchPickleError(f'{path}: storage {key!r} is truncated or has the wrong size '
                             f'({len(raw)} bytes read, {st.array.size} elements expected, header says {numel})')
    st.array[:] = np.frombuffer(raw, dtype=st.array.dtype)
  return _resolve(obj, path, file_bytes)


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
  except RecursionError as e:
    raise TorchPickleError(f'{path}: objects nested too deeply (corrupt or hostile file)') from e
  except MemoryError as e:
    raise TorchPickleError(f'{path}: ran out of memory while reading (the file claims more data than this '
                           f'machine holds)') from e
  except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, zipfile.LargeZipFile, struct.error,
          ValueError, TypeError, AttributeError, IndexError, KeyError, OSError, OverflowError) as e:
    raise TorchPickleError(f'{path}: cannot read checkpoint ({type(e).__name__}: {e}); the file is truncated, '
                           f'corrupt or not a torch.save file') from e


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


def load(path: str, stub_unknown: bool = False) -> Any:
  """Any supported checkpoint file -> Python containers of numpy arrays (see module doc)."""
  path = os.fspath(path)
  if path.endswith('.safetensors'):
    return load_safetensors(path)
  if path.endswith('.npz'):
    return load_npz(path)
  return load_torch(path, stub_unknown=stub_unknown)
