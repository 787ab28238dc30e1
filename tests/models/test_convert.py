"""Checkpoint converter: torch-free conversion, error listings, LDM Lightning checkpoints (EMA, skipped parts,
scale_factor, stubs), YAML configs, models.load."""
import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import traverse_util

from tcaq_jax import checkpoint
from tcaq_jax.models import configs, load, torch_pickle
from tcaq_jax.models.convert import REPORT_NAME, ConversionError, abstract_params, config_from_yaml, \
    convert_checkpoint, write_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _torch_key(path):
  """Flax path -> PyTorch key (test-side inverse of the naming rule; `mid.block_1`-style names are literal)."""
  segs = []
  for i, p in enumerate(path[:-1]):
    m = re.fullmatch(r'(.*?)((?:_\d+)+)', p)
    if m and not (i > 0 and path[i - 1] == 'mid'):
      segs += [m.group(1)] + m.group(2)[1:].split('_')
    else:
      segs.append(p)
  return '.'.join(segs + ['bias' if path[-1] == 'bias' else 'weight'])


def _torch_layout_state_dict(shapes, seed=0, prefix=''):
  """Random numpy state dict in PyTorch layout for a Flax shape tree, and the Flax arrays it must give."""
  rng = np.random.default_rng(seed)
  sd, want = {}, {}
  for path, s in traverse_util.flatten_dict(shapes).items():
    a = rng.standard_normal(s.shape).astype(np.float32)
    want[path] = a
    if path[-1] == 'kernel':
      a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    sd[prefix + _torch_key(path)] = np.ascontiguousarray(a)
  return sd, want


def _save(torch, sd, path):
  torch.save({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in sd.items()}, path)


def test_ddim_converts_without_torch_and_loads(tmp_path):
  torch = pytest.importorskip('torch')
  cfg = configs.get_config('ddim_tiny')
  sd, want = _torch_layout_state_dict(abstract_params(cfg))
  assert 'down.0.block.0.conv1.weight' in sd and 'mid.block_1.temb_proj.weight' in sd and 'temb.dense.1.bias' in sd
  ckpt = tmp_path / 'ddim.ckpt'
  _save(torch, sd, ckpt)
  params, _, report = convert_checkpoint(str(ckpt), cfg)
  flat = traverse_util.flatten_dict(params)
  assert set(flat) == set(want)
  for p, a in want.items():
    np.testing.assert_array_equal(flat[p], a, err_msg='/'.join(p))
  assert sorted(report['used_keys']) == sorted(sd)
  # the same file through the CLI in a process where `import torch` fails
  out = tmp_path / 'converted'
  code = ("import sys, runpy; sys.modules['torch'] = None; "
          f"sys.argv = ['convert', '--checkpoint', {str(ckpt)!r}, '--model', 'ddim_tiny', '--out', {str(out)!r}]; "
          "runpy.run_module('tcaq_jax.models.convert', run_name='__main__')")
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 0, r.stderr[-3000:]
  model, loaded, config = load(str(out))
  assert config == cfg and type(model).__name__ == 'DDIMUNet'
  lflat = traverse_util.flatten_dict(loaded)
  assert set(lflat) == set(flat)
  for p in flat:
    assert lflat[p].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(lflat[p]), flat[p])
  rep = json.loads((out / REPORT_NAME).read_text())
  assert rep['n_tensors'] == len(sd) and rep['n_params'] == sum(a.size for a in want.values())


def test_errors_list_missing_unexpected_and_mismatched_keys(tmp_path):
  torch = pytest.importorskip('torch')
  cfg = configs.get_config('ddim_tiny')
  sd, _ = _torch_layout_state_dict(abstract_params(cfg))
  del sd['up.0.block.1.conv2.weight']
  sd['down.0.block.0.bogus.weight'] = np.zeros(3, np.float32)
  sd['conv_in.weight'] = np.zeros((32, 4, 3, 3), np.float32)
  ckpt = tmp_path / 'bad.ckpt'
  _save(torch, sd, ckpt)
  with pytest.raises(ConversionError) as e:
    convert_checkpoint(str(ckpt), cfg)
  msg = str(e.value)
  assert str(ckpt) in msg and '1 missing, 1 unexpected, 1 shape mismatches' in msg
  assert 'up_0/block_1/conv2/kernel (3, 3, 32, 32)' in msg
  assert 'down.0.block.0.bogus.weight (3,)' in msg
  assert 'conv_in.weight: found (32, 4, 3, 3), target conv_in/kernel expects (3, 3, 3, 32)' in msg


class ModelCheckpoint:  # stands in for pytorch_lightning's callback object inside real LDM checkpoints
  def __init__(self):
    self.best_model_path = 'somewhere.ckpt'


def _ldm_lightning_file(torch, tmp_path, cfg):
  from tests.models import torch_ref_ldm as ref
  torch.manual_seed(0)
  unet = ref.randomize_(ref.UNetModel(**cfg['unet']).eval(), seed=0)
  raw = {f'model.diffusion_model.{k}': v.clone() for k, v in unet.state_dict().items()}
  ema = {'model_ema.' + k[len('model.'):].replace('.', ''): v * 2 + 1 for k, v in raw.items()}
  shapes = abstract_params(cfg)
  fs, fs_want = _torch_layout_state_dict({'first_stage_model': shapes['first_stage_model']}, seed=1)
  cs, cs_want = _torch_layout_state_dict({'cond_stage_model': shapes['cond_stage_model']}, seed=2)
  assert 'first_stage_model.decoder.mid.block_1.conv1.weight' in fs and 'cond_stage_model.embedding.weight' in cs
  assert 'first_stage_model.quantize.embedding.weight' in fs
  sd = {**raw, **ema, **{k: torch.from_numpy(v) for k, v in {**fs, **cs}.items()}}
  skipped = {'model_ema.decay': torch.tensor(0.9999), 'model_ema.num_updates': torch.tensor(5),
             'betas': torch.linspace(0.1, 0.2, 10), 'alphas_cumprod': torch.linspace(0.9, 0.1, 10),
             'first_stage_model.encoder.conv_in.weight': torch.zeros(8, 3, 3, 3),
             'first_stage_model.quant_conv.weight': torch.zeros(3, 3, 1, 1),
             'first_stage_model.loss.logvar': torch.zeros(()), 'scale_factor': torch.tensor(0.25)}
  sd.update(skipped)
  mod = types.ModuleType('pytorch_lightning.callbacks.model_checkpoint')
  ModelCheckpoint.__module__ = mod.__name__
  mod.ModelCheckpoint = ModelCheckpoint
  fakes = {'pytorch_lightning': types.ModuleType('pytorch_lightning'),
           'pytorch_lightning.callbacks': types.ModuleType('pytorch_lightning.callbacks'), mod.__name__: mod}
  assert not set(fakes) & set(sys.modules)
  sys.modules.update(fakes)
  try:
    path = tmp_path / 'model.ckpt'
    torch.save({'state_dict': sd, 'global_step': 10, 'callbacks': {ModelCheckpoint: ModelCheckpoint()}}, path)
  finally:
    for name in fakes:
      del sys.modules[name]
  want_unet = ref.state_dict_to_flax({k: v * 2 + 1 for k, v in raw.items()}, shapes['diffusion_model'],
                                     'model.diffusion_model.')
  want_raw = ref.state_dict_to_flax(raw, shapes['diffusion_model'], 'model.diffusion_model.')
  return path, skipped, want_unet, want_raw, {**fs_want, **cs_want}


def test_ldm_lightning_checkpoint(tmp_path):
  torch = pytest.importorskip('torch')
  cfg = configs.get_config('ldm_tiny_cin')
  path, skipped, want_unet, want_raw, want_rest = _ldm_lightning_file(torch, tmp_path, cfg)
  with pytest.raises(torch_pickle.UnsafeGlobalError, match='pytorch_lightning.callbacks.model_checkpoint'):
    convert_checkpoint(str(path), cfg)
  params, new_cfg, report = convert_checkpoint(str(path), cfg, stub_unknown=True)
  assert new_cfg['scale_factor'] == 0.25
  flat = traverse_util.flatten_dict(params)
  for p, a in traverse_util.flatten_dict(want_unet).items():
    np.testing.assert_allclose(flat[('diffusion_model',) + p], a, rtol=1e-6, err_msg='/'.join(p))
  for p, a in want_rest.items():
    np.testing.assert_array_equal(flat[p], a, err_msg='/'.join(p))
  assert set(flat) == {('diffusion_model',) + p for p in traverse_util.flatten_dict(want_unet)} | set(want_rest)
  for k in skipped:
    assert k in report['skipped'], k
  assert report['ema_used'] == len(traverse_util.flatten_dict(want_unet)) and not report.get('unmatched_ema')
  write_model_dir(str(tmp_path / 'out'), params, new_cfg, report)
  _, loaded, lcfg = load(str(tmp_path / 'out'))
  assert lcfg['scale_factor'] == 0.25 and lcfg['name'] == 'ldm_tiny_cin'
  # --noema keeps the raw weights
  params, _, report = convert_checkpoint(str(path), cfg, use_ema=False, stub_unknown=True)
  flat = traverse_util.flatten_dict(params)
  for p, a in traverse_util.flatten_dict(want_raw).items():
    np.testing.assert_array_equal(flat[('diffusion_model',) + p], a, err_msg='/'.join(p))
  assert report['ema_used'] == 0


_DDIM_CIFAR10_YML = """
data:
    dataset: "CIFAR10"
    image_size: 32
    channels: 3
    logit_transform: false
    uniform_dequantization: false
    gaussian_dequantization: false
    random_flip: true
    rescaled: true
    num_workers: 4
model:
    type: "simple"
    in_channels: 3
    out_ch: 3
    ch: 128
    ch_mult: [1, 2, 2, 2]
    num_res_blocks: 2
    attn_resolutions: [16, ]
    dropout: 0.1
    var_type: fixedlarge
    ema_rate: 0.9999
    ema: True
    resamp_with_conv: True
diffusion:
    beta_schedule: linear
    beta_start: 0.0001
    beta_end: 0.02
    num_diffusion_timesteps: 1000
"""


def test_ddim_yaml_config(tmp_path):
  f = tmp_path / 'cifar10.yml'
  f.write_text(_DDIM_CIFAR10_YML)
  cfg = config_from_yaml(str(f), name='ddim_cifar10')
  assert cfg == configs.get_config('ddim_cifar10')
  bad = tmp_path / 'bad.yml'
  bad.write_text('foo: 1\n')
  with pytest.raises(ConversionError, match='bad.yml'):
    config_from_yaml(str(bad))


def test_load_rejects_params_of_another_model(tmp_path):
  cfg = configs.get_config('ddim_tiny')
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract_params(cfg))
  checkpoint.save_model_dir(str(tmp_path / 'm'), params, dict(cfg, attn_resolutions=[]))
  with pytest.raises(checkpoint.CheckpointError, match='unexpected up_1/attn_0'):
    load(str(tmp_path / 'm'))


# ------------------------------------------------------------------ reliability (issue 13): hostile / bad inputs

def _ddim_tiny_sd(seed=0):
  cfg = configs.get_config('ddim_tiny')
  sd, want = _torch_layout_state_dict(abstract_params(cfg), seed=seed)
  return cfg, sd, want


def test_poisoned_file_then_good_file_convert_in_one_process(tmp_path):
  """A refused file must leave nothing behind: the next conversion in the process gives exact values."""
  from tests.models.test_torch_pickle import poison_body, write_state_dict_zip, write_torch_zip
  cfg, sd, want = _ddim_tiny_sd()
  bad = write_torch_zip(tmp_path / 'poison.ckpt', poison_body())
  with pytest.raises(torch_pickle.UnsafeBuildError, match='poison.ckpt: refused BUILD'):
    convert_checkpoint(bad, cfg)
  params, _, _ = convert_checkpoint(write_state_dict_zip(tmp_path / 'good.ckpt', sd), cfg)
  flat = traverse_util.flatten_dict(params)
  np.testing.assert_array_equal(flat[('conv_in', 'kernel')], want[('conv_in', 'kernel')])
  assert float(np.abs(flat[('conv_in', 'kernel')]).max()) < 10
  assert all(np.array_equal(flat[p], a) for p, a in want.items())


def test_nonfinite_weights_are_refused_naming_the_key(tmp_path):
  cfg, sd, want = _ddim_tiny_sd()
  sd['conv_in.weight'][0, 0, 0, :2] = [np.nan, np.inf]
  sd['temb.dense.1.bias'][3] = -np.inf
  ckpt = tmp_path / 'nan.npz'
  np.savez(ckpt, **sd)
  with pytest.raises(ConversionError) as e:
    convert_checkpoint(str(ckpt), cfg)
  msg = str(e.value)
  assert 'nan.npz: refusing to convert, 2 weights hold NaN / Inf' in msg
  assert 'conv_in.weight: 1 NaN, 1 Inf of 864 values' in msg and 'temb.dense.1.bias: 0 NaN, 1 Inf of' in msg
  # a model dir holding a NaN (written by anything else) is refused by models.load, naming the leaf
  params = traverse_util.unflatten_dict({p: a.copy() for p, a in want.items()})
  params['conv_out']['bias'][1] = np.nan
  checkpoint.save_model_dir(str(tmp_path / 'm'), params, cfg)
  with pytest.raises(checkpoint.CheckpointError, match=r'conv_out/bias: 1 non-finite values \(NaN / Inf\)'):
    load(str(tmp_path / 'm'))


def _run_cli(module, *args):
  r = subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
  errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
  return r.returncode, errors, r.stderr


def test_convert_cli_bogus_safetensors_is_one_line(tmp_path):
  bogus = tmp_path / 'bogus.safetensors'
  bogus.write_bytes(b'\x02\x00\x00\x00\x00\x00\x00\x00[]')
  rc, errors, stderr = _run_cli('tcaq_jax.models.convert', '--checkpoint', str(bogus), '--model', 'ddim_tiny',
                                '--out', str(tmp_path / 'out'))
  assert rc == 2 and 'Traceback' not in stderr, stderr[-2000:]
  assert errors == [f'error: {bogus}: invalid safetensors header: it is a JSON list, not an object of tensors']


def _half_written_out(tmp_path):
  """A ddim_tiny checkpoint and an --out dir whose writer died after the orbax step, before config.json."""
  cfg, sd, want = _ddim_tiny_sd()
  ckpt = tmp_path / 'ddim.npz'
  np.savez(ckpt, **sd)
  out = tmp_path / 'out'
  checkpoint.save(str(out), 0, {'w': np.zeros(2, np.float32)})
  return str(ckpt), str(out), want


def test_convert_cli_half_written_out_names_overwrite(tmp_path):
  ckpt, out, _ = _half_written_out(tmp_path)
  rc, errors, stderr = _run_cli('tcaq_jax.models.convert', '--checkpoint', ckpt, '--model', 'ddim_tiny', '--out', out)
  assert rc == 2 and len(errors) == 1 and 'Traceback' not in stderr, stderr[-2000:]
  assert errors[0].startswith(f'error: --out: {out!r} ') and '--overwrite' in errors[0]


def test_convert_cli_overwrite_replaces_half_written_out(tmp_path):
  ckpt, out, want = _half_written_out(tmp_path)
  rc, errors, stderr = _run_cli('tcaq_jax.models.convert', '--checkpoint', ckpt, '--model', 'ddim_tiny', '--out', out,
                                '--overwrite')
  assert rc == 0 and not errors, stderr[-2000:]
  _, loaded, _ = load(out)
  np.testing.assert_array_equal(np.asarray(loaded['conv_in']['kernel']), want[('conv_in', 'kernel')])


def test_inception_cli_is_one_line(tmp_path):
  bad = tmp_path / 'pt_inception.pth'
  bad.write_bytes(b'this is not a checkpoint')
  rc, errors, stderr = _run_cli('tcaq_jax.eval.inception', '--weights', str(bad), '--out', str(tmp_path / 'o'))
  assert rc == 2 and 'Traceback' not in stderr, stderr[-2000:]
  assert len(errors) == 1 and errors[0].startswith(f"error: cannot read --weights '{bad}': {bad}: cannot read")
