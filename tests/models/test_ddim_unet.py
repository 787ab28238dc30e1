"""DDIM UNet: parity with diffusers' UNet2DModel (ddpm-cifar10 layout) through a torch.save + convert round
trip, parameter count, attribute contracts (concat_split, QuantPoints, block-alone apply), dropout."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.models import configs
from tcaq_jax.models.convert import abstract_params, convert_checkpoint


def diffusers_unet(cfg):
  """diffusers UNet2DModel with the google/ddpm-cifar10-32 settings, sized by a DDIM config."""
  diffusers = pytest.importorskip('diffusers')
  n = len(cfg['ch_mult'])
  res = [cfg['resolution'] // 2 ** l for l in range(n)]
  attn = [r in cfg['attn_resolutions'] for r in res]
  down = tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in attn)
  up = tuple('AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn))
  return diffusers.UNet2DModel(
      sample_size=cfg['resolution'], in_channels=cfg['in_channels'], out_channels=cfg['out_ch'],
      block_out_channels=tuple(cfg['ch'] * m for m in cfg['ch_mult']), layers_per_block=cfg['num_res_blocks'],
      down_block_types=down, up_block_types=up, norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None,
      downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, add_attention=True, act_fn='silu',
      resnet_time_scale_shift='default', time_embedding_type='positional', center_input_sample=False)


_RESNET = {'time_emb_proj': 'temb_proj', 'conv_shortcut': 'nin_shortcut'}
_ATTN = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}


def diffusers_to_ddim(sd, n_levels):
  """diffusers UNet2DModel state dict -> DDIM (ermongroup) key names and layouts (torch tensors)."""
  out = {}
  for k, v in sd.items():
    name, leaf = k.rsplit('.', 1)
    new, attn = None, False
    if name.startswith('time_embedding.linear_'):
      new = f'temb.dense.{int(name[-1]) - 1}'
    elif name in ('conv_in', 'conv_out'):
      new = name
    elif name == 'conv_norm_out':
      new = 'norm_out'
    elif m := re.fullmatch(r'(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)', name):
      side, lvl, kind, i, sub = m.groups()
      lvl = int(lvl) if side == 'down' else n_levels - 1 - int(lvl)
      attn = kind == 'attentions'
      sub = (_ATTN if attn else _RESNET).get(sub, sub)
      new = f'{side}.{lvl}.{"attn" if attn else "block"}.{i}.{sub}'
    elif m := re.fullmatch(r'down_blocks\.(\d+)\.downsamplers\.0\.conv', name):
      new = f'down.{m.group(1)}.downsample.conv'
    elif m := re.fullmatch(r'up_blocks\.(\d+)\.upsamplers\.0\.conv', name):
      new = f'up.{n_levels - 1 - int(m.group(1))}.upsample.conv'
    elif m := re.fullmatch(r'mid_block\.(resnets|attentions)\.(\d)\.(.+)', name):
      kind, i, sub = m.groups()
      attn = kind == 'attentions'
      new = f'mid.attn_1.{_ATTN.get(sub, sub)}' if attn else f'mid.block_{int(i) + 1}.{_RESNET.get(sub, sub)}'
    if new is None:
      raise KeyError(f'unmapped diffusers key {k}')
    if attn and leaf == 'weight' and v.ndim == 2:
      v = v[:, :, None, None]  # diffusers Linear -> DDIM 1x1 Conv2d
    out[f'{new}.{leaf}'] = v.clone()
  return out


def _randomize_norms(model, torch):
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.2 * torch.randn(p.shape, generator=g))


def _chain(m, x, t):
  """The DDIM forward rebuilt from the setup()-style blocks (as block reconstruction calls them)."""
  e = m.embed_time(t)
  hs = [m.conv_in(x)]
  for lvl in m.down:
    for i, blk in enumerate(lvl.block):
      h = blk(hs[-1], e)
      hs.append(lvl.attn[i](h) if lvl.attn else h)
    if lvl.downsample is not None:
      hs.append(lvl.downsample(hs[-1]))
  h = m.mid.block_2(m.mid.attn_1(m.mid.block_1(hs[-1], e)), e)
  for lvl in reversed(m.up):
    for i, blk in enumerate(lvl.block):
      h = blk(jnp.concatenate([h, hs.pop()], -1), e)
      h = lvl.attn[i](h) if lvl.attn else h
    h = lvl.upsample(h) if lvl.upsample is not None else h
  return m.conv_out(jax.nn.silu(m.norm_out(h)))


def _parity(cfg, tmp_path, batch, timesteps, check_chain=False):
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  ref = diffusers_unet(cfg).eval()
  _randomize_norms(ref, torch)
  sd = diffusers_to_ddim(ref.state_dict(), len(cfg['ch_mult']))
  assert len(sd) == len(ref.state_dict())
  path = tmp_path / 'ddim.ckpt'
  torch.save(sd, path)
  params, _, report = convert_checkpoint(str(path), cfg)
  assert report['n_tensors'] == len(sd)
  model = configs.build_model(cfg)
  apply = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))
  chained = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, method=_chain)) if check_chain else None
  r = cfg['resolution']
  rng = np.random.default_rng(0)
  for ts in timesteps:
    x = rng.standard_normal((batch, cfg['in_channels'], r, r)).astype(np.float32)
    t = np.asarray(ts, np.int64)
    with torch.no_grad():
      want = ref(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32)))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-4, (ts, rel)
    if chained is not None:  # the blocks alone, chained by hand, give the same function
      got = np.asarray(chained(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32)))
      assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_parity_tiny_vs_diffusers(tmp_path):
  _parity(configs.get_config('ddim_tiny'), tmp_path, batch=2, timesteps=[[0, 999], [17, 500], [250, 1]],
          check_chain=True)


@pytest.mark.slow
def test_parity_full_cifar10_vs_diffusers(tmp_path):
  _parity(configs.get_config('ddim_cifar10'), tmp_path, batch=2, timesteps=[[3, 777]])


@pytest.mark.slow
def test_full_param_count():
  shapes = abstract_params(configs.get_config('ddim_cifar10'))
  leaves = jax.tree.leaves(shapes)
  assert sum(int(np.prod(s.shape)) for s in leaves) == 35_746_307
  assert len(leaves) == 328
  assert shapes['down_0']['block_1']['conv1']['kernel'].shape == (3, 3, 128, 128)
  assert shapes['up_1']['attn_2']['proj_out']['kernel'].shape == (1, 1, 256, 256)
  assert shapes['temb']['dense_1']['kernel'].shape == (512, 512)


def _np_params(shapes, seed=0):
  """Random params with the model's structure, without paying for a jitted init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32), shapes)


def test_contracts_concat_split_quantpoints_and_block_alone():
  cfg = configs.get_config('ddim_tiny')
  model = configs.build_model(cfg)
  v = {'params': _np_params(abstract_params(cfg, model))}
  bound = model.bind(v)
  # up.1 (deepest level): h has 64 channels, skips 64 then 32 (after the level-0 downsample)
  assert [b.concat_split for b in bound.up[1].block] == [64, 64]
  assert [b.in_ch for b in bound.up[1].block] == [128, 96]
  assert [b.concat_split for b in bound.up[0].block] == [64, 32]
  assert bound.down[0].block[0].concat_split is None
  assert bound.down[0].downsample is not None and bound.down[1].downsample is None
  assert bound.up[0].upsample is None and bound.up[1].upsample is not None
  attn = bound.up[1].attn[0]
  assert (attn.qk_q.kind, attn.qk_k.kind, attn.av_v.kind, attn.attn_probs.kind) == (
      'matmul', 'matmul', 'matmul', 'softmax')
  # one block alone, through the public apply(method=...) route
  h = jnp.ones((2, 8, 8, 128), jnp.float32)
  temb = jnp.ones((2, 128), jnp.float32)
  y = jax.jit(lambda v, h, e: model.apply(v, h, e, method=lambda m, h, e: m.up[1].block[0](h, e)))(v, h, temb)
  assert y.shape == (2, 8, 8, 64)
  # reference: the same block written out in NumPy float64
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v['params']['up_1']['block_0'])
  hn = np.asarray(h, np.float64)

  def gn(a, q):
    b, hh, ww, c = a.shape
    g = a.reshape(b, hh, ww, 32, c // 32)
    g = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-6)
    return g.reshape(a.shape) * q['scale'] + q['bias']

  def conv(a, q):
    k = q['kernel']
    ap = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0))) if k.shape[0] == 3 else a
    out = sum(np.einsum('bhwi,io->bhwo', ap[:, i:i + a.shape[1], j:j + a.shape[2]], k[i, j])
              for i in range(k.shape[0]) for j in range(k.shape[1]))
    return out + q['bias']

  sw = lambda a: a / (1 + np.exp(-a))  # noqa: E731
  r = conv(sw(gn(hn, p['norm1'])), p['conv1'])
  r = r + (sw(np.asarray(temb, np.float64)) @ p['temb_proj']['kernel'] + p['temb_proj']['bias'])[:, None, None]
  r = conv(sw(gn(r, p['norm2'])), p['conv2'])
  want = conv(hn, p['nin_shortcut']) + r
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_dropout_only_in_train():
  from tcaq_jax.models.layers import ResnetBlock
  blk = ResnetBlock(32, 32, dropout=0.5)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 32)), jnp.float32)
  e = jnp.ones((1, 8), jnp.float32)
  v = _np_params(jax.eval_shape(blk.init, jax.random.key(0), x, e))
  run = jax.jit(lambda v, x, e, k: (blk.apply(v, x, e), blk.apply(v, x, e, train=False),
                                    blk.apply(v, x, e, train=True, rngs={'dropout': k})))
  a, b, c = run(v, x, e, jax.random.key(1))
  _, _, d = run(v, x, e, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(c - d).max()) > 1e-4 and float(jnp.abs(a - c).max()) > 1e-4
