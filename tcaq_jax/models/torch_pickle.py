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

import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

__all__ = ['TorchPickleError', 'UnsafeGlobalError', 'UnsafeBuildError', 'UnsupportedDtypeError',
           'SizeClaimError', 'SafetensorsHeaderError', 'Stub', 'load', 'load_torch', 'load_safetensors',
           'load_npz']


from tcaq_jax.models.tensor_files import (SafetensorsHeaderError, SizeClaimError, TorchPickleError,  # noqa: E402
                                          UnsafeBuildError, UnsafeGlobalError, UnsupportedDtypeError,
                                          load_npz, load_safetensors)

from tcaq_jax.models.safe_unpickler import (_LEGACY_MAGIC, Stub, _Bounded, _check_dtypes, _is_int,  # noqa: E402
                                            _numel, _resolve, _Storage, _storage_type, _Unpickler)


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


def load(path: str, stub_unknown: bool = False) -> Any:
  """Any supported checkpoint file -> Python containers of numpy arrays (see module doc)."""
  path = os.fspath(path)
  if path.endswith('.safetensors'):
    return load_safetensors(path)
  if path.endswith('.npz'):
    return load_npz(path)
  return load_torch(path, stub_unknown=stub_unknown)
