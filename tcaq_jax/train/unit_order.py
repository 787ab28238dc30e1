"""Reconstruction unit order: forward call order (default) or PyTorch module registration order (Q-Diffusion).

Q-Diffusion reconstructs by walking `named_children()` recursively (scripts/sample_diffusion_ddim.py,
`recon_model`), i.e. in the order the DDIM `Model.__init__` registers its modules: temb, conv_in, down (per level:
all res blocks, then all attention blocks, then the downsample), mid (block_1, attn_1, block_2), up (levels 0 to 3:
`self.up.insert(0, up)` puts level 0 first although it runs last; per level blocks, attentions, upsample),
norm_out, conv_out. With asymmetric reconstruction (inputs from the partially quantized model) the order changes
what each unit sees. Paths of other families (LDM UNets register in call order) keep the call order.

  units = in_order(units, 'registration')
"""
from __future__ import annotations

import re
from typing import Sequence

__all__ = ['ORDERS', 'registration_key', 'in_order']

ORDERS = ('call', 'registration')
_TOP = {'temb': 0, 'conv_in': 1, 'down': 2, 'mid': 3, 'up': 4, 'norm_out': 5, 'conv_out': 6}
_IN_LEVEL = {'block': 0, 'attn': 1, 'downsample': 2, 'upsample': 2}


def _split(seg: str) -> tuple[str, int]:
  m = re.fullmatch(r'(.*?)_(\d+)', seg)
  return (m.group(1), int(m.group(2))) if m else (seg, -1)


def registration_key(path: str) -> tuple | None:
  """Sort key of a DDIM module path in registration order (None: not a DDIM path; keep its call position).
  'up_1/attn_0' -> (4, 1, 1, 0); 'mid/attn_1' -> (3,) (mid registers in call order)."""
  segs = path.split('/')
  top, level = _split(segs[0])
  if top not in _TOP:
    return None
  if top in ('down', 'up') and len(segs) > 1:
    name, index = _split(segs[1])
    return (_TOP[top], level, _IN_LEVEL.get(name, 3), index)
  return (_TOP[top],)


def in_order(units: Sequence, order: str = 'call') -> list:
  """units (objects with .path, in call order) in the given order; a stable sort, so units without a DDIM key
  (and ties, e.g. inside 'mid' or 'temb') keep their call order."""
  if order not in ORDERS:
    raise ValueError(f'unit order must be one of {ORDERS}, got {order!r}')
  units = list(units)
  if order == 'call':
    return units
  keys = [registration_key(u.path) for u in units]
  if any(k is None for k in keys):
    return units
  return [u for _, u in sorted(zip(keys, units), key=lambda kv: kv[0])]
