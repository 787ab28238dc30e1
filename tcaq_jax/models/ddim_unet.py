"""The DDIM CIFAR-10 UNet (ermongroup/ddim `models/diffusion.py::Model`) in Flax, NHWC.

Parameter paths mirror the PyTorch keys (`down.0.block.1.conv1.weight` ->
params['down_0']['block_1']['conv1']['kernel']): levels, blocks and attentions are setup() lists.

  model = DDIMUNet(get_config('ddim_cifar10'))
  eps = model.apply({'params': p}, x, t)            # x: [B, 32, 32, 3] float32, t: [B] int32
  eps = model.apply({'params': p}, x, t, train=True, rngs={'dropout': key})
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from tcaq_jax.models.layers import (AttnBlock, Downsample, ResnetBlock, TembMLP, Upsample, group_norm,
                                    swish, timestep_embedding)


def _level_channels(config: dict):
  ch, mult = config['ch'], list(config['ch_mult'])
  return ch, mult, (1,) + tuple(mult)


class DownLevel(nn.Module):
  """down.{l}: `block` (ResnetBlocks), `attn` (AttnBlocks, maybe empty), `downsample` (None at the last level)."""
  in_ch: int
  out_ch: int
  num_res_blocks: int
  use_attn: bool
  dropout: float
  has_downsample: bool
  resamp_with_conv: bool = True

  def setup(self):
    self.block = [ResnetBlock(self.in_ch if i == 0 else self.out_ch, self.out_ch, self.dropout)
                  for i in range(self.num_res_blocks)]
    self.attn = [AttnBlock(self.out_ch) for _ in range(self.num_res_blocks)] if self.use_attn else []
    self.downsample = Downsample(self.out_ch, self.resamp_with_conv) if self.has_downsample else None

  def __call__(self, x, temb, train: bool = False):
    """x: [B,H,W,Cin] -> list of the skip activations (one per block, then the downsampled one)."""
    hs = []
    h = x
    for i, blk in enumerate(self.block):
      h = blk(h, temb, train)
      if self.attn:
        h = self.attn[i](h)
      hs.append(h)
    if self.downsample is not None:
      hs.append(self.downsample(h))
    return hs


class MidBlock(nn.Module):
  """mid: block_1, attn_1, block_2. x: [B,H,W,C] -> [B,H,W,C]."""
  channels: int
  dropout: float

  def setup(self):
    self.block_1 = ResnetBlock(self.channels, self.channels, self.dropout)
    self.attn_1 = AttnBlock(self.channels)
    self.block_2 = ResnetBlock(self.channels, self.channels, self.dropout)

  def __call__(self, x, temb, train: bool = False):
    return self.block_2(self.attn_1(self.block_1(x, temb, train)), temb, train)


class UpLevel(nn.Module):
  """up.{l}: `block` (num_res_blocks + 1 ResnetBlocks on concat([h, skip])), `attn`, `upsample` (None at l=0).

  block_in: channels of h entering the level; skip_chs: channels of each popped skip, in order.
  """
  block_in: int
  out_ch: int
  skip_chs: tuple
  use_attn: bool
  dropout: float
  has_upsample: bool
  resamp_with_conv: bool = True

  def setup(self):
    blocks = []
    h_ch = self.block_in
    for s in self.skip_chs:
      blocks.append(ResnetBlock(h_ch + s, self.out_ch, self.dropout, concat_split=h_ch))
      h_ch = self.out_ch
    self.block = blocks
    self.attn = [AttnBlock(self.out_ch) for _ in self.skip_chs] if self.use_attn else []
    self.upsample = Upsample(self.out_ch, self.resamp_with_conv) if self.has_upsample else None

  def __call__(self, h, skips, temb, train: bool = False):
    """h: [B,H,W,block_in]; skips: list of skip activations in pop order -> [B,H',W',out_ch]."""
    for i, blk in enumerate(self.block):
      h = blk(jnp.concatenate([h, skips[i]], axis=-1), temb, train)
      if self.attn:
        h = self.attn[i](h)
    if self.upsample is not None:
      h = self.upsample(h)
    return h


class DDIMUNet(nn.Module):
  """DDIM UNet. __call__(x [B,H,W,in_channels] float32, t [B] int32, train=False) -> eps [B,H,W,out_ch].

  Config keys: in_channels, out_ch, resolution, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
  resamp_with_conv.
  """
  config: dict

  def setup(self):
    c = self.config
    ch, mult, in_mult = _level_channels(c)
    nrb, n = c['num_res_blocks'], len(mult)
    attn_res = set(c['attn_resolutions'])
    dropout = float(c.get('dropout', 0.0))
    with_conv = bool(c.get('resamp_with_conv', True))
    self.temb_ch = ch * 4
    self.temb = TembMLP(self.temb_ch)
    self.conv_in = nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)))
    down, skip_chs, res = [], [ch], c['resolution']
    for l in range(n):
      down.append(DownLevel(ch * in_mult[l], ch * mult[l], nrb, res in attn_res, dropout, l != n - 1, with_conv))
      skip_chs += [ch * mult[l]] * nrb
      if l != n - 1:
        skip_chs.append(ch * mult[l])
        res //= 2
    self.down = down
    block_in = ch * mult[-1]
    self.mid = MidBlock(block_in, dropout)
    up = [None] * n
    for l in reversed(range(n)):
      pops = tuple(skip_chs.pop() for _ in range(nrb + 1))
      up[l] = UpLevel(block_in, ch * mult[l], pops, res in attn_res, dropout, l != 0, with_conv)
      block_in = ch * mult[l]
      if l != 0:
        res *= 2
    self.up = up
    self.norm_out = group_norm()
    self.conv_out = nn.Conv(c['out_ch'], (3, 3), padding=((1, 1), (1, 1)))

  def embed_time(self, t):
    """t: [B] -> temb [B, 4ch]."""
    return self.temb(timestep_embedding(t, self.config['ch']))

  def __call__(self, x, t, train: bool = False):
    temb = self.embed_time(t)
    hs = [self.conv_in(x)]
    for level in self.down:
      hs += level(hs[-1], temb, train)
    h = self.mid(hs[-1], temb, train)
    for level in reversed(self.up):
      nb = len(level.skip_chs)
      skips = [hs.pop() for _ in range(nb)]
      h = level(h, skips, temb, train)
    return self.conv_out(swish(self.norm_out(h)))
