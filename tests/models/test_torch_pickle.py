"""Restricted torch.save reader: values vs torch itself, refusal of code-running pickles, clear errors on
truncated / corrupt files, safetensors and npz; hostile files (BUILD on shared objects, size claims, malformed
safetensors headers, complex dtypes) built by hand in tmp_path."""
import argparse
import collections
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from tcaq_jax.models import safe_unpickler  # the reader's internals: a hostile file must leave them untouched
from tcaq_jax.models import torch_pickle as tp


def _sample(torch):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(20, generator=g)
  sd = collections.OrderedDict(
      f32=torch.randn(3, 4, generator=g), transposed=torch.randn(5, 6, generator=g).t(),
      f16=torch.randn(4, 2, generator=g).half(), bf16=torch.randn(2, 3, generator=g).bfloat16(),
      i64=torch.arange(7), boolean=torch.tensor([True, False]), scalar=torch.tensor(2.5),
      param=torch.nn.Parameter(torch.randn(2, 2, generator=g)), view=base[3:9].view(2, 3), whole=base,
      empty=torch.zeros(0, 3), conv=torch.randn(8, 4, 3, 3, generator=g)[:, 1:3])
  return {'state_dict': sd, 'epoch': 7, 'tags': {'a', 'b'}, 'name': 'x', 'nested': [sd['f32'], (1, 2.0)]}


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_values_match_torch(tmp_path, zip_format):
  torch = pytest.importorskip('torch')
  obj = _sample(torch)
  path = tmp_path / 'sample.pt'
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  got = tp.load(str(path))
  assert got['epoch'] == 7 and got['tags'] == {'a', 'b'} and got['name'] == 'x'
  assert isinstance(got['state_dict'], collections.OrderedDict)
  assert list(got['state_dict']) == list(obj['state_dict'])
  for k, v in obj['state_dict'].items():
    want = v.detach()
    want = (want.float() if want.dtype in (torch.float16, torch.bfloat16) else want).numpy()
    a = got['state_dict'][k]
    assert isinstance(a, np.ndarray) and a.shape == want.shape and a.dtype == want.dtype, k
    np.testing.assert_array_equal(a, want, err_msg=k)
  assert got['state_dict']['bf16'].dtype == np.float32 and got['state_dict']['f16'].dtype == np.float32
  np.testing.assert_array_equal(got['nested'][0], obj['state_dict']['f32'].numpy())
  assert got['nested'][1] == (1, 2.0)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def _evil_files(tmp_path):
  marker = tmp_path / 'PWNED'
  payload = pickle.dumps({'state_dict': {'w': _Evil(marker)}}, protocol=2)
  legacy = tmp_path / 'evil_legacy.pt'
  legacy.write_bytes(payload)
  zipped = tmp_path / 'evil_zip.pt'
  with zipfile.ZipFile(zipped, 'w') as zf:
    zf.writestr('archive/data.pkl', payload)
  return marker, [zipped, legacy]


def test_refuses_code_execution(tmp_path):
  marker, files = _evil_files(tmp_path)
  for f in files:
    with pytest.raises(tp.UnsafeGlobalError) as e:
      tp.load(str(f))
    assert e.value.global_name in ('posix.system', 'os.system', 'nt.system')
    assert e.value.global_name in str(e.value) and str(f) in str(e.value)
    assert not marker.exists()
  # stub mode turns the global into an inert record: still nothing runs
  got = tp.load(str(files[0]), stub_unknown=True)
  assert isinstance(got['state_dict']['w'], tp.Stub) and not marker.exists()
  assert got['state_dict']['w'].global_name in ('posix.system', 'os.system', 'nt.system')


@pytest.mark.parametrize('expr', ['builtins.eval', 'builtins.getattr', 'subprocess.Popen', 'torch.load'])
def test_refuses_other_globals(tmp_path, expr):
  mod, name = expr.rsplit('.', 1)
  payload = b'\x80\x02c' + f'{mod}\n{name}\n'.encode() + b'X\x01\x00\x00\x001\x85R.'
  f = tmp_path / 'g.pt'
  f.write_bytes(payload)
  with pytest.raises(tp.UnsafeGlobalError, match=expr.replace('.', r'\.')):
    tp.load(str(f))


def test_refuses_pickled_module(tmp_path):
  torch = pytest.importorskip('torch')
  f = tmp_path / 'module.pt'
  torch.save(torch.nn.Linear(2, 3), f)
  with pytest.raises(tp.UnsafeGlobalError, match=r'torch\.nn\.modules\.linear\.Linear'):
    tp.load(str(f))


@pytest.mark.parametrize('zip_format', [True, False], ids=['zip', 'legacy'])
def test_truncated_and_corrupt_files(tmp_path, zip_format):
  torch = pytest.importorskip('torch')
  full = tmp_path / 'full.pt'
  torch.save({'w': torch.randn(64, 64)}, full, _use_new_zipfile_serialization=zip_format)
  blob = full.read_bytes()
  for cut in (len(blob) // 2, len(blob) - 10, 20):
    f = tmp_path / f'cut{cut}.pt'
    f.write_bytes(blob[:cut])
    with pytest.raises(tp.TorchPickleError, match=str(f)):
      tp.load(str(f))
  junk = tmp_path / 'junk.pt'
  junk.write_bytes(b'this is not a checkpoint at all')
  with pytest.raises(tp.TorchPickleError, match='junk.pt'):
    tp.load(str(junk))
  with pytest.raises(tp.TorchPickleError, match='no such file'):
    tp.load(str(tmp_path / 'absent.pt'))


def test_safetensors_and_npz(tmp_path):
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  arrays = {'a': rng.standard_normal((3, 4)).astype(np.float32), 'b': np.arange(5, dtype=np.int64),
            'h': rng.standard_normal(6).astype(np.float16)}
  save_file(arrays, str(tmp_path / 'x.safetensors'))
  got = tp.load(str(tmp_path / 'x.safetensors'))
  np.testing.assert_array_equal(got['a'], arrays['a'])
  np.testing.assert_array_equal(got['b'], arrays['b'])
  assert got['h'].dtype == np.float32
  np.testing.assert_array_equal(got['h'], arrays['h'].astype(np.float32))
  np.savez(tmp_path / 'x.npz', **arrays)
  got = tp.load(str(tmp_path / 'x.npz'))
  np.testing.assert_array_equal(got['a'], arrays['a'])
  torch = pytest.importorskip('torch')
  from safetensors.torch import save_file as save_torch
  t = torch.randn(4, 5).bfloat16()
  save_torch({'w': t}, str(tmp_path / 'bf.safetensors'))
  np.testing.assert_array_equal(tp.load(str(tmp_path / 'bf.safetensors'))['w'], t.float().numpy())
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes((tmp_path / 'x.safetensors').read_bytes()[:40])
  with pytest.raises(tp.TorchPickleError, match='bad.safetensors'):
    tp.load(str(bad))


# ------------------------------------------------------------------ hand-built pickles (no torch needed)

def op_str(text):
  b = text.encode()
  return b'X' + struct.pack('<I', len(b)) + b


def op_int(n):
  return b'\x8a\x08' + struct.pack('<q', n)  # LONG1, 8 bytes: any int64


def op_global(mod, name):
  return f'c{mod}\n{name}\n'.encode()


def op_tuple(*items):
  return b'(' + b''.join(items) + b't'


def op_call(fn, *args):
  return fn + op_tuple(*args) + b'R'


def op_dict(items):
  return b'}' + b''.join(op_str(k) + v + b's' for k, v in items.items())


def op_build(target, state=None, slots=None):
  """BUILD on `target` with (state dict, slot dict): the pickle form of obj.__setstate__ / setattr."""
  if not slots:
    return target + op_dict(state) + b'b'
  return target + (op_dict(state) if state else b'N') + op_dict(slots) + b'\x86b'


def op_storage(key, numel, storage='FloatStorage', legacy=False):
  view = (b'N',) if legacy else ()
  return op_tuple(op_str('storage'), op_global('torch', storage), op_str(key), op_str('cpu'), op_int(numel),
                  *view) + b'Q'


def op_tensor(storage, size, stride, offset=0):
  return op_call(op_global('torch._utils', '_rebuild_tensor_v2'), storage, op_int(offset),
                 op_tuple(*map(op_int, size)), op_tuple(*map(op_int, stride)), b'\x89',
                 op_call(op_global('collections', 'OrderedDict')))


def write_torch_zip(path, body, storages=None):
  """A torch.save zip: `body` = the opcodes of the pickled object, storages {key: numpy array}."""
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', b'\x80\x02' + body + b'.')
    for key, a in (storages or {}).items():
      zf.writestr(f'archive/data/{key}', np.ascontiguousarray(a).tobytes())
  return str(path)


def write_state_dict_zip(path, sd):
  """{key: float32 array} as a torch.save zip file (one storage per tensor)."""
  items, storages = {}, {}
  for i, (k, a) in enumerate(sd.items()):
    a = np.ascontiguousarray(a, np.float32)
    stride = tuple(int(np.prod(a.shape[j + 1:])) for j in range(a.ndim))
    items[k] = op_tensor(op_storage(str(i), a.size), a.shape, stride)
    storages[str(i)] = a
  return write_torch_zip(path, op_dict(items), storages)


def poison_body():
  """BUILDs on objects the reader shares (storage type, classes, module functions), then a refused global."""
  big_endian = op_call(op_global('numpy', 'dtype'), op_str('>f4'))
  return (op_build(op_global('torch', 'FloatStorage'), slots={'dtype': big_endian, 'bf16': b'\x88'}) + b'0'
          + op_build(op_global('argparse', 'Namespace'), slots={'__len__': op_int(3)}) + b'0'
          + op_build(op_global('torch._utils', '_rebuild_tensor_v2'), state={'hit': op_int(1)}) + b'0'
          + op_global('os', 'system'))


_GOOD = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5


@pytest.mark.parametrize('target', ['storage_type', 'class', 'function', 'cached_storage', 'tensor'])
def test_build_on_shared_objects_is_refused_and_leaves_nothing_behind(tmp_path, target):
  shared = {
      'storage_type': op_global('torch', 'FloatStorage'), 'class': op_global('argparse', 'Namespace'),
      'function': op_global('torch._utils', '_rebuild_tensor_v2'),
      'cached_storage': op_storage('0', 6), 'tensor': op_tensor(op_storage('0', 6), (2, 3), (3, 1))}[target]
  body = op_build(shared, slots={'bf16': b'\x88', 'dtype': op_call(op_global('numpy', 'dtype'), op_str('>f4'))})
  body = b'(' + body + op_tensor(op_storage('0', 6), (2, 3), (3, 1)) + b'l'  # the poisoned object, then a tensor
  bad = write_torch_zip(tmp_path / 'poison.pt', body, {'0': _GOOD})
  with pytest.raises(tp.UnsafeBuildError, match='poison.pt: refused BUILD'):
    tp.load(bad)
  good = write_torch_zip(tmp_path / 'good.pt', op_dict({'w': op_tensor(op_storage('0', 6), (2, 3), (3, 1))}),
                         {'0': _GOOD})
  got = tp.load(good)['w']
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, _GOOD)


def test_poisoned_file_then_good_file_in_one_process(tmp_path):
  bad = write_torch_zip(tmp_path / 'poison.pt', poison_body())
  for _ in range(2):
    with pytest.raises(tp.UnsafeBuildError, match='_StorageType'):
      tp.load(bad)
  good = write_torch_zip(tmp_path / 'good.pt', op_dict({'w': op_tensor(op_storage('0', 6), (2, 3), (3, 1))}),
                         {'0': _GOOD})
  np.testing.assert_array_equal(tp.load(good)['w'], _GOOD)
  assert '__len__' not in vars(argparse.Namespace) and not hasattr(safe_unpickler._rebuild_tensor_v2, 'hit')
  for body, what in ((op_build(op_global('argparse', 'Namespace'), slots={'__len__': op_int(3)}),
                      'class argparse.Namespace'),
                     (op_build(op_global('collections', 'OrderedDict'), slots={'x': op_int(3)}),
                      'class collections.OrderedDict'),
                     (op_build(op_global('torch._utils', '_rebuild_tensor_v2'), slots={'__defaults__': b')'}),
                      'builtins.function')):
    with pytest.raises(tp.UnsafeBuildError, match=what):
      tp.load(write_torch_zip(tmp_path / 'p.pt', body))
  assert '__len__' not in vars(argparse.Namespace)
  assert safe_unpickler._rebuild_tensor_v2.__defaults__ == (False, None, None)
  # a numpy dtype in the file is always a fresh copy: its BUILD cannot change numpy's own float32
  dtype = op_call(op_global('numpy', 'dtype'), op_str('f4'), b'\x89', b'\x89')
  state = op_tuple(op_int(3), op_str('>'), b'N', b'N', b'N', op_int(-1), op_int(-1), op_int(0))
  got = tp.load(write_torch_zip(tmp_path / 'dt.pt', dtype + state + b'b'))
  assert got.byteorder == '>' and np.dtype('f4') is not got and np.dtype('f4').byteorder == '='
  assert np.array([1.0], np.float32).tobytes() == struct.pack('<f', 1.0)


def test_state_of_own_objects_still_builds(tmp_path):
  """What real checkpoints BUILD: a state dict's _metadata, Lightning's Namespace hyper-parameters, numpy."""
  ns = op_build(op_call(op_global('argparse', 'Namespace')), state={'lr': b'G?\xb9\x99\x99\x99\x99\x99\x9a'})
  od = op_build(op_call(op_global('collections', 'OrderedDict')), state={'_metadata': op_dict({'': op_int(1)})})
  arr = pickle.dumps(np.arange(3, dtype=np.int16), protocol=2)[2:-1]
  got = tp.load(write_torch_zip(tmp_path / 'ok.pt', op_dict({'hp': ns, 'sd': od, 'a': arr})))
  assert vars(got['hp']) == {'lr': 0.1} and got['sd']._metadata == {'': 1}
  np.testing.assert_array_equal(got['a'], np.arange(3, dtype=np.int16))
  with pytest.raises(tp.UnsafeBuildError, match='plain attribute names'):
    tp.load(write_torch_zip(tmp_path / 'd.pt', op_build(op_call(op_global('argparse', 'Namespace')),
                                                         slots={'__class__': op_global('torch', 'Tensor')})))


def _legacy_file(path, body, keys, tail=b''):
  head = b''.join(pickle.dumps(x, protocol=2) for x in (0x1950a86a20f9469cfc6c, 1001, {'little_endian': True}))
  path.write_bytes(head + b'\x80\x02' + body + b'.' + pickle.dumps(keys, protocol=2) + tail)
  return str(path)


def test_size_claims_are_checked_before_allocating(tmp_path):
  # a ~200-byte legacy file whose storage claims 10**13 floats (36.4 TiB)
  f = _legacy_file(tmp_path / 'huge.pt', op_dict({'w': op_tensor(op_storage('0', 10**13, legacy=True), (10**13,),
                                                                   (1,))}), ['0'])
  assert os.path.getsize(f) < 400
  with pytest.raises(tp.SizeClaimError, match=r"huge.pt: storage '0' claims 10000000000000 x FloatStorage "
                                               r'\(40000000000000 bytes\)'):
    tp.load(f)
  # the same claim in a zip file: the record's size is checked before it is read
  z = write_torch_zip(tmp_path / 'huge_zip.pt', op_dict({'w': op_tensor(op_storage('0', 10**13), (2,), (1,))}),
                      {'0': np.zeros(2, np.float32)})
  with pytest.raises(tp.SizeClaimError, match=r"huge_zip.pt: storage 'archive/data/0' holds 8 bytes .* but the pickle "
                                                   r'claims 10000000000000 x FloatStorage \(40000000000000 bytes\)'):
    tp.load(z)
  # a zero-stride tensor of 2**29 floats over a 1-float storage: 2 GiB from a tiny file
  z = write_torch_zip(tmp_path / 'broadcast.pt', op_dict({'w': op_tensor(op_storage('0', 1), (2**29,), (0,))}),
                      {'0': np.zeros(1, np.float32)})
  with pytest.raises(tp.SizeClaimError, match="broadcast.pt: tensor 'w' brings the tensors to 2147483648 bytes"):
    tp.load(z)
  # BYTEARRAY8 claiming 2**50 bytes; an npz whose header claims a huge shape
  f = tmp_path / 'ba.pt'
  f.write_bytes(b'\x80\x05\x96' + struct.pack('<Q', 2**50) + b'xx.')
  with pytest.raises(tp.TorchPickleError, match='ba.pt: .*BYTEARRAY8 claims 1125899906842624 bytes'):
    tp.load(str(f))
  npy = io.BytesIO()
  np.lib.format.write_array_header_1_0(npy, {'descr': '<f4', 'fortran_order': False, 'shape': (10**13,)})
  with zipfile.ZipFile(tmp_path / 'huge.npz', 'w') as zf:
    zf.writestr('w.npy', npy.getvalue() + b'\0' * 16)
  with pytest.raises(tp.SizeClaimError, match=r"huge.npz: array 'w' claims shape \(10000000000000,\) float32"):
    tp.load(str(tmp_path / 'huge.npz'))


def _safetensors(path, header, data=b'\0' * 16):
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(raw)) + raw + data)
  return str(path)


_ST_ENTRY = {'dtype': 'F32', 'shape': [2, 2], 'data_offsets': [0, 16]}


@pytest.mark.parametrize('name,header,match', [
    ('list', [_ST_ENTRY], 'it is a JSON list, not an object of tensors'),
    ('empty', {'__metadata__': {'a': 'b'}}, 'it lists no tensors'),
    ('not_json', b'{"w": ', 'it is not JSON'),
    ('entry_list', {'w': [1, 2]}, "tensor 'w' is a JSON list"),
    ('no_dtype', {'w': {'shape': [2, 2], 'data_offsets': [0, 16]}}, "tensor 'w' has no 'dtype'"),
    ('bad_shape', {'w': dict(_ST_ENTRY, shape='2x2')}, "tensor 'w' has shape '2x2', not a list"),
    ('neg_shape', {'w': dict(_ST_ENTRY, shape=[-4, -1])}, "tensor 'w' has shape \\[-4, -1\\]"),
    ('neg_offset', {'w': dict(_ST_ENTRY, data_offsets=[-8, 8])}, "tensor 'w' has data_offsets \\[-8, 8\\] outside"),
    ('past_end', {'w': dict(_ST_ENTRY, data_offsets=[0, 4096])}, "tensor 'w' has data_offsets \\[0, 4096\\] outside"),
    ('size', {'w': dict(_ST_ENTRY, shape=[3, 3])}, "tensor 'w' has 16 bytes for shape \\[3, 3\\] F32 \\(36 expected"),
    ('offsets', {'w': dict(_ST_ENTRY, data_offsets='0-16')}, "tensor 'w' has data_offsets '0-16', not two"),
])
def test_malformed_safetensors_headers(tmp_path, name, header, match):
  f = _safetensors(tmp_path / f'{name}.safetensors', header)
  with pytest.raises(tp.SafetensorsHeaderError, match=f'{name}.safetensors: invalid safetensors header: {match}'):
    tp.load(f)


def test_safetensors_header_length_past_the_file(tmp_path):
  long = tmp_path / 'long.safetensors'
  long.write_bytes(struct.pack('<Q', 10**12) + b'{}')
  with pytest.raises(tp.SafetensorsHeaderError, match='long.safetensors: invalid safetensors header: header length '
                                                       '1000000000000 exceeds the file'):
    tp.load(str(long))


def test_complex_and_other_dtypes_are_named_unsupported(tmp_path):
  body = op_dict({'sd': op_dict({'ok': op_tensor(op_storage('0', 2), (2,), (1,)),
                                 'conv.weight': op_tensor(op_storage('1', 2, 'ComplexFloatStorage'), (2,), (1,))})})
  z = write_torch_zip(tmp_path / 'cplx.pt', body, {'0': np.zeros(2, np.float32), '1': np.zeros(2, np.complex64)})
  legacy_body = op_dict({'sd': op_dict({'conv.weight': op_tensor(
      op_storage('1', 2, 'ComplexDoubleStorage', legacy=True), (2,), (1,))})})
  legacy = _legacy_file(tmp_path / 'cplx_legacy.pt', legacy_body, ['1'],
                        struct.pack('<q', 2) + np.zeros(2, np.complex128).tobytes())
  for f, storage in ((z, 'ComplexFloatStorage'), (legacy, 'ComplexDoubleStorage')):
    for stub in (False, True):
      with pytest.raises(tp.UnsupportedDtypeError,
                         match=f"cplx.*pt: tensor 'sd/conv.weight': complex dtypes are unsupported \\(storage "
                               f'type torch.{storage}\\)'):
        tp.load(f, stub_unknown=stub)
  q = write_torch_zip(tmp_path / 'q.pt', op_dict({'w': op_tensor(op_storage('0', 2, 'QInt8Storage'), (2,), (1,))}),
                      {'0': np.zeros(2, np.int8)})
  with pytest.raises(tp.UnsupportedDtypeError, match="tensor 'w': dtype of storage type torch.QInt8Storage"):
    tp.load(q)
  f = _safetensors(tmp_path / 'c.safetensors', {'w': {'dtype': 'C64', 'shape': [2], 'data_offsets': [0, 16]}})
  with pytest.raises(tp.UnsupportedDtypeError, match="c.safetensors: tensor 'w' has dtype C64: complex dtypes"):
    tp.load(f)


def test_complex_tensor_from_torch(tmp_path):
  torch = pytest.importorskip('torch')
  for zip_format in (True, False):
    f = tmp_path / f'c{zip_format}.pt'
    torch.save({'state_dict': {'w': torch.zeros(2, dtype=torch.complex64)}}, f,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(tp.UnsupportedDtypeError, match="tensor 'state_dict/w': complex dtypes are unsupported"):
      tp.load(str(f), stub_unknown=True)
