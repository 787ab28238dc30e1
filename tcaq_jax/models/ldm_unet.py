"""Latent-diffusion UNet (CompVis openaimodel `UNetModel`) and the `LatentDiffusion` wrapper, NHWC.

Parameter paths mirror the checkpoint keys under `model.diffusion_model.` with numeric segments joined by `_`:
`input_blocks.1.0.in_layers.2.weight` -> `diffusion_model/input_blocks_1_0/in_layers_2/kernel`.
Each entry of `input_blocks` / `output_blocks` / `middle_block` is a list of blocks (a TimestepEmbedSequential);
apply one alone with `model.apply(v, h, emb, method=lambda m, h, e: m.diffusion_model.input_blocks[1][0](h, e))`
or a whole sequential with `ldm_layers.apply_layers`.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from tcaq_jax.models import ldm_layers as L
from tcaq_jax.models.autoencoder import FirstStage


class LDMConfigError(ValueError):
  """An LDM config dict is missing keys or asks for an unsupported option."""


_UNET_DEFAULTS = {
    'dropout': 0.0, 'conv_resample': True, 'num_heads': -1, 'num_head_channels': -1,
    'num_heads_upsample': -1, 'use_scale_shift_norm': False, 'resblock_updown': False,
    'use_spatial_transformer': False, 'transformer_depth': 1, 'context_dim': None, 'legacy': True,
    'num_classes': None, 'use_new_attention_order': False,
}
_UNET_REQUIRED = ('in_channels', 'model_channels', 'out_channels', 'num_res_blocks', 'attention_resolutions',
                  'channel_mult')


def unet_params(cfg: dict) -> dict:
  """`cfg` (the config's `unet` sub-dict) with defaults filled in; raises LDMConfigError on bad input."""
  missing = [k for k in _UNET_REQUIRED if k not in cfg]
  if missing:
    raise LDMConfigError(f'ldm unet config lacks {missing}')
  p = {**_UNET_DEFAULTS, **cfg}
  if p['num_classes'] is not None:
    raise LDMConfigError('ldm unet config: num_classes (label_emb) is not supported; use a class embedder '
                         '(cond_stage) with the spatial transformer')
  if p['use_new_attention_order']:
    raise LDMConfigError('ldm unet config: use_new_attention_order is not supported')
  if p['num_heads'] == -1 and p['num_head_channels'] == -1:
    raise LDMConfigError('ldm unet config: set num_heads or num_head_channels')
  if p['use_spatial_transformer'] and p['context_dim'] is None:
    raise LDMConfigError('ldm unet config: use_spatial_transformer needs context_dim')
  return p


class LDMUNet(nn.Module):
  """openaimodel UNetModel. x: [B, H, W, in_channels] float32, t: [B] int32, context: [B, M, context_dim] or
  None -> eps [B, H, W, out_channels].

  `config` is the `unet` sub-dict of an LDM config (openaimodel constructor arguments).
  """
  config: dict

  def _attention(self, p, ch, upsample: bool):
    """The attention layer after a ResBlock at channel width ch (openaimodel's head bookkeeping)."""
    num_heads = p['num_heads_upsample'] if upsample and p['num_heads_upsample'] != -1 else p['num_heads']
    if p['num_head_channels'] == -1:
      dim_head = ch // num_heads
    else:
      num_heads = ch // p['num_head_channels']
      dim_head = p['num_head_channels']
    if p['use_spatial_transformer']:
      return L.SpatialTransformer(ch, num_heads, dim_head, depth=p['transformer_depth'])
    if p['legacy']:
      dim_head = p['num_head_channels']
    return L.AttentionBlock(ch, num_heads=num_heads, num_head_channels=dim_head)

  def setup(self):
    p = unet_params(self.config)
    mc = p['model_channels']
    ted = 4 * mc
    res = lambda cin, cout, **kw: L.ResBlock(cin, ted, cout, dropout=p['dropout'],
                                             use_scale_shift_norm=p['use_scale_shift_norm'], **kw)
    self.time_embed_0 = nn.Dense(ted)
    self.time_embed_2 = nn.Dense(ted)

    input_blocks = [[nn.Conv(mc, (3, 3), padding=((1, 1), (1, 1)))]]
    chans = [mc]
    ch, ds = mc, 1
    for level, mult in enumerate(p['channel_mult']):
      for _ in range(p['num_res_blocks']):
        layers = [res(ch, mult * mc)]
        ch = mult * mc
        if ds in p['attention_resolutions']:
          layers.append(self._attention(p, ch, upsample=False))
        input_blocks.append(layers)
        chans.append(ch)
      if level != len(p['channel_mult']) - 1:
        if p['resblock_updown']:
          input_blocks.append([res(ch, ch, down=True)])
        else:
          input_blocks.append([L.Downsample(ch, p['conv_resample'], ch)])
        chans.append(ch)
        ds *= 2
    self.input_blocks = input_blocks

    self.middle_block = [res(ch, ch), self._attention(p, ch, upsample=False), res(ch, ch)]

    output_blocks = []
    for level, mult in list(enumerate(p['channel_mult']))[::-1]:
      for i in range(p['num_res_blocks'] + 1):
        ich = chans.pop()
        layers = [res(ch + ich, mc * mult, concat_split=ch)]
        ch = mc * mult
        if ds in p['attention_resolutions']:
          layers.append(self._attention(p, ch, upsample=True))
        if level and i == p['num_res_blocks']:
          if p['resblock_updown']:
            layers.append(res(ch, ch, up=True))
          else:
            layers.append(L.Upsample(ch, p['conv_resample'], ch))
          ds //= 2
        output_blocks.append(layers)
    self.output_blocks = output_blocks

    self.out_0 = L.group_norm()
    self.out_2 = nn.Conv(p['out_channels'], (3, 3), padding=((1, 1), (1, 1)))

  def time_embedding(self, t):
    """t: [B] -> emb [B, 4 * model_channels] (time_embed_0, SiLU, time_embed_2)."""
    mc = self.config['model_channels']
    return self.time_embed_2(nn.silu(self.time_embed_0(L.timestep_embedding(t, mc))))

  def __call__(self, x, t, context=None, train: bool = False):
    emb = self.time_embedding(t)
    hs = []
    h = x
    for layers in self.input_blocks:
      h = L.apply_layers(layers, h, emb, context, train)
      hs.append(h)
    h = L.apply_layers(self.middle_block, h, emb, context, train)
    for layers in self.output_blocks:
      h = jnp.concatenate([h, hs.pop()], axis=-1)
      h = L.apply_layers(layers, h, emb, context, train)
    return self.out_2(nn.silu(self.out_0(h)))


class ClassEmbedder(nn.Module):
  """ldm ClassEmbedder: `embedding` [n_classes, embed_dim]. y: [B] int32 -> context [B, 1, embed_dim]."""
  n_classes: int = 1001
  embed_dim: int = 512

  def setup(self):
    self.embedding = nn.Embed(self.n_classes, self.embed_dim)

  def __call__(self, y):
    return self.embedding(y)[:, None, :]


class LatentDiffusion(nn.Module):
  """UNet (`diffusion_model`), first stage (`first_stage_model`), class embedder (`cond_stage_model`).

  `__call__(x, t, context=None, y=None)`: x [B, H, W, C] latents, t [B] int32, y [B] int32 class labels
  (cin: 1000 = unconditional) -> eps [B, H, W, C]. `decode(z)`: latents [B, h, w, C] -> images [B, H, W, 3]
  in about [-1, 1] (z / scale_factor, VQ codebook snap, post_quant_conv, decoder).
  """
  config: dict

  def setup(self):
    cfg = self.config
    for key in ('unet', 'first_stage'):
      if key not in cfg:
        raise LDMConfigError(f'ldm config {cfg.get("name")!r} lacks {key!r}')
    self.diffusion_model = LDMUNet(cfg['unet'])
    self.first_stage_model = FirstStage(cfg['first_stage'])
    cond = cfg.get('cond_stage')
    if cond is not None:
      if cond.get('type') != 'class':
        raise LDMConfigError(f'ldm config {cfg.get("name")!r}: unsupported cond_stage {cond!r}')
      self.cond_stage_model = ClassEmbedder(cond['n_classes'], cond['embed_dim'])

  def __call__(self, x, t, context=None, y=None, train: bool = False):
    if y is not None:
      if self.config.get('cond_stage') is None:
        raise LDMConfigError(f'ldm config {self.config.get("name")!r} has no class embedder but y was given')
      context = self.cond_stage_model(y)
    if context is None and self.config['unet'].get('use_spatial_transformer'):
      raise ValueError(f'ldm config {self.config.get("name")!r} uses cross-attention: pass y (class labels, '
                       f'{self.config.get("unconditional_label")} = unconditional) or context')
    return self.diffusion_model(x, t, context, train)

  def decode(self, z):
    return self.first_stage_model.decode(z / self.config.get('scale_factor', 1.0))

  def init_all(self, x, t, context=None, y=None):
    """For `init`: touches the UNet, the embedder (when present) and the first stage in one call."""
    if y is None and self.config.get('cond_stage') is not None:
      y = jnp.zeros((x.shape[0],), jnp.int32)
    eps = self(x, t, context, y)
    return eps, self.decode(x)
