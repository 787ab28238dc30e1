"""Named model configs (configs as data: plain JSON-serialisable dicts).

Every config has `family` ('ddim' or 'ldm') and `name`. `build_model(config)` returns the Flax module.
The `diffusion` sub-dict holds the noise schedule the checkpoint was trained with.
LDM-family entries live in `ldm_configs.py` and are merged here.
"""
from __future__ import annotations

import copy

from tcaq_jax.models.ldm_configs import LDM_CONFIGS

_LINEAR_1000 = {'beta_schedule': 'linear', 'beta_start': 1e-4, 'beta_end': 0.02, 'num_timesteps': 1000}

DDIM_CONFIGS = {
    # The DDIM repository's CIFAR-10 model (model-790000.ckpt): 35,746,307 parameters.
    'ddim_cifar10': {
        'family': 'ddim', 'name': 'ddim_cifar10',
        'in_channels': 3, 'out_ch': 3, 'resolution': 32, 'ch': 128, 'ch_mult': [1, 2, 2, 2],
        'num_res_blocks': 2, 'attn_resolutions': [16], 'dropout': 0.1, 'resamp_with_conv': True,
        'diffusion': dict(_LINEAR_1000),
    },
    # Same family, small enough for unit tests.
    'ddim_tiny': {
        'family': 'ddim', 'name': 'ddim_tiny',
        'in_channels': 3, 'out_ch': 3, 'resolution': 16, 'ch': 32, 'ch_mult': [1, 2],
        'num_res_blocks': 1, 'attn_resolutions': [8], 'dropout': 0.0, 'resamp_with_conv': True,
        'diffusion': dict(_LINEAR_1000),
    },
    # The shipped demo model (tcaq_jax/assets/demo_unet): scikit-learn's 8x8 digits upsampled to 16x16, 1 channel.
    'ddim_digits': {
        'family': 'ddim', 'name': 'ddim_digits',
        'in_channels': 1, 'out_ch': 1, 'resolution': 16, 'ch': 32, 'ch_mult': [1, 2, 2],
        'num_res_blocks': 1, 'attn_resolutions': [8], 'dropout': 0.0, 'resamp_with_conv': True,
        'diffusion': dict(_LINEAR_1000),
    },
}

CONFIGS = {**DDIM_CONFIGS, **LDM_CONFIGS}


def get_config(name: str) -> dict:
  """A deep copy of the named config; raises KeyError listing the known names."""
  if name not in CONFIGS:
    raise KeyError(f'unknown model config {name!r}; known: {sorted(CONFIGS)}')
  return copy.deepcopy(CONFIGS[name])


def build_model(config: dict):
  """The Flax module for a config dict (named or loaded from a converted checkpoint's config.json)."""
  family = config.get('family')
  if family == 'ddim':
    from tcaq_jax.models.ddim_unet import DDIMUNet
    return DDIMUNet(config)
  if family == 'ldm':
    from tcaq_jax.models.ldm_unet import LatentDiffusion
    return LatentDiffusion(config)
  raise ValueError(f'config {config.get("name")!r} has unknown family {family!r} (expected ddim or ldm)')
