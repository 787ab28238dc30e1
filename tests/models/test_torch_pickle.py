"""Restricted torch.save reader: values vs torch itself, refusal of code-running pickles, clear errors on
truncated / corrupt files, safetensors and npz."""
import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

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
