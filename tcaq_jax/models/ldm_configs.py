"""Latent-diffusion named configs (plain JSON dicts) and `config_from_yaml` for the original YAML files.

An LDM config holds:
  family 'ldm', name;
  unet: openaimodel UNetModel arguments (model_channels, channel_mult, attention_resolutions as downsampling
    factors ds, num_heads / num_head_channels, use_scale_shift_norm, resblock_updown, use_spatial_transformer,
    transformer_depth, context_dim, ...);
  first_stage: {'type': 'vq' | 'kl', 'embed_dim', 'n_embed' (vq), 'ddconfig': taming Decoder arguments};
  cond_stage: None or {'type': 'class', 'n_classes', 'embed_dim'} (class embedder -> context [B, 1, embed_dim]);
  unconditional_label: the class id of the null label (cin: 1000) when class-conditional;
  scale_factor: latents are divided by it before decoding (1.0 for VQ);
  diffusion: {'beta_schedule': 'ldm_linear' = linspace(sqrt(beta_start), sqrt(beta_end), T)^2, ...};
  latent_shape: [H, W, C] (NHWC without batch).
"""
from __future__ import annotations

import copy


def _ldm_schedule(beta_end: float = 0.0195, beta_start: float = 0.0015, num_timesteps: int = 1000) -> dict:
  return {'beta_schedule': 'ldm_linear', 'beta_start': beta_start, 'beta_end': beta_end,
          'num_timesteps': num_timesteps}


_VQ_F4 = {
    'type': 'vq', 'embed_dim': 3, 'n_embed': 8192,
    'ddconfig': {'double_z': False, 'z_channels': 3, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                 'ch': 128, 'ch_mult': [1, 2, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0},
}
_KL_F8 = {
    'type': 'kl', 'embed_dim': 4,
    'ddconfig': {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                 'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [],
                 'dropout': 0.0},
}

LDM_CONFIGS: dict = {
    # LSUN-Bedrooms LDM-4 (VQ-f4): UNet 274,056,163 parameters.
    'ldm_lsun_bedrooms': {
        'family': 'ldm', 'name': 'ldm_lsun_bedrooms',
        'unet': {'image_size': 64, 'in_channels': 3, 'out_channels': 3, 'model_channels': 224,
                 'attention_resolutions': [8, 4, 2], 'num_res_blocks': 2, 'channel_mult': [1, 2, 3, 4],
                 'num_head_channels': 32},
        'first_stage': copy.deepcopy(_VQ_F4), 'cond_stage': None, 'scale_factor': 1.0,
        'diffusion': _ldm_schedule(0.0195), 'latent_shape': [64, 64, 3],
    },
    # LSUN-Churches LDM-8 (KL-f8): UNet 294,966,916 parameters.
    'ldm_lsun_churches': {
        'family': 'ldm', 'name': 'ldm_lsun_churches',
        'unet': {'image_size': 32, 'in_channels': 4, 'out_channels': 4, 'model_channels': 192,
                 'attention_resolutions': [1, 2, 4, 8], 'num_res_blocks': 2, 'channel_mult': [1, 2, 2, 4, 4],
                 'num_heads': 8, 'use_scale_shift_norm': True, 'resblock_updown': True},
        'first_stage': copy.deepcopy(_KL_F8), 'cond_stage': None, 'scale_factor': 0.22765929,
        'diffusion': _ldm_schedule(0.0155), 'latent_shape': [32, 32, 4],
    },
    # ImageNet 256 class-conditional LDM-4 (cin256-v2, VQ-f4): UNet 400,920,579 parameters.
    'ldm_cin256_v2': {
        'family': 'ldm', 'name': 'ldm_cin256_v2',
        'unet': {'image_size': 64, 'in_channels': 3, 'out_channels': 3, 'model_channels': 192,
                 'attention_resolutions': [8, 4, 2], 'num_res_blocks': 2, 'channel_mult': [1, 2, 3, 5],
                 'num_heads': 1, 'use_spatial_transformer': True, 'transformer_depth': 1, 'context_dim': 512},
        'first_stage': copy.deepcopy(_VQ_F4),
        'cond_stage': {'type': 'class', 'n_classes': 1001, 'embed_dim': 512}, 'unconditional_label': 1000,
        'scale_factor': 1.0, 'diffusion': _ldm_schedule(0.0195), 'latent_shape': [64, 64, 3],
    },
    # Tiny variants for tests. VQ + legacy multi-head attention (num_head_channels), decoder attention.
    'ldm_tiny_vq': {
        'family': 'ldm', 'name': 'ldm_tiny_vq',
        'unet': {'image_size': 8, 'in_channels': 3, 'out_channels': 3, 'model_channels': 32,
                 'attention_resolutions': [2], 'num_res_blocks': 1, 'channel_mult': [1, 2],
                 'num_head_channels': 16},
        'first_stage': {'type': 'vq', 'embed_dim': 3, 'n_embed': 64,
                        'ddconfig': {'double_z': False, 'z_channels': 3, 'resolution': 16, 'in_channels': 3,
                                     'out_ch': 3, 'ch': 32, 'ch_mult': [1, 2], 'num_res_blocks': 1,
                                     'attn_resolutions': [8], 'dropout': 0.0}},
        'cond_stage': None, 'scale_factor': 1.0, 'diffusion': _ldm_schedule(0.0195), 'latent_shape': [8, 8, 3],
    },
    # KL + scale-shift norm + ResBlock up/down + legacy attention with num_heads.
    'ldm_tiny_kl': {
        'family': 'ldm', 'name': 'ldm_tiny_kl',
        'unet': {'image_size': 8, 'in_channels': 4, 'out_channels': 4, 'model_channels': 32,
                 'attention_resolutions': [1, 4], 'num_res_blocks': 1, 'channel_mult': [1, 2, 2],
                 'num_heads': 2, 'use_scale_shift_norm': True, 'resblock_updown': True},
        'first_stage': {'type': 'kl', 'embed_dim': 4,
                        'ddconfig': {'double_z': True, 'z_channels': 4, 'resolution': 32, 'in_channels': 3,
                                     'out_ch': 3, 'ch': 32, 'ch_mult': [1, 2, 2], 'num_res_blocks': 1,
                                     'attn_resolutions': [], 'dropout': 0.0}},
        'cond_stage': None, 'scale_factor': 0.5, 'diffusion': _ldm_schedule(0.0155), 'latent_shape': [8, 8, 4],
    },
    # Class-conditional: SpatialTransformer (2 heads) with cross-attention to the class embedding.
    'ldm_tiny_cin': {
        'family': 'ldm', 'name': 'ldm_tiny_cin',
        'unet': {'image_size': 8, 'in_channels': 3, 'out_channels': 3, 'model_channels': 32,
                 'attention_resolutions': [2], 'num_res_blocks': 1, 'channel_mult': [1, 2],
                 'num_heads': 2, 'use_spatial_transformer': True, 'transformer_depth': 1, 'context_dim': 64},
        'first_stage': {'type': 'vq', 'embed_dim': 3, 'n_embed': 64,
                        'ddconfig': {'double_z': False, 'z_channels': 3, 'resolution': 16, 'in_channels': 3,
                                     'out_ch': 3, 'ch': 32, 'ch_mult': [1, 2], 'num_res_blocks': 1,
                                     'attn_resolutions': [], 'dropout': 0.0}},
        'cond_stage': {'type': 'class', 'n_classes': 1001, 'embed_dim': 64}, 'unconditional_label': 1000,
        'scale_factor': 1.0, 'diffusion': _ldm_schedule(0.0195), 'latent_shape': [8, 8, 3],
    },
}


class YamlConfigError(ValueError):
  """A latent-diffusion YAML lacks a key or uses a component this port does not implement."""


_UNET_KEYS = ('image_size', 'in_channels', 'out_channels', 'model_channels', 'attention_resolutions',
              'num_res_blocks', 'channel_mult', 'dropout', 'conv_resample', 'num_heads', 'num_head_channels',
              'num_heads_upsample', 'use_scale_shift_norm', 'resblock_updown', 'use_spatial_transformer',
              'transformer_depth', 'context_dim', 'legacy', 'num_classes', 'use_new_attention_order')
_DD_KEYS = ('double_z', 'z_channels', 'resolution', 'in_channels', 'out_ch', 'ch', 'ch_mult', 'num_res_blocks',
            'attn_resolutions', 'dropout')


def _get(d: dict, path: str):
  node = d
  for part in path.split('.'):
    if not isinstance(node, dict) or part not in node:
      raise YamlConfigError(f'latent-diffusion YAML lacks {path!r}')
    node = node[part]
  return node


def config_from_yaml(yaml_dict: dict, name: str | None = None) -> dict:
  """An LDM config from a parsed latent-diffusion YAML (`model.params.{unet_config, first_stage_config,
  cond_stage_config, linear_start, linear_end, timesteps, scale_factor, image_size, channels}`)."""
  mp = _get(yaml_dict, 'model.params')
  unet_in = _get(mp, 'unet_config.params')
  unet = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in unet_in.items() if k in _UNET_KEYS}
  unknown_true = [k for k in ('use_fp16', 'n_embed') if unet_in.get(k)]
  if unknown_true or unet_in.get('dims', 2) != 2:
    raise YamlConfigError(f'latent-diffusion YAML unet_config uses unsupported {unknown_true or ["dims"]}')

  fs = _get(mp, 'first_stage_config')
  target = fs.get('target', '')
  fsp = _get(fs, 'params')
  dd = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in _get(fsp, 'ddconfig').items()
        if k in _DD_KEYS}
  if target.endswith(('VQModelInterface', 'VQModel')):
    first = {'type': 'vq', 'embed_dim': _get(fsp, 'embed_dim'), 'n_embed': _get(fsp, 'n_embed'), 'ddconfig': dd}
  elif target.endswith('AutoencoderKL'):
    first = {'type': 'kl', 'embed_dim': _get(fsp, 'embed_dim'), 'ddconfig': dd}
  else:
    raise YamlConfigError(f'latent-diffusion YAML first_stage_config target {target!r} is not VQ or KL')

  cs = mp.get('cond_stage_config')
  cond, uncond = None, None
  if isinstance(cs, dict) and cs.get('target', '').endswith('ClassEmbedder'):
    csp = cs.get('params', {})
    cond = {'type': 'class', 'n_classes': csp.get('n_classes', 1000), 'embed_dim': csp.get('embed_dim', 512)}
    uncond = cond['n_classes'] - 1
  elif cs not in (None, '__is_unconditional__'):
    raise YamlConfigError(f'latent-diffusion YAML cond_stage_config {cs!r} is not supported')

  size = mp.get('image_size', unet.get('image_size'))
  chans = mp.get('channels', unet.get('in_channels'))
  config = {
      'family': 'ldm', 'name': name or 'ldm_from_yaml', 'unet': unet, 'first_stage': first, 'cond_stage': cond,
      'scale_factor': float(mp.get('scale_factor', 1.0)),
      'diffusion': _ldm_schedule(float(mp.get('linear_end', 2e-2)), float(mp.get('linear_start', 1e-4)),
                                 int(mp.get('timesteps', 1000))),
      'latent_shape': [size, size, chans],
  }
  if mp.get('beta_schedule', 'linear') != 'linear':
    raise YamlConfigError(f'latent-diffusion YAML beta_schedule {mp["beta_schedule"]!r} is not supported')
  if uncond is not None:
    config['unconditional_label'] = uncond
  return config
