"""The restricted unpickler behind `torch_pickle.load` (see that module's docstring for the rules): an allow-list
of globals mapped to local re-implementations, BUILD only on objects the file created, size claims bounded.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import math
import pickle
import struct

import numpy as np

from tcaq_jax.models.tensor_files import (SizeClaimError, TorchPickleError, UnsafeBuildError, UnsafeGlobalError,
                                          UnsupportedDtypeError)


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
