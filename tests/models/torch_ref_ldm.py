"""Compact PyTorch reference of the latent-diffusion openaimodel UNet (NCHW), with the real checkpoint key names.

Written from the CompVis latent-diffusion sources (`ldm/modules/diffusionmodules/openaimodel.py`, `util.py`,
`ldm/modules/attention.py`) for tests only: ResBlock (scale-shift norm, up/down), legacy AttentionBlock
(QKVAttentionLegacy), SpatialTransformer / BasicTransformerBlock / CrossAttention / GEGLU, Downsample (`op`),
Upsample (`conv`), timestep embedding [cos | sin]. `state_dict()` keys are those under `model.diffusion_model.`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t, dim, max_period=10000):
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
  return emb


def norm32(ch, eps=1e-5):
  return nn.GroupNorm(32, ch, eps=eps)


class Downsample(nn.Module):
  def __init__(self, ch, use_conv=True):
    super().__init__()
    self.use_conv = use_conv
    self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

  def forward(self, x):
    return self.op(x)


class Upsample(nn.Module):
  def __init__(self, ch, use_conv=True):
    super().__init__()
    self.use_conv = use_conv
    if use_conv:
      self.conv = nn.Conv2d(ch, ch, 3, padding=1)

  def forward(self, x):
    x = F.interpolate(x, scale_factor=2, mode='nearest')
    return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
  def __init__(self, ch, emb_ch, out_ch=None, scale_shift=False, up=False, down=False):
    super().__init__()
    out_ch = out_ch or ch
    self.scale_shift = scale_shift
    self.in_layers = nn.Sequential(norm32(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
    self.updown = up or down
    if up:
      self.h_upd, self.x_upd = Upsample(ch, False), Upsample(ch, False)
    elif down:
      self.h_upd, self.x_upd = Downsample(ch, False), Downsample(ch, False)
    else:
      self.h_upd = self.x_upd = nn.Identity()
    self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if scale_shift else out_ch))
    self.out_layers = nn.Sequential(norm32(out_ch), nn.SiLU(), nn.Dropout(0.0),
                                    nn.Conv2d(out_ch, out_ch, 3, padding=1))
    self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

  def forward(self, x, emb):
    if self.updown:
      h = self.in_layers[:-1](x)
      h = self.in_layers[-1](self.h_upd(h))
      x = self.x_upd(x)
    else:
      h = self.in_layers(x)
    e = self.emb_layers(emb)[..., None, None]
    if self.scale_shift:
      scale, shift = torch.chunk(e, 2, dim=1)
      h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
    else:
      h = self.out_layers(h + e)
    return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
  """Legacy: qkv conv1d, heads split before q/k/v, scale d^-1/4 on q and k."""

  def __init__(self, ch, num_heads=1, num_head_channels=-1):
    super().__init__()
    self.heads = num_heads if num_head_channels == -1 else ch // num_head_channels
    self.norm = norm32(ch)
    self.qkv = nn.Conv1d(ch, 3 * ch, 1)
    self.proj_out = nn.Conv1d(ch, ch, 1)

  def forward(self, x):
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, -1)
    qkv = self.qkv(self.norm(x))
    length = qkv.shape[-1]
    d = c // self.heads
    q, k, v = qkv.reshape(b * self.heads, 3 * d, length).split(d, dim=1)
    s = 1 / math.sqrt(math.sqrt(d))
    w = torch.softmax(torch.einsum('bct,bcs->bts', q * s, k * s), dim=-1)
    a = torch.einsum('bts,bcs->bct', w, v).reshape(b, c, length)
    return (x + self.proj_out(a)).reshape(b, c, hh, ww)


class CrossAttention(nn.Module):
  def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
    super().__init__()
    inner = heads * dim_head
    context_dim = context_dim or query_dim
    self.heads, self.scale = heads, dim_head ** -0.5
    self.to_q = nn.Linear(query_dim, inner, bias=False)
    self.to_k = nn.Linear(context_dim, inner, bias=False)
    self.to_v = nn.Linear(context_dim, inner, bias=False)
    self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

  def forward(self, x, context=None):
    context = x if context is None else context
    h = self.heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    attn = (torch.einsum('bhid,bhjd->bhij', q, k) * self.scale).softmax(dim=-1)
    out = torch.einsum('bhij,bhjd->bhid', attn, v).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
    return self.to_out(out)


class GEGLU(nn.Module):
  def __init__(self, dim_in, dim_out):
    super().__init__()
    self.proj = nn.Linear(dim_in, 2 * dim_out)

  def forward(self, x):
    a, gate = self.proj(x).chunk(2, dim=-1)
    return a * F.gelu(gate)


class FeedForward(nn.Module):
  def __init__(self, dim, mult=4):
    super().__init__()
    self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

  def forward(self, x):
    return self.net(x)


class BasicTransformerBlock(nn.Module):
  def __init__(self, dim, n_heads, d_head, context_dim=None):
    super().__init__()
    self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)
    self.ff = FeedForward(dim)
    self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
    self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

  def forward(self, x, context=None):
    x = self.attn1(self.norm1(x)) + x
    x = self.attn2(self.norm2(x), context=context) + x
    return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
  def __init__(self, ch, n_heads, d_head, depth=1, context_dim=None):
    super().__init__()
    inner = n_heads * d_head
    self.norm = nn.GroupNorm(32, ch, eps=1e-6)
    self.proj_in = nn.Conv2d(ch, inner, 1)
    self.transformer_blocks = nn.ModuleList(
        [BasicTransformerBlock(inner, n_heads, d_head, context_dim=context_dim) for _ in range(depth)])
    self.proj_out = nn.Conv2d(inner, ch, 1)

  def forward(self, x, context=None):
    b, c, hh, ww = x.shape
    h = self.proj_in(self.norm(x))
    h = h.flatten(2).transpose(1, 2)
    for blk in self.transformer_blocks:
      h = blk(h, context)
    h = h.transpose(1, 2).reshape(b, -1, hh, ww)
    return x + self.proj_out(h)


class Seq(nn.Sequential):
  def forward(self, x, emb, context=None):
    for layer in self:
      if isinstance(layer, ResBlock):
        x = layer(x, emb)
      elif isinstance(layer, SpatialTransformer):
        x = layer(x, context)
      else:
        x = layer(x)
    return x


class UNetModel(nn.Module):
  """openaimodel UNetModel (legacy=True, no label_emb). Arguments as in the YAML `unet_config.params`."""

  def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
               channel_mult, num_heads=-1, num_head_channels=-1, use_scale_shift_norm=False,
               resblock_updown=False, use_spatial_transformer=False, transformer_depth=1, context_dim=None,
               **unused):
    super().__init__()
    mc, ted = model_channels, 4 * model_channels
    self.mc = mc
    self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
    rb = lambda cin, cout, **kw: ResBlock(cin, ted, cout, scale_shift=use_scale_shift_norm, **kw)

    def attn(ch):
      if num_head_channels == -1:
        heads, d = num_heads, ch // num_heads
      else:
        heads, d = ch // num_head_channels, num_head_channels
      if use_spatial_transformer:
        return SpatialTransformer(ch, heads, d, transformer_depth, context_dim)
      return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels)

    self.input_blocks = nn.ModuleList([Seq(nn.Conv2d(in_channels, mc, 3, padding=1))])
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        layers = [rb(ch, mult * mc)]
        ch = mult * mc
        if ds in attention_resolutions:
          layers.append(attn(ch))
        self.input_blocks.append(Seq(*layers))
        chans.append(ch)
      if level != len(channel_mult) - 1:
        self.input_blocks.append(Seq(rb(ch, ch, down=True) if resblock_updown else Downsample(ch)))
        chans.append(ch)
        ds *= 2
    self.middle_block = Seq(rb(ch, ch), attn(ch), rb(ch, ch))
    self.output_blocks = nn.ModuleList()
    for level, mult in list(enumerate(channel_mult))[::-1]:
      for i in range(num_res_blocks + 1):
        layers = [rb(ch + chans.pop(), mc * mult)]
        ch = mc * mult
        if ds in attention_resolutions:
          layers.append(attn(ch))
        if level and i == num_res_blocks:
          layers.append(rb(ch, ch, up=True) if resblock_updown else Upsample(ch))
          ds //= 2
        self.output_blocks.append(Seq(*layers))
    self.out = nn.Sequential(norm32(ch), nn.SiLU(), nn.Conv2d(mc, out_channels, 3, padding=1))

  def forward(self, x, t, context=None):
    emb = self.time_embed(timestep_embedding(t, self.mc))
    hs, h = [], x
    for m in self.input_blocks:
      h = m(h, emb, context)
      hs.append(h)
    h = self.middle_block(h, emb, context)
    for m in self.output_blocks:
      h = m(torch.cat([h, hs.pop()], dim=1), emb, context)
    return self.out(h)


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.05):
  """Fill every parameter with random values (norm weights around 1) so zero-inits do not hide paths."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      r = torch.randn(p.shape, generator=g)
      is_norm = any(s in name for s in ('norm', 'in_layers.0', 'out_layers.0', 'out.0')) and p.ndim == 1
      if is_norm and name.endswith('weight'):
        p.copy_(1.0 + 0.1 * r)
      else:
        fan_in = max(1, p[0].numel()) if p.ndim > 1 else 1
        p.copy_(r * (1.0 / math.sqrt(fan_in) if p.ndim > 1 else std))
  return module


def _flax_path(key: str):
  """`a.b.0.c.weight` -> (['a', 'b_0', 'c'], 'weight'): numeric segments join the previous name with `_`."""
  parts = key.split('.')
  path = []
  for seg in parts[:-1]:
    if seg.isdigit() and path:
      path[-1] = f'{path[-1]}_{seg}'
    else:
      path.append(seg)
  return path, parts[-1]


def state_dict_to_flax(state_dict: dict, target: dict, strip: str = '') -> dict:
  """Map a PyTorch state dict onto a Flax params tree by the project's naming rule (test-side helper).

  `target`: the Flax params tree (shapes or arrays) to fill; every leaf must be covered and every key used.
  weight -> kernel (conv OIHW -> HWIO, conv1d [O, I, 1] -> dense [I, O], linear [O, I] -> [I, O]),
  scale (norms) or embedding (Embed); bias -> bias.
  """
  import numpy as np
  out: dict = {}
  for key, value in state_dict.items():
    if not key.startswith(strip):
      continue
    path, leaf = _flax_path(key[len(strip):])
    node_t, node_o = target, out
    for p in path:
      if p not in node_t:
        raise KeyError(f'{key}: no Flax module {p!r} (path {path})')
      node_t = node_t[p]
      node_o = node_o.setdefault(p, {})
    w = value.detach().cpu().numpy().astype(np.float32)
    if leaf == 'bias':
      name = 'bias'
    elif 'kernel' in node_t:
      name = 'kernel'
      if w.ndim == 4:
        w = w.transpose(2, 3, 1, 0)
      elif w.ndim == 3:
        w = w[..., 0].T
      elif w.ndim == 2:
        w = w.T
      w = w.reshape(node_t['kernel'].shape)
    elif 'scale' in node_t:
      name = 'scale'
    elif 'embedding' in node_t:
      name = 'embedding'
    else:
      raise KeyError(f'{key}: Flax module {path} has no weight-like parameter')
    if tuple(node_t[name].shape) != w.shape:
      raise ValueError(f'{key}: shape {w.shape} != Flax {tuple(node_t[name].shape)}')
    node_o[name] = w

  def check(t, o, where):
    for k, v in t.items():
      if k not in o:
        raise KeyError(f'Flax param {where}/{k} not set from the state dict')
      if isinstance(v, dict):
        check(v, o[k], f'{where}/{k}')
  check(target, out, '')
  return out
