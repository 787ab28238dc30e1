"""Building blocks of the DDIM CIFAR-10 UNet (ermongroup/ddim `models/diffusion.py`), NHWC.

Every module is setup()-style so a block can be applied alone
(`model.apply(v, x, temb, method=lambda m, x, e: m.down[0].block[0](x, e))`), and submodule names mirror
the PyTorch keys (`norm1`, `conv1`, `temb_proj`, `nin_shortcut`, `q`, `k`, `v`, `proj_out`, ...).
Numerics follow the original: GroupNorm(32, eps 1e-6), swish, timestep embedding [sin, cos].
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcaq_jax.models.qpoint import QuantMatmul, QuantPoint

_PAD1 = ((1, 1), (1, 1))


def swish(x):
  return x * jax.nn.sigmoid(x)


def timestep_embedding(t, dim: int):
  """DDIM sinusoidal embedding. t: [B] (int or float) -> [B, dim] float32, layout [sin | cos].

  freq_i = exp(-i ln(1e4) / (half - 1)), i = 0..half-1; zero-padded when dim is odd.
  """
  half = dim // 2
  scale = math.log(10000.0) / (half - 1)
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -scale)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def group_norm(eps: float = 1e-6, name: str | None = None):
  """GroupNorm(32) with the exact (two-pass) variance, as torch.nn.GroupNorm."""
  return nn.GroupNorm(num_groups=32, epsilon=eps, use_fast_variance=False, name=name)


def conv3x3(features: int, stride: int = 1, padding=_PAD1):
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=padding)


def conv1x1(features: int):
  return nn.Conv(features, (1, 1), padding='VALID')


class TembMLP(nn.Module):
  """temb.dense.{0,1}: Dense(ch -> 4ch), swish, Dense(4ch -> 4ch). emb: [B, ch] -> [B, 4ch]."""
  temb_ch: int

  def setup(self):
    self.dense = [nn.Dense(self.temb_ch), nn.Dense(self.temb_ch)]

  def __call__(self, emb):
    return self.dense[1](swish(self.dense[0](emb)))


class ResnetBlock(nn.Module):
  """DDIM ResnetBlock. x: [B, H, W, Cin], temb: [B, T] -> [B, H, W, out_ch].

  `concat_split`: for up-path blocks whose input is concat([h, skip], -1), the channels of h (else None).
  `in_ch` is the input channel count (decides whether `nin_shortcut` exists, as in PyTorch).
  """
  in_ch: int
  out_ch: int
  dropout: float = 0.0
  concat_split: int | None = None
  eps: float = 1e-6

  def setup(self):
    self.norm1 = group_norm(self.eps)
    self.conv1 = conv3x3(self.out_ch)
    self.temb_proj = nn.Dense(self.out_ch)
    self.norm2 = group_norm(self.eps)
    self.drop = nn.Dropout(self.dropout)
    self.conv2 = conv3x3(self.out_ch)
    if self.in_ch != self.out_ch:
      self.nin_shortcut = conv1x1(self.out_ch)

  def __call__(self, x, temb, train: bool = False):
    h = self.conv1(swish(self.norm1(x)))
    h = h + self.temb_proj(swish(temb))[:, None, None, :]
    h = swish(self.norm2(h))
    h = self.drop(h, deterministic=not train or self.dropout == 0.0)
    h = self.conv2(h)
    if self.in_ch != self.out_ch:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention. x: [B, H, W, C] -> [B, H, W, C].

  q, k, v, proj_out are 1x1 convs; q and k pass through QuantPoint('matmul') `qk_q`, `qk_k`, the
  softmax probabilities [B, HW, HW] through QuantPoint('softmax') `attn_probs`, v through
  QuantPoint('matmul') `av_v` before probs @ v; the two einsums are QuantMatmuls `qk_matmul`, `av_matmul`.
  """
  channels: int
  eps: float = 1e-6

  def setup(self):
    self.norm = group_norm(self.eps)
    self.q = conv1x1(self.channels)
    self.k = conv1x1(self.channels)
    self.v = conv1x1(self.channels)
    self.proj_out = conv1x1(self.channels)
    self.qk_q = QuantPoint(kind='matmul')
    self.qk_k = QuantPoint(kind='matmul')
    self.attn_probs = QuantPoint(kind='softmax')
    self.av_v = QuantPoint(kind='matmul')
    self.qk_matmul = QuantMatmul('bic,bjc->bij', ('qk_q', 'qk_k'))
    self.av_matmul = QuantMatmul('bij,bjc->bic', ('attn_probs', 'av_v'))

  def __call__(self, x):
    b, h, w, c = x.shape
    hn = self.norm(x)
    q = self.qk_q(self.q(hn).reshape(b, h * w, c))
    k = self.qk_k(self.k(hn).reshape(b, h * w, c))
    v = self.av_v(self.v(hn).reshape(b, h * w, c))
    logits = self.qk_matmul(q, k) * (c ** -0.5)
    probs = self.attn_probs(jax.nn.softmax(logits, axis=-1))
    out = self.av_matmul(probs, v).reshape(b, h, w, c)
    return x + self.proj_out(out)


class Downsample(nn.Module):
  """Pad (0,1,0,1) then 3x3 stride-2 VALID conv (`conv`), or 2x2 average pool. [B,H,W,C] -> [B,H/2,W/2,C]."""
  channels: int
  with_conv: bool = True

  def setup(self):
    if self.with_conv:
      self.conv = conv3x3(self.channels, stride=2, padding='VALID')

  def __call__(self, x):
    if self.with_conv:
      return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
  """Nearest x2 then 3x3 conv (`conv`). [B,H,W,C] -> [B,2H,2W,C]."""
  channels: int
  with_conv: bool = True

  def setup(self):
    if self.with_conv:
      self.conv = conv3x3(self.channels)

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x) if self.with_conv else x
