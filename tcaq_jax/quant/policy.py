"""Which layer gets which quantizer: rules (regexes) matched on Flax module paths, like qwix's rules.

Works on any Flax linen module; imports nothing from the rest of tcaq_jax. Quantizable layers are found by
tracing one forward pass (`jax.eval_shape`, no compute) with `flax.linen.intercept_methods`:
  'conv'    : nn.Conv            weights (per output channel) and input activations (per tensor)
  'dense'   : nn.Dense           weights and input activations
  'matmul'  : QuantPoint(kind='matmul')   attention matmul operands (activation bit width)
  'softmax' : QuantPoint(kind='softmax')  post-Softmax probabilities (softmax bit width, DAQ)
A QuantPoint is any module whose class is named 'QuantPoint' and that has a `kind` attribute.

A rule sets some fields of the layers whose path (e.g. 'up_1/block_0/nin_shortcut') matches its regex
(`re.search`) and whose kind is in `kinds`; rules apply in order, later ones override earlier ones:
  Rule(pattern='conv_out$', weights=False, acts=False)          # keep FP
  Rule(pattern='.*', kinds=('softmax',), a_bits=8)               # post-Softmax bits
Presets (METHOD.md section 6):
  'qdiff' : every conv / linear (weights and inputs), attention operands at a_bits, post-Softmax at softmax_bits;
            the shortcut conv that eats a concatenated skip gets two activation quantizers split at the boundary.
  'tfmq'  : as qdiff, but the first time-embedding layer, input conv, output conv, shortcut and downsample convs
            and the attention matmuls (operands and probabilities) stay FP.
Override strings (flags): 'REGEX:SPEC' with SPEC tokens 'w<bits|fp>', 'a<bits|fp>' or 'fp', e.g.
'conv_out$:w8a8', 'temb:fp', 'attn_probs$:afp'.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

import flax.linen as nn
import jax

from tcaq_jax.quant.intercept import Call, collect_calls, module_path

__all__ = ['PolicyError', 'LayerInfo', 'LayerSpec', 'Rule', 'Policy', 'discover_layers', 'preset_rules',
           'parse_override', 'build_policy', 'PRESETS']

KINDS = ('conv', 'dense', 'matmul', 'softmax')
PRESETS = ('qdiff', 'tfmq')

# Shortcut convs whose input may be a concatenation (DDIM 'nin_shortcut', LDM 'skip_connection').
SHORTCUT_REGEX = r'(^|/)(nin_shortcut|skip_connection)$'
# TFMQ-DM keeps these FP (DDIM and LDM names).
_TFMQ_FP = (
    r'(^|/)temb/dense_0$', r'(^|/)time_embed_0$',                    # first time-embedding layer
    r'^conv_in$', r'(^|/)input_blocks_0_0$',                             # input conv
    r'^conv_out$', r'(^|/)out_2$',                                       # output conv
    r'(^|/)(nin_shortcut|skip_connection)$',                          # shortcuts
    r'(^|/)downsample/conv$', r'(^|/)op$',                           # downsample convs
)


class PolicyError(ValueError):
  """Bad rule, override string, preset name or bit width (the message names it)."""


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """A quantizable layer found by tracing. in_features: channels of its input (last axis)."""
  path: str
  kind: str
  in_features: int
  concat_split: int | None = None   # concat boundary of the parent block's input (None if none)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """How one layer is quantized. w_bits / a_bits None = FP. split: channel boundary of two act quantizers."""
  path: str
  kind: str
  in_features: int
  w_bits: int | None
  a_bits: int | None
  split: int | None = None

  @property
  def weights(self) -> bool:
    return self.w_bits is not None and self.kind in ('conv', 'dense')

  @property
  def acts(self) -> bool:
    return self.a_bits is not None

  @property
  def n_segments(self) -> int:
    return 2 if self.split else 1


@dataclasses.dataclass(frozen=True)
class Rule:
  """Sets fields on matching layers. None = leave unchanged.

  pattern: regex searched in the module path. kinds: restrict to these kinds (None = all).
  weights / acts: False turns weight / input-activation quantization off, True on (with the given or
  default bits). w_bits / a_bits: bit widths (imply on).
  """
  pattern: str = '.*'
  kinds: tuple | None = None
  weights: bool | None = None
  acts: bool | None = None
  w_bits: int | None = None
  a_bits: int | None = None

  def matches(self, info: LayerInfo) -> bool:
    if self.kinds is not None and info.kind not in self.kinds:
      return False
    return re.search(self.pattern, info.path) is not None

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    if d['kinds'] is not None:
      d['kinds'] = list(d['kinds'])
    return d

  @staticmethod
  def from_dict(d: dict) -> 'Rule':
    d = dict(d)
    if d.get('kinds') is not None:
      d['kinds'] = tuple(d['kinds'])
    return Rule(**d)


def _check_bits(bits, what):
  if bits is None:
    return None
  if not isinstance(bits, int) or not 2 <= bits <= 16:
    raise PolicyError(f'{what}: bit width must be an int in [2, 16], got {bits!r}')
  return bits


def _is_quant_point(m) -> bool:
  return type(m).__name__ == 'QuantPoint' and hasattr(m, 'kind')


def discover_layers(model: nn.Module, variables: Any, *args, method=None, **kwargs) -> list[LayerInfo]:
  """Quantizable layers in call order, found by tracing `model.apply(variables, *args, **kwargs)`.

  Uses `jax.eval_shape` (no FLOPs). A module called twice is listed once (first call).
  """
  def kind_of(m) -> str | None:
    if isinstance(m, nn.Conv):
      return 'conv'
    if isinstance(m, nn.Dense):
      return 'dense'
    if _is_quant_point(m):
      if m.kind not in ('matmul', 'softmax'):
        raise PolicyError(f'QuantPoint at {module_path(m)!r} has unknown kind {m.kind!r}')
      return m.kind
    return None

  def info(call: Call) -> LayerInfo:
    parent = call.module.parent
    split = getattr(parent, 'concat_split', None) if isinstance(parent, nn.Module) else None
    return LayerInfo(call.path, kind_of(call.module), int(call.args[0].shape[-1]), split)

  found: dict = {}

  def fwd(v, *a):
    out, rec = collect_calls(lambda: model.apply(v, *a, method=method, **kwargs),
                             select=lambda path, m: kind_of(m) is not None, record=info, need_args=True)
    found.update(rec)              # static metadata leaves the trace through this closure
    return out

  jax.eval_shape(fwd, variables, *args)
  return list(found.values())


def preset_rules(preset: str, w_bits: int, a_bits: int, softmax_bits: int = 8) -> list[Rule]:
  """The rules of a named preset ('qdiff' or 'tfmq') at the given bit widths."""
  _check_bits(w_bits, 'w_bits')
  _check_bits(a_bits, 'a_bits')
  _check_bits(softmax_bits, 'softmax_bits')
  rules = [
      Rule('.*', kinds=('conv', 'dense'), weights=True, acts=True, w_bits=w_bits, a_bits=a_bits),
      Rule('.*', kinds=('matmul',), weights=False, acts=True, a_bits=a_bits),
      Rule('.*', kinds=('softmax',), weights=False, acts=True, a_bits=softmax_bits),
  ]
  if preset == 'qdiff':
    return rules
  if preset == 'tfmq':
    rules += [Rule(p, weights=False, acts=False) for p in _TFMQ_FP]
    rules.append(Rule('.*', kinds=('matmul', 'softmax'), acts=False))
    return rules
  raise PolicyError(f'unknown policy preset {preset!r}; known: {list(PRESETS)}')


def parse_override(text: str) -> Rule:
  """'REGEX:SPEC' -> Rule. SPEC: 'fp' or tokens 'w<bits|fp>' / 'a<bits|fp>' (e.g. 'w8a8', 'wfp', 'a6')."""
  if ':' not in text:
    raise PolicyError(f'policy override {text!r}: expected REGEX:SPEC (e.g. "conv_out$:w8a8")')
  pattern, spec = text.rsplit(':', 1)
  try:
    re.compile(pattern)
  except re.error as e:
    raise PolicyError(f'policy override {text!r}: bad regex: {e}') from e
  spec = spec.strip().lower()
  if spec == 'fp':
    return Rule(pattern, weights=False, acts=False)
  fields = {}
  for tok in re.findall(r'[wa](?:fp|\d+)', spec):
    which, val = tok[0], tok[1:]
    if val == 'fp':
      fields['weights' if which == 'w' else 'acts'] = False
    else:
      fields['weights' if which == 'w' else 'acts'] = True
      fields['w_bits' if which == 'w' else 'a_bits'] = _check_bits(int(val), f'policy override {text!r}')
  if not fields or re.sub(r'[wa](?:fp|\d+)', '', spec):
    raise PolicyError(f'policy override {text!r}: SPEC must be "fp" or tokens w<bits|fp>, a<bits|fp>')
  return Rule(pattern, **fields)


@dataclasses.dataclass
class Policy:
  """A resolved policy: the layer specs (call order) plus the rules that produced them (for the report)."""
  layers: dict            # path -> LayerSpec, in call order
  rules: list             # list[Rule]
  preset: str = ''

  def spec(self, path: str) -> LayerSpec | None:
    return self.layers.get(path)

  def quantized(self) -> list[LayerSpec]:
    return [s for s in self.layers.values() if s.weights or s.acts]

  def summary(self) -> dict:
    """Counts per kind of quantized weights / activations (for logs and reports)."""
    out = {}
    for s in self.layers.values():
      d = out.setdefault(s.kind, {'layers': 0, 'w_quant': 0, 'a_quant': 0, 'split': 0})
      d['layers'] += 1
      d['w_quant'] += int(s.weights)
      d['a_quant'] += int(s.acts)
      d['split'] += int(bool(s.split))
    return out

  def to_dict(self) -> dict:
    return {'preset': self.preset, 'rules': [r.to_dict() for r in self.rules],
            'layers': [dataclasses.asdict(s) for s in self.layers.values()]}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @staticmethod
  def from_dict(d: dict) -> 'Policy':
    try:
      layers = {s['path']: LayerSpec(**s) for s in d['layers']}
      rules = [Rule.from_dict(r) for r in d.get('rules', [])]
    except (KeyError, TypeError) as e:
      raise PolicyError(f'policy dict is malformed: {e}') from e
    return Policy(layers=layers, rules=rules, preset=d.get('preset', ''))


def resolve(infos: Sequence[LayerInfo], rules: Sequence[Rule], split_regex: str = SHORTCUT_REGEX,
            preset: str = '') -> Policy:
  """Applies rules (in order) to discovered layers. Defaults: nothing quantized until a rule says so."""
  layers = {}
  for info in infos:
    wq, aq, wb, ab = False, False, None, None
    for r in rules:
      if not r.matches(info):
        continue
      if r.w_bits is not None:
        wb, wq = r.w_bits, True
      if r.a_bits is not None:
        ab, aq = r.a_bits, True
      if r.weights is not None:
        wq = r.weights
      if r.acts is not None:
        aq = r.acts
    if info.kind in ('matmul', 'softmax'):
      wq = False
    if wq and wb is None:
      raise PolicyError(f'layer {info.path!r}: weights switched on by a rule but no w_bits given')
    if aq and ab is None:
      raise PolicyError(f'layer {info.path!r}: activations switched on by a rule but no a_bits given')
    split = None
    if (aq and info.kind in ('conv', 'dense') and info.concat_split
        and re.search(split_regex, info.path) and 0 < info.concat_split < info.in_features):
      split = int(info.concat_split)
    layers[info.path] = LayerSpec(info.path, info.kind, info.in_features, wb if wq else None,
                                  ab if aq else None, split)
  return Policy(layers=layers, rules=list(rules), preset=preset)


def build_policy(model: nn.Module, variables: Any, example_args: Sequence, preset: str = 'qdiff',
                 w_bits: int = 4, a_bits: int = 8, softmax_bits: int = 8, overrides: Sequence[str] = (),
                 example_kwargs: dict | None = None, split_regex: str = SHORTCUT_REGEX) -> Policy:
  """Discovers the model's layers and resolves a preset plus override strings into a Policy."""
  infos = discover_layers(model, variables, *example_args, **(example_kwargs or {}))
  if not infos:
    raise PolicyError(f'{type(model).__name__} has no nn.Conv / nn.Dense / QuantPoint layers to quantize')
  rules = preset_rules(preset, w_bits, a_bits, softmax_bits) + [parse_override(o) for o in overrides]
  return resolve(infos, rules, split_regex, preset)
