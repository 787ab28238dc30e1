"""First-stage decoders of latent diffusion (taming / ldm `diffusionmodules/model.py` Decoder), NHWC.

Submodule names mirror the checkpoint keys under `first_stage_model.`: `decoder/{conv_in, mid/{block_1, attn_1,
block_2}, up_{l}/{block_{i}, attn_{i}, upsample/conv}, norm_out, conv_out}`, `post_quant_conv`, and for VQ
models `quantize/embedding/embedding` [n_embed, embed_dim].
Numerics: GroupNorm(32, eps 1e-6), swish, single-head AttnBlock with 1x1 convs q, k, v, proj_out and scale
C^-1/2, nearest x2 + conv upsampling.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcaq_jax.models.layers import AttnBlock, Upsample  # same blocks as the DDIM UNet (eps 1e-6)

_PAD1 = ((1, 1), (1, 1))


class FirstStageConfigError(ValueError):
  """A first-stage config dict is missing keys or names an unknown type."""


def _norm():
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False)


def _conv3(features):
  return nn.Conv(features, (3, 3), padding=_PAD1)


def _conv1(features):
  return nn.Conv(features, (1, 1), padding='VALID')


class ResnetBlock(nn.Module):
  """Decoder ResnetBlock without time embedding. x: [B, H, W, in_ch] -> [B, H, W, out_ch].

  norm1, conv1, norm2, conv2, nin_shortcut (1x1, when in_ch != out_ch).
  """
  in_ch: int
  out_ch: int

  def setup(self):
    self.norm1 = _norm()
    self.conv1 = _conv3(self.out_ch)
    self.norm2 = _norm()
    self.conv2 = _conv3(self.out_ch)
    if self.in_ch != self.out_ch:
      self.nin_shortcut = _conv1(self.out_ch)

  def __call__(self, x):
    h = self.conv1(nn.swish(self.norm1(x)))
    h = self.conv2(nn.swish(self.norm2(h)))
    if self.in_ch != self.out_ch:
      x = self.nin_shortcut(x)
    return x + h


class Mid(nn.Module):
  """`mid`: block_1, attn_1, block_2 at channel width ch."""
  ch: int

  def setup(self):
    self.block_1 = ResnetBlock(self.ch, self.ch)
    self.attn_1 = AttnBlock(self.ch)
    self.block_2 = ResnetBlock(self.ch, self.ch)

  def __call__(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class UpLevel(nn.Module):
  """`up.{l}`: block_i (num_res_blocks + 1 ResnetBlocks), attn_i (when the level has attention), upsample."""
  in_ch: int
  out_ch: int
  num_blocks: int
  with_attn: bool
  with_upsample: bool

  def setup(self):
    self.block = [ResnetBlock(self.in_ch if i == 0 else self.out_ch, self.out_ch) for i in range(self.num_blocks)]
    if self.with_attn:
      self.attn = [AttnBlock(self.out_ch) for _ in range(self.num_blocks)]
    if self.with_upsample:
      self.upsample = Upsample(self.out_ch)

  def __call__(self, x):
    for i in range(self.num_blocks):
      x = self.block[i](x)
      if self.with_attn:
        x = self.attn[i](x)
    return self.upsample(x) if self.with_upsample else x


class Decoder(nn.Module):
  """taming/ldm Decoder. z: [B, h, w, z_channels] -> [B, h * 2^(L-1), w * 2^(L-1), out_ch].

  `ddconfig` keys: ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels.
  """
  ddconfig: dict

  def setup(self):
    dd = self.ddconfig
    ch_mult = list(dd['ch_mult'])
    n_levels = len(ch_mult)
    block_in = dd['ch'] * ch_mult[-1]
    curr_res = dd['resolution'] // 2 ** (n_levels - 1)
    self.conv_in = _conv3(block_in)
    self.mid = Mid(block_in)
    levels = [None] * n_levels
    for i_level in reversed(range(n_levels)):
      block_out = dd['ch'] * ch_mult[i_level]
      levels[i_level] = UpLevel(block_in, block_out, dd['num_res_blocks'] + 1,
                                with_attn=curr_res in dd.get('attn_resolutions', []),
                                with_upsample=i_level != 0)
      block_in = block_out
      if i_level != 0:
        curr_res *= 2
    self.up = levels
    self.norm_out = _norm()
    self.conv_out = _conv3(dd['out_ch'])

  def __call__(self, z):
    h = self.mid(self.conv_in(z))
    for i_level in reversed(range(len(self.up))):
      h = self.up[i_level](h)
    return self.conv_out(nn.swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
  """`embedding` [n_embed, embed_dim]. z: [..., embed_dim] -> nearest codebook entry (Euclidean)."""
  n_embed: int
  embed_dim: int

  def setup(self):
    self.embedding = nn.Embed(self.n_embed, self.embed_dim)

  def __call__(self, z):
    codebook = self.embedding.embedding
    flat = z.reshape(-1, self.embed_dim)
    d = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1)[None, :]
         - 2.0 * flat @ codebook.T)
    idx = jnp.argmin(d, axis=1)
    return codebook[idx].reshape(z.shape)


class FirstStage(nn.Module):
  """First-stage model (decoder half). `config`: {'type': 'vq' | 'kl', 'embed_dim', 'n_embed' (vq), 'ddconfig'}.

  decode(z): z [B, h, w, embed_dim] (already divided by the scale factor) -> images [B, H, W, out_ch].
  VQ: snap to the codebook, then post_quant_conv and decoder; KL: post_quant_conv and decoder.
  """
  config: dict

  def setup(self):
    cfg = self.config
    kind = cfg.get('type')
    if kind not in ('vq', 'kl'):
      raise FirstStageConfigError(f'first_stage type {kind!r} unknown (expected vq or kl)')
    for key in ('embed_dim', 'ddconfig') + (('n_embed',) if kind == 'vq' else ()):
      if key not in cfg:
        raise FirstStageConfigError(f'first_stage config ({kind}) lacks {key!r}')
    self.decoder = Decoder(cfg['ddconfig'])
    self.post_quant_conv = _conv1(cfg['ddconfig']['z_channels'])
    if kind == 'vq':
      self.quantize = VectorQuantizer(cfg['n_embed'], cfg['embed_dim'])

  def __call__(self, z):
    return self.decode(z)

  def decode(self, z):
    if self.config['type'] == 'vq':
      z = self.quantize(z)
    return self.decoder(self.post_quant_conv(z))
