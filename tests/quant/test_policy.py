"""Quantization policy: layer discovery on Flax module paths, presets, overrides (tcaq_jax/quant/policy.py).

Expected layer sets are counted by hand from the DDIM UNet architecture (ddim_tiny: ch 32, ch_mult [1, 2],
1 res block per level, attention at 8x8), not from the code under test.
"""
import json

import jax
import jax.numpy as jnp
import pytest

from tcaq_jax.models.configs import build_model, get_config
from tcaq_jax.quant import policy as P


@pytest.fixture(scope='module')
def tiny():
  model = build_model(get_config('ddim_tiny'))
  x, t = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
  return model, variables, (x, t)


# 8 ResnetBlocks (down 2, mid 2, up 2 levels x 2), 4 AttnBlocks (down_1, mid, up_1 x 2).
RESBLOCKS = ['down_0/block_0', 'down_1/block_0', 'mid/block_1', 'mid/block_2', 'up_1/block_0', 'up_1/block_1',
             'up_0/block_0', 'up_0/block_1']
ATTN = ['down_1/attn_0', 'mid/attn_1', 'up_1/attn_0', 'up_1/attn_1']
SHORTCUTS = ['down_1/block_0/nin_shortcut', 'up_1/block_0/nin_shortcut', 'up_1/block_1/nin_shortcut',
             'up_0/block_0/nin_shortcut', 'up_0/block_1/nin_shortcut']


def expected_layers():
  conv = {'conv_in', 'conv_out', 'down_0/downsample/conv', 'up_1/upsample/conv', *SHORTCUTS}
  conv |= {f'{b}/{n}' for b in RESBLOCKS for n in ('conv1', 'conv2')}
  conv |= {f'{a}/{n}' for a in ATTN for n in ('q', 'k', 'v', 'proj_out')}
  dense = {'temb/dense_0', 'temb/dense_1'} | {f'{b}/temb_proj' for b in RESBLOCKS}
  matmul = {f'{a}/{n}' for a in ATTN for n in ('qk_q', 'qk_k', 'av_v')}
  softmax = {f'{a}/attn_probs' for a in ATTN}
  return conv, dense, matmul, softmax


def test_discover_finds_every_layer_with_its_kind(tiny):
  model, variables, args = tiny
  infos = P.discover_layers(model, variables, *args)
  by_kind = {}
  for i in infos:
    by_kind.setdefault(i.kind, set()).add(i.path)
  conv, dense, matmul, softmax = expected_layers()
  assert by_kind == {'conv': conv, 'dense': dense, 'matmul': matmul, 'softmax': softmax}
  assert infos[0].path == 'temb/dense_0' and infos[-1].path == 'conv_out'     # call order
  d = {i.path: i for i in infos}
  assert d['conv_in'].in_features == 3 and d['temb/dense_0'].in_features == 32
  # up_1/block_0 eats concat([h (64), skip (64)]); up_0/block_1 concat([h (32), skip (32)]).
  assert d['up_1/block_0/nin_shortcut'].concat_split == 64 and d['up_1/block_0/nin_shortcut'].in_features == 128
  assert d['up_0/block_1/nin_shortcut'].concat_split == 32
  assert d['down_1/block_0/nin_shortcut'].concat_split is None


def test_qdiff_preset_quantizes_everything_and_splits_concat_shortcuts(tiny):
  model, variables, args = tiny
  pol = P.build_policy(model, variables, args, 'qdiff', w_bits=4, a_bits=6, softmax_bits=8)
  conv, dense, matmul, softmax = expected_layers()
  for path in conv | dense:
    s = pol.layers[path]
    assert (s.w_bits, s.a_bits) == (4, 6), path
  for path in matmul:
    assert (pol.layers[path].w_bits, pol.layers[path].a_bits) == (None, 6)
  for path in softmax:
    assert (pol.layers[path].w_bits, pol.layers[path].a_bits) == (None, 8)
  split = {p for p, s in pol.layers.items() if s.split}
  assert split == set(SHORTCUTS[1:])                       # the 4 up-path shortcuts, not the down one
  assert pol.layers['up_1/block_0/conv1'].split is None    # conv1 sees the normalised concat: one quantizer


def test_tfmq_preset_keeps_listed_layers_fp(tiny):
  model, variables, args = tiny
  pol = P.build_policy(model, variables, args, 'tfmq', w_bits=4, a_bits=8)
  conv, dense, matmul, softmax = expected_layers()
  fp = {'temb/dense_0', 'conv_in', 'conv_out', 'down_0/downsample/conv', *SHORTCUTS} | matmul | softmax
  for path, s in pol.layers.items():
    if path in fp:
      assert not s.weights and not s.acts, path
    else:
      assert s.weights and s.acts, path
  summary = pol.summary()
  assert summary['conv']['w_quant'] == len(conv) - 8 and summary['dense']['w_quant'] == len(dense) - 1


def test_overrides_apply_in_order(tiny):
  model, variables, args = tiny
  pol = P.build_policy(model, variables, args, 'qdiff', 4, 4,
                       overrides=['conv_out$:w8a8', r'^temb/:fp', 'attn_probs$:afp', 'up_0/block_1/conv2$:wfp'])
  assert (pol.layers['conv_out'].w_bits, pol.layers['conv_out'].a_bits) == (8, 8)
  assert not pol.layers['temb/dense_0'].acts and not pol.layers['temb/dense_1'].weights
  assert not pol.layers['mid/attn_1/attn_probs'].acts
  s = pol.layers['up_0/block_1/conv2']
  assert s.w_bits is None and s.a_bits == 4
  assert (pol.layers['conv_in'].w_bits, pol.layers['conv_in'].a_bits) == (4, 4)


@pytest.mark.parametrize('text', ['conv_out', 'conv_out$:w9x', 'conv_out$:', '(:w8', 'conv_out$:w1'])
def test_bad_override_names_the_string(text):
  with pytest.raises(P.PolicyError, match='override|bit width'):
    P.parse_override(text)


def test_bad_preset_and_bits():
  with pytest.raises(P.PolicyError, match='unknown policy preset'):
    P.preset_rules('nope', 4, 8)
  with pytest.raises(P.PolicyError, match='w_bits'):
    P.preset_rules('qdiff', 1, 8)


def test_policy_json_round_trip(tiny):
  model, variables, args = tiny
  pol = P.build_policy(model, variables, args, 'tfmq', 6, 6, overrides=['conv_out$:w8a8'])
  back = P.Policy.from_dict(json.loads(json.dumps(pol.to_dict())))
  assert back.layers == pol.layers and back.rules == pol.rules and back.preset == 'tfmq'
  assert list(back.layers) == list(pol.layers)
