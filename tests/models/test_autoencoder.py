"""First-stage decoders vs diffusers' VQModel / AutoencoderKL (random weights), through LatentDiffusion.decode.

diffusers' decoder keys are renamed to the taming/ldm checkpoint names (`first_stage_model.decoder.up.{l}...`)
and mapped onto the Flax params by the project's naming rule, as the converter does for real checkpoints.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.models.configs import build_model, get_config

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from tests.models import torch_ref_ldm as ref  # noqa: E402


def _diffusers_model(first_stage: dict):
  dd = first_stage['ddconfig']
  n = len(dd['ch_mult'])
  res_deepest = dd['resolution'] // 2 ** (n - 1)
  # diffusers lists up blocks deepest first; taming level l = n - 1 - i has resolution res_deepest * 2^i.
  up = tuple('AttnUpDecoderBlock2D' if res_deepest * 2 ** i in dd['attn_resolutions'] else 'UpDecoderBlock2D'
             for i in range(n))
  common = dict(in_channels=dd['in_channels'], out_channels=dd['out_ch'], down_block_types=('DownEncoderBlock2D',) * n,
                up_block_types=up, block_out_channels=tuple(dd['ch'] * m for m in dd['ch_mult']),
                layers_per_block=dd['num_res_blocks'], latent_channels=dd['z_channels'], norm_num_groups=32)
  if first_stage['type'] == 'vq':
    m = diffusers.VQModel(num_vq_embeddings=first_stage['n_embed'], vq_embed_dim=first_stage['embed_dim'], **common)
  else:
    m = diffusers.AutoencoderKL(**common)
  return ref.randomize_(m.eval(), seed=5)


def _to_taming_keys(sd: dict, n_levels: int) -> dict:
  """diffusers VQModel / AutoencoderKL decoder state dict -> ldm checkpoint keys under `first_stage_model.`."""
  out = {}
  attn_names = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}
  for key, v in sd.items():
    if key.startswith(('encoder.', 'quant_conv.')):
      continue
    k = key
    k = k.replace('decoder.mid_block.resnets.0.', 'decoder.mid.block_1.')
    k = k.replace('decoder.mid_block.resnets.1.', 'decoder.mid.block_2.')
    k = k.replace('decoder.mid_block.attentions.0.', 'decoder.mid.attn_1.')
    k = k.replace('decoder.conv_norm_out.', 'decoder.norm_out.').replace('.conv_shortcut.', '.nin_shortcut.')
    m = re.match(r'decoder\.up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)', k)
    if m:
      level = n_levels - 1 - int(m.group(1))
      if m.group(2) == 'resnets':
        k = f'decoder.up.{level}.block.{m.group(3)}.{m.group(4)}'
      elif m.group(2) == 'attentions':
        k = f'decoder.up.{level}.attn.{m.group(3)}.{m.group(4)}'
      else:
        k = f'decoder.up.{level}.upsample.{m.group(4)}'
    for d_name, t_name in attn_names.items():
      if f'.{d_name}.' in k and ('.attn' in k):
        k = k.replace(f'.{d_name}.', f'.{t_name}.')
        if v.ndim == 2:
          v = v[:, :, None, None]  # Linear -> 1x1 conv, as stored in the ldm checkpoints
    out[f'first_stage_model.{k}'] = v
  return out


def _decode_pair(name: str, latent_hw: int, batch: int = 2, seed: int = 0):
  config = get_config(name)
  fs = config['first_stage']
  dm = _diffusers_model(fs)
  sd = _to_taming_keys(dm.state_dict(), len(fs['ddconfig']['ch_mult']))
  model = build_model(config)
  z = np.random.default_rng(seed).standard_normal((batch, latent_hw, latent_hw, fs['embed_dim'])).astype(np.float32)
  shapes = jax.eval_shape(lambda k, a: model.init(k, a, method='decode'), jax.random.PRNGKey(0), jnp.asarray(z))['params']
  assert set(shapes) == {'first_stage_model'}
  params = {'first_stage_model': ref.state_dict_to_flax(sd, shapes['first_stage_model'], 'first_stage_model.')}
  assert len(sd) == len(jax.tree.leaves(params))
  got = model.apply({'params': params}, jnp.asarray(z), method='decode')
  with torch.no_grad():
    zt = torch.from_numpy(z).permute(0, 3, 1, 2) / config['scale_factor']
    want = dm.decode(zt).sample.permute(0, 2, 3, 1).numpy()
  return np.asarray(got), want


def _rel_err(a, b):
  return float(np.max(np.abs(np.float64(a) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize('name', ['ldm_tiny_vq', 'ldm_tiny_kl'])
def test_tiny_decoder_matches_diffusers(name):
  got, want = _decode_pair(name, latent_hw=8)
  scale = 2 ** (len(get_config(name)['first_stage']['ddconfig']['ch_mult']) - 1)
  assert got.shape == want.shape == (2, 8 * scale, 8 * scale, 3)
  assert _rel_err(got, want) <= 1e-4


def test_vq_quantizer_snaps_to_nearest_codebook_entry():
  """The VQ snap used by decode == a float64 NumPy nearest-neighbour search over the codebook."""
  from tcaq_jax.models.autoencoder import VectorQuantizer
  quantizer = VectorQuantizer(64, 3)
  z = np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32)
  params = quantizer.init(jax.random.PRNGKey(0), jnp.asarray(z))
  book = np.asarray(params['params']['embedding']['embedding'], np.float64)
  idx = np.argmin(((z.reshape(-1, 1, 3).astype(np.float64) - book[None]) ** 2).sum(-1), axis=1)
  got = quantizer.apply(params, jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(got), book[idx].reshape(z.shape).astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ldm_lsun_bedrooms', 'ldm_lsun_churches'])
def test_full_decoder_matches_diffusers(name):
  """Full-size VQ-f4 (bedrooms, cin256-v2) and KL-f8 (churches) decoders on a 16x16 latent, batch 1."""
  got, want = _decode_pair(name, latent_hw=16, batch=1)
  assert _rel_err(got, want) <= 1e-4
