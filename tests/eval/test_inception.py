"""The Flax FID Inception against independent PyTorch references (random weights).

Reference 1 (runs wherever torch imports): a compact plain-torch.nn FID Inception written here: torchvision's
Inception3 module layout and key names (BasicConv2d with BatchNorm eps 1e-3; InceptionA..E; 1008-way fc; no aux
head) with pytorch-fid's FID forwards (avg pool count_include_pad=False in A, C, E_1; max pool in E_2), the
pytorch-fid preprocessing (F.interpolate bilinear, align_corners=False; 2x - 1).
Reference 2 (runs where torchvision imports; skipped otherwise): torchvision's own Inception3 patched with
pytorch-fid's FID blocks (from pytorch_fid when installed, else the forwards above bound to torchvision's modules).
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
nn = torch.nn
F = torch.nn.functional

import jax  # noqa: E402

from tcaq_jax.eval import inception  # noqa: E402


# ------------------------------------------------------------------------------------- torch reference

class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for i in range(1, 6):
      bd = getattr(self, f'branch7x7dbl_{i}')(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f'branch7x7x3_{i}')(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg(x)
    return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = InceptionA(192, 32)
    self.Mixed_5c = InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, 128)
    self.Mixed_6c = InceptionC(768, 160)
    self.Mixed_6d = InceptionC(768, 160)
    self.Mixed_6e = InceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, max_pool=False)
    self.Mixed_7c = InceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, images_uint8_nchw):
    x = images_uint8_nchw.float() / 255.0
    x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    x = 2 * x - 1
    return _trunk_forward(self, x)


def _trunk_forward(m, x):
  """Runs torchvision-named modules of `m` in Inception3 order -> (pool3, spatial, logits) numpy."""
  x = m.Conv2d_2b_3x3(m.Conv2d_2a_3x3(m.Conv2d_1a_3x3(x)))
  x = F.max_pool2d(x, kernel_size=3, stride=2)
  x = F.max_pool2d(m.Conv2d_4a_3x3(m.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
  for name in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c'):
    x = getattr(m, name)(x)
  spatial = m.Mixed_6d.branch1x1(x)[:, :7]          # [B, 7, 17, 17]
  for name in ('Mixed_6d', 'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c'):
    x = getattr(m, name)(x)
  pool3 = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
  logits = m.fc(pool3)
  spatial = spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)   # (h, w, c) order, as TF NHWC
  return pool3.numpy(), spatial.numpy(), logits.numpy()


def _randomize(model, seed=0):
  """Random weights with O(1) activations through the whole depth; BN statistics away from identity."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, nn.Conv2d):
        fan_in = mod.weight[0].numel()
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(mod, nn.BatchNorm2d):
        c = mod.num_features
        mod.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
        mod.bias.copy_(0.1 * torch.randn(c, generator=g))
        mod.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        mod.running_var.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
      elif isinstance(mod, nn.Linear):
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / mod.weight.shape[1] ** 0.5)
        mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
  return model.eval()


def _state_dict_np(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  model = _randomize(TorchFIDInception())
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 37, 45, 3), dtype=np.uint8)   # non-square, upsampled to 299
  with torch.no_grad():
    ref = model(torch.from_numpy(images).permute(0, 3, 1, 2))
  return model, images, ref


@pytest.fixture(scope='module')
def flax_out(reference):
  model, images, _ = reference
  params = inception.convert_state_dict(_state_dict_np(model))
  out = inception.features(params, images)
  return params, {k: np.asarray(v) for k, v in out.items()}


def test_flax_matches_torch_reference(reference, flax_out):
  _, _, (pool3, spatial, logits) = reference
  _, out = flax_out
  assert out['pool3'].shape == (2, 2048) and out['logits'].shape == (2, 1008)
  assert out['spatial'].shape == (2, 17 * 17 * 7)
  assert np.abs(pool3).mean() > 1e-2                    # activations survive the random depth
  assert _rel(out['pool3'], pool3) < 1e-4
  assert _rel(out['logits'], logits) < 1e-4
  assert _rel(out['spatial'], spatial) < 1e-4


def test_resize_matches_torch_interpolate():
  rng = np.random.default_rng(1)
  for h, w in ((32, 32), (37, 45), (400, 310), (299, 299), (512, 256)):
    x = rng.integers(0, 256, size=(1, h, w, 3), dtype=np.uint8)
    got = np.asarray(inception.preprocess(x))
    t = torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255.0
    ref = 2 * F.interpolate(t, size=(299, 299), mode='bilinear', align_corners=False) - 1
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=2e-6)


def test_convert_rejects_bad_state_dicts(reference):
  sd = _state_dict_np(reference[0])
  bad = dict(sd)
  del bad['Mixed_6d.branch1x1.conv.weight']
  with pytest.raises(inception.InceptionError, match='Mixed_6d/branch1x1/conv/kernel'):
    inception.convert_state_dict(bad)
  bad = dict(sd, **{'AuxLogits.fc.weight': np.zeros((1008, 768), np.float32)})
  with pytest.raises(inception.InceptionError, match='AuxLogits'):
    inception.convert_state_dict(bad)
  bad = dict(sd, **{'fc.weight': np.zeros((1000, 2048), np.float32)})
  with pytest.raises(inception.InceptionError, match='fc/kernel'):
    inception.convert_state_dict(bad)


def test_save_load_roundtrip(tmp_path, flax_out):
  params, _ = flax_out
  inception.save(str(tmp_path / 'inc'), params, source='test')
  loaded = inception.load(str(tmp_path / 'inc'))
  a, b = jax.tree.leaves(params), jax.tree.leaves(loaded)
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_converter_reads_pth(tmp_path, reference, flax_out):
  pytest.importorskip('tcaq_jax.models.torch_pickle')
  pth = tmp_path / 'pt_inception-2015-12-05-test.pth'
  torch.save(reference[0].state_dict(), pth)
  inception.convert(str(pth), str(tmp_path / 'inc'))
  loaded = inception.load(str(tmp_path / 'inc'))
  a, b = jax.tree.leaves(loaded), jax.tree.leaves(flax_out[0])
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_torchvision_fid_inception_matches(reference, flax_out):
  """pytorch-fid's structure from torchvision itself (skipped where torchvision is not installed)."""
  torchvision = pytest.importorskip('torchvision')
  tv = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
  try:
    from pytorch_fid import inception as pf
    blocks = {'Mixed_5b': pf.FIDInceptionA(192, 32), 'Mixed_5c': pf.FIDInceptionA(256, 64),
              'Mixed_5d': pf.FIDInceptionA(288, 64), 'Mixed_6b': pf.FIDInceptionC(768, 128),
              'Mixed_6c': pf.FIDInceptionC(768, 160), 'Mixed_6d': pf.FIDInceptionC(768, 160),
              'Mixed_6e': pf.FIDInceptionC(768, 192), 'Mixed_7b': pf.FIDInceptionE_1(1280),
              'Mixed_7c': pf.FIDInceptionE_2(2048)}
  except ImportError:
    # Bind this file's FID forwards to torchvision's block modules (same attribute names).
    blocks = {}
    for name, fwd in (('Mixed_5b', InceptionA), ('Mixed_5c', InceptionA), ('Mixed_5d', InceptionA),
                      ('Mixed_6b', InceptionC), ('Mixed_6c', InceptionC), ('Mixed_6d', InceptionC),
                      ('Mixed_6e', InceptionC), ('Mixed_7b', InceptionE), ('Mixed_7c', InceptionE)):
      mod = getattr(tv, name)
      mod.max_pool = name == 'Mixed_7c'
      mod.forward = fwd.forward.__get__(mod)
      blocks[name] = mod
  for name, mod in blocks.items():
    setattr(tv, name, mod)
  missing, unexpected = tv.load_state_dict(reference[0].state_dict(), strict=True)
  assert not missing and not unexpected
  tv.eval()
  images = reference[1]
  with torch.no_grad():
    x = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, size=(299, 299),
                      mode='bilinear', align_corners=False)
    pool3, spatial, logits = _trunk_forward(tv, 2 * x - 1)
  _, out = flax_out
  assert _rel(out['pool3'], pool3) < 1e-4
  assert _rel(out['logits'], logits) < 1e-4
  assert _rel(out['spatial'], spatial) < 1e-4
