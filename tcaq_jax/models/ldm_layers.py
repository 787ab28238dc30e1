"""Building blocks of the latent-diffusion UNet (CompVis `openaimodel.py`, `attention.py`), NHWC.

Every block is setup()-style and its submodules carry the PyTorch key names with numeric segments joined by
`_` (`in_layers.2` -> `in_layers_2`, `to_out.0` -> `to_out_0`, `ff.net.0.proj` -> `ff/net_0/proj`), so a
checkpoint converts by renaming plus transposes.
Numerics follow the original: GroupNorm(32, eps 1e-5) in ResBlock / AttentionBlock / `out`, GroupNorm(32, eps
1e-6) in SpatialTransformer (its `Normalize`), LayerNorm eps 1e-5, SiLU, timestep embedding [cos | sin],
legacy QKV attention (head-major qkv, scale d^-1/4 on q and k), CrossAttention scale d^-1/2, GEGLU with exact
erf GELU, symmetric-padding stride-2 downsample, nearest x2 upsample.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcaq_jax.models.qpoint import QuantMatmul, QuantPoint

_PAD1 = ((1, 1), (1, 1))


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """LDM sinusoidal embedding. t: [B] -> [B, dim] float32, layout [cos | sin].

  freq_i = exp(-ln(max_period) i / half), i = 0..half-1; zero-padded when dim is odd.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def group_norm(eps: float = 1e-5):
  """GroupNorm(32) with the exact two-pass variance (as torch.nn.GroupNorm)."""
  return nn.GroupNorm(num_groups=32, epsilon=eps, use_fast_variance=False)


def layer_norm(eps: float = 1e-5):
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False)


def conv3x3(features: int, stride: int = 1):
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=_PAD1)


def conv1x1(features: int):
  return nn.Conv(features, (1, 1), padding='VALID')


def upsample_nearest(x):
  """[B, H, W, C] -> [B, 2H, 2W, C] (nearest)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x):
  """[B, H, W, C] -> [B, H/2, W/2, C] (2x2 average, stride 2)."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
  """`op`: 3x3 stride-2 conv with symmetric padding 1 (or 2x2 average pool). [B,H,W,C] -> [B,H/2,W/2,out]."""
  channels: int
  use_conv: bool = True
  out_channels: int | None = None

  def setup(self):
    if self.use_conv:
      self.op = conv3x3(self.out_channels or self.channels, stride=2)

  def __call__(self, x):
    return self.op(x) if self.use_conv else avg_pool2(x)


class Upsample(nn.Module):
  """Nearest x2, then `conv` 3x3. [B,H,W,C] -> [B,2H,2W,out]."""
  channels: int
  use_conv: bool = True
  out_channels: int | None = None

  def setup(self):
    if self.use_conv:
      self.conv = conv3x3(self.out_channels or self.channels)

  def __call__(self, x):
    x = upsample_nearest(x)
    return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
  """openaimodel ResBlock. x: [B, H, W, channels], emb: [B, E] -> [B, H', W', out_channels].

  Submodules: in_layers_0 (GroupNorm), in_layers_2 (conv), emb_layers_1 (Dense, 2*out with scale-shift),
  out_layers_0 (GroupNorm), out_layers_3 (conv), skip_connection (1x1 conv when channels change).
  `up` / `down`: resample h (between in_layers' SiLU and conv) and x by nearest x2 / 2x2 average pool.
  `concat_split`: for output blocks whose input is concat([h, skip], -1), the channels of h (else None).
  """
  channels: int
  emb_channels: int
  out_channels: int | None = None
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  concat_split: int | None = None

  @property
  def out_ch(self) -> int:
    return self.out_channels or self.channels

  def setup(self):
    out = self.out_ch
    self.in_layers_0 = group_norm()
    self.in_layers_2 = conv3x3(out)
    self.emb_layers_1 = nn.Dense(2 * out if self.use_scale_shift_norm else out)
    self.out_layers_0 = group_norm()
    self.out_layers_2 = nn.Dropout(self.dropout)
    self.out_layers_3 = conv3x3(out)
    if out != self.channels:
      self.skip_connection = conv1x1(out)

  def _resample(self, x):
    if self.up:
      return upsample_nearest(x)
    if self.down:
      return avg_pool2(x)
    return x

  def __call__(self, x, emb, train: bool = False):
    h = nn.silu(self.in_layers_0(x))
    h = self.in_layers_2(self._resample(h))
    x = self._resample(x)
    emb_out = self.emb_layers_1(nn.silu(emb))[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = self.out_layers_0(h) * (1 + scale) + shift
    else:
      h = self.out_layers_0(h + emb_out)
    h = nn.silu(h)
    h = self.out_layers_2(h, deterministic=not train or self.dropout == 0.0)
    h = self.out_layers_3(h)
    if self.out_ch != self.channels:
      x = self.skip_connection(x)
    return x + h


class AttentionBlock(nn.Module):
  """Legacy openaimodel AttentionBlock (QKVAttentionLegacy). x: [B, H, W, C] -> [B, H, W, C].

  `qkv` (Dense C -> 3C; the checkpoint's conv1d [3C, C, 1]) output channels are head-major
  [head][q|k|v][d]; q and k are both scaled by d^-1/4. `proj_out` is Dense C -> C.
  Quantisation points: `qk_q`, `qk_k`, `av_v` (kind 'matmul') and `attn_probs` (kind 'softmax',
  probabilities [B, heads, HW, HW]); the einsums are QuantMatmuls `qk_matmul`, `av_matmul`.
  """
  channels: int
  num_heads: int = 1
  num_head_channels: int = -1

  @property
  def heads(self) -> int:
    if self.num_head_channels == -1:
      return self.num_heads
    if self.channels % self.num_head_channels:
      raise ValueError(f'AttentionBlock: channels {self.channels} not divisible by num_head_channels '
                       f'{self.num_head_channels}')
    return self.channels // self.num_head_channels

  def setup(self):
    self.norm = group_norm()
    self.qkv = nn.Dense(3 * self.channels)
    self.proj_out = nn.Dense(self.channels)
    self.qk_q = QuantPoint(kind='matmul')
    self.qk_k = QuantPoint(kind='matmul')
    self.attn_probs = QuantPoint(kind='softmax')
    self.av_v = QuantPoint(kind='matmul')
    self.qk_matmul = QuantMatmul('bthd,bshd->bhts', ('qk_q', 'qk_k'))
    self.av_matmul = QuantMatmul('bhts,bshd->bthd', ('attn_probs', 'av_v'))

  def __call__(self, x):
    b, hh, ww, c = x.shape
    heads = self.heads
    d = c // heads
    qkv = self.qkv(self.norm(x).reshape(b, hh * ww, c)).reshape(b, hh * ww, heads, 3, d)
    scale = 1.0 / math.sqrt(math.sqrt(d))
    q = self.qk_q(qkv[..., 0, :] * scale)
    k = self.qk_k(qkv[..., 1, :] * scale)
    v = self.av_v(qkv[..., 2, :])
    logits = self.qk_matmul(q, k)
    probs = self.attn_probs(jax.nn.softmax(logits, axis=-1))
    out = self.av_matmul(probs, v).reshape(b, hh * ww, c)
    return x + self.proj_out(out).reshape(b, hh, ww, c)


class CrossAttention(nn.Module):
  """x: [B, N, query_dim], context: [B, M, context_dim] or None (self-attention) -> [B, N, query_dim].

  to_q / to_k / to_v: Dense without bias; to_out_0: Dense with bias; scale dim_head^-1/2.
  Quantisation points: `qk_q`, `qk_k`, `av_v` ('matmul'), `attn_probs` ('softmax', [B, heads, N, M]).
  The two einsums are QuantMatmuls `qk_matmul` (q k^T) and `av_matmul` (probs @ v).
  """
  query_dim: int
  heads: int
  dim_head: int

  def setup(self):
    inner = self.heads * self.dim_head
    self.to_q = nn.Dense(inner, use_bias=False)
    self.to_k = nn.Dense(inner, use_bias=False)
    self.to_v = nn.Dense(inner, use_bias=False)
    self.to_out_0 = nn.Dense(self.query_dim)
    self.qk_q = QuantPoint(kind='matmul')
    self.qk_k = QuantPoint(kind='matmul')
    self.attn_probs = QuantPoint(kind='softmax')
    self.av_v = QuantPoint(kind='matmul')
    self.qk_matmul = QuantMatmul('bnhd,bmhd->bhnm', ('qk_q', 'qk_k'))
    self.av_matmul = QuantMatmul('bhnm,bmhd->bnhd', ('attn_probs', 'av_v'))

  def __call__(self, x, context=None):
    context = x if context is None else context
    b, n, _ = x.shape
    m = context.shape[1]
    split = lambda t, length: t.reshape(b, length, self.heads, self.dim_head)
    q = self.qk_q(split(self.to_q(x), n))
    k = self.qk_k(split(self.to_k(context), m))
    v = self.av_v(split(self.to_v(context), m))
    logits = self.qk_matmul(q, k) * (self.dim_head ** -0.5)
    probs = self.attn_probs(jax.nn.softmax(logits, axis=-1))
    out = self.av_matmul(probs, v).reshape(b, n, self.heads * self.dim_head)
    return self.to_out_0(out)


class GEGLU(nn.Module):
  """`proj`: Dense dim -> 2*dim_out; returns a * gelu(gate) (exact erf). x: [..., dim] -> [..., dim_out]."""
  dim_out: int

  def setup(self):
    self.proj = nn.Dense(2 * self.dim_out)

  def __call__(self, x):
    a, gate = jnp.split(self.proj(x), 2, axis=-1)
    return a * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """Gated feed-forward: net_0 (GEGLU dim -> 4 dim), net_2 (Dense 4 dim -> dim). x: [B, N, dim]."""
  dim: int
  mult: int = 4

  def setup(self):
    self.net_0 = GEGLU(self.dim * self.mult)
    self.net_2 = nn.Dense(self.dim)

  def __call__(self, x):
    return self.net_2(self.net_0(x))


class BasicTransformerBlock(nn.Module):
  """attn1 (self), attn2 (cross), ff, with pre-LayerNorms norm1/2/3. x: [B, N, dim] -> [B, N, dim]."""
  dim: int
  n_heads: int
  d_head: int

  def setup(self):
    self.attn1 = CrossAttention(self.dim, self.n_heads, self.d_head)
    self.ff = FeedForward(self.dim)
    self.attn2 = CrossAttention(self.dim, self.n_heads, self.d_head)
    self.norm1 = layer_norm()
    self.norm2 = layer_norm()
    self.norm3 = layer_norm()

  def __call__(self, x, context=None):
    x = self.attn1(self.norm1(x)) + x
    x = self.attn2(self.norm2(x), context) + x
    return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
  """norm (GroupNorm eps 1e-6), proj_in (1x1), transformer_blocks_i, proj_out (1x1), residual.

  x: [B, H, W, C], context: [B, M, context_dim] or None -> [B, H, W, C].
  """
  channels: int
  n_heads: int
  d_head: int
  depth: int = 1

  def setup(self):
    inner = self.n_heads * self.d_head
    self.norm = group_norm(1e-6)
    self.proj_in = conv1x1(inner)
    self.transformer_blocks = [BasicTransformerBlock(inner, self.n_heads, self.d_head)
                               for _ in range(self.depth)]
    self.proj_out = conv1x1(self.channels)

  def __call__(self, x, context=None):
    b, hh, ww, _ = x.shape
    h = self.proj_in(self.norm(x))
    inner = h.shape[-1]
    h = h.reshape(b, hh * ww, inner)
    for block in self.transformer_blocks:
      h = block(h, context)
    return x + self.proj_out(h.reshape(b, hh, ww, inner))


def apply_layers(layers, h, emb, context=None, train: bool = False):
  """One TimestepEmbedSequential: ResBlocks get (h, emb), SpatialTransformers (h, context), others (h)."""
  for layer in layers:
    if isinstance(layer, ResBlock):
      h = layer(h, emb, train)
    elif isinstance(layer, SpatialTransformer):
      h = layer(h, context)
    else:
      h = layer(h)
  return h
