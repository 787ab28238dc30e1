"""LDM UNet: published parameter counts, and parity with an independent PyTorch openaimodel (tests/torch_ref_ldm.py)
whose state dict (keys prefixed `model.diffusion_model.`) is mapped onto the Flax params by the naming rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax.models import ldm_layers
from tcaq_jax.models.configs import build_model, get_config
from tcaq_jax.models.ldm_configs import config_from_yaml
from tcaq_jax.models.ldm_unet import LDMUNet

PUBLISHED = {'ldm_lsun_bedrooms': 274_056_163, 'ldm_lsun_churches': 294_966_916, 'ldm_cin256_v2': 400_920_579}
TIMESTEPS = [0, 17, 500, 999]


def _unet_shapes(config, batch=1):
  h, w, c = config['latent_shape']
  ctx_dim = config['unet'].get('context_dim')
  ctx = jnp.zeros((batch, 1, ctx_dim)) if ctx_dim else None
  return jax.eval_shape(LDMUNet(config['unet']).init, jax.random.PRNGKey(0), jnp.zeros((batch, h, w, c)),
                        jnp.zeros((batch,), jnp.int32), ctx)['params']


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_parameter_counts(name):
  shapes = _unet_shapes(get_config(name))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == PUBLISHED[name]


def test_param_paths_follow_checkpoint_names():
  p = _unet_shapes(get_config('ldm_tiny_kl'))
  assert p['input_blocks_1_0']['in_layers_2']['kernel'].shape == (3, 3, 32, 32)
  assert p['input_blocks_1_0']['emb_layers_1']['kernel'].shape == (128, 64)  # scale-shift: 2 * out
  assert set(p['time_embed_0']) == {'kernel', 'bias'} and 'time_embed_2' in p
  assert set(p['out_0']) == {'scale', 'bias'} and 'out_2' in p
  assert 'skip_connection' in p['output_blocks_0_0']
  q = _unet_shapes(get_config('ldm_tiny_cin'))
  tb = q['input_blocks_3_1']['transformer_blocks_0']
  assert set(tb) == {'attn1', 'attn2', 'ff', 'norm1', 'norm2', 'norm3'}
  assert set(tb['attn2']) == {'to_q', 'to_k', 'to_v', 'to_out_0'} and set(tb['attn2']['to_q']) == {'kernel'}
  assert tb['attn2']['to_k']['kernel'].shape == (64, 64)  # context_dim -> inner
  assert tb['ff']['net_0']['proj']['kernel'].shape == (64, 512) and 'net_2' in tb['ff']


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _torch_and_flax(config, seed=0, meta_init=False):
  """A randomised torch reference UNet and the Flax LatentDiffusion params mapped from its state dict.

  meta_init: build on the meta device (skips torch's default init; the weights are randomised anyway).
  """
  torch = pytest.importorskip('torch')
  from tests.models import torch_ref_ldm as ref
  if meta_init:
    with torch.device('meta'):
      tm = ref.UNetModel(**config['unet'])
    tm = tm.to_empty(device='cpu')
  else:
    tm = ref.UNetModel(**config['unet'])
  tm = ref.randomize_(tm.eval(), seed=seed)
  sd = {f'model.diffusion_model.{k}': v for k, v in tm.state_dict().items()}
  cond = config.get('cond_stage')
  if cond:
    g = torch.Generator().manual_seed(seed + 1)
    sd['cond_stage_model.embedding.weight'] = torch.randn(cond['n_classes'], cond['embed_dim'], generator=g)
  model = build_model(config)
  h, w, c = config['latent_shape']
  y = jnp.zeros((1,), jnp.int32) if cond else None
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, h, w, c)),
                          jnp.zeros((1,), jnp.int32), None, y)['params']
  params = {'diffusion_model': ref.state_dict_to_flax(sd, shapes['diffusion_model'], 'model.diffusion_model.')}
  if cond:
    params['cond_stage_model'] = ref.state_dict_to_flax(sd, shapes['cond_stage_model'], 'cond_stage_model.')
  assert sum(p.numel() for p in tm.parameters()) == sum(x.size for x in jax.tree.leaves(params['diffusion_model']))
  return tm, sd, model, params


def _inputs(config, batch, seed=1):
  h, w, c = config['latent_shape']
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, h, w, c)).astype(np.float32)
  t = np.array((TIMESTEPS * batch)[:batch], np.int32)
  y = rng.integers(0, 1001, size=batch).astype(np.int32) if config.get('cond_stage') else None
  return x, t, y


def _torch_eps(tm, sd, x, t, y):
  import torch
  with torch.no_grad():
    ctx = None
    if y is not None:
      ctx = torch.nn.functional.embedding(torch.from_numpy(y).long(), sd['cond_stage_model.embedding.weight'])
      ctx = ctx[:, None, :]
    out = tm(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t).long(), ctx)
  return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('name', ['ldm_tiny_vq', 'ldm_tiny_kl', 'ldm_tiny_cin'])
def test_tiny_unet_matches_torch_reference(name):
  config = get_config(name)
  tm, sd, model, params = _torch_and_flax(config)
  x, t, y = _inputs(config, batch=4)
  # The first stage is never called by __call__, so its params are not needed here.
  eps = jax.jit(model.apply)({'params': params}, jnp.asarray(x), jnp.asarray(t),
                             None, None if y is None else jnp.asarray(y))
  want = _torch_eps(tm, sd, x, t, y)
  assert eps.shape == want.shape
  assert _rel_err(eps, want) <= 1e-4


def test_single_block_apply_and_concat_split():
  """Blocks run alone through `method=` (block reconstruction) and match the torch block."""
  torch = pytest.importorskip('torch')
  config = get_config('ldm_tiny_kl')
  tm, _, model, params = _torch_and_flax(config)
  rng = np.random.default_rng(3)
  emb = rng.standard_normal((2, 128)).astype(np.float32)
  x = rng.standard_normal((2, 2, 2, 128)).astype(np.float32)  # output_blocks.0: h (64) ++ skip (64)
  got = model.apply({'params': params}, jnp.asarray(x), jnp.asarray(emb),
                    method=lambda m, a, e: m.diffusion_model.output_blocks[0][0](a, e))
  with torch.no_grad():
    want = tm.output_blocks[0][0](torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(emb))
  assert _rel_err(got, want.permute(0, 2, 3, 1).numpy()) <= 1e-5
  splits = model.apply({'params': params}, method=lambda m: [
      blk[0].concat_split for blk in m.diffusion_model.output_blocks])
  assert splits == [64, 64, 64, 64, 64, 32]
  # A whole sequential (ResBlock + attention + ResBlock-up) through ldm_layers.apply_layers.
  xs = rng.standard_normal((2, 2, 2, 128)).astype(np.float32)
  got = model.apply({'params': params}, jnp.asarray(xs), jnp.asarray(emb), method=lambda m, a, e:
                    ldm_layers.apply_layers(m.diffusion_model.output_blocks[1], a, e))
  with torch.no_grad():
    want = tm.output_blocks[1](torch.from_numpy(xs).permute(0, 3, 1, 2), torch.from_numpy(emb))
  assert got.shape == (2, 4, 4, 64)
  assert _rel_err(got, want.permute(0, 2, 3, 1).numpy()) <= 1e-5


def test_timestep_embedding_is_cos_then_sin():
  t = np.array([0, 3, 999])
  emb = np.asarray(ldm_layers.timestep_embedding(jnp.asarray(t), 8))
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  want = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  np.testing.assert_allclose(emb, want, atol=2e-4)


def test_config_from_yaml_matches_named_config():
  yaml_dict = {'model': {'params': {
      'linear_start': 0.0015, 'linear_end': 0.0155, 'timesteps': 1000, 'image_size': 32, 'channels': 4,
      'scale_factor': 0.22765929, 'cond_stage_config': '__is_unconditional__',
      'unet_config': {'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel', 'params': {
          'image_size': 32, 'in_channels': 4, 'out_channels': 4, 'model_channels': 192,
          'attention_resolutions': [1, 2, 4, 8], 'num_res_blocks': 2, 'channel_mult': [1, 2, 2, 4, 4],
          'num_heads': 8, 'use_scale_shift_norm': True, 'resblock_updown': True}},
      'first_stage_config': {'target': 'ldm.models.autoencoder.AutoencoderKL', 'params': {
          'embed_dim': 4, 'monitor': 'val/rec_loss', 'ddconfig': {
              'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
              'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0},
          'lossconfig': {'target': 'torch.nn.Identity'}}}}}}
  got = config_from_yaml(yaml_dict, name='ldm_lsun_churches')
  assert got == get_config('ldm_lsun_churches')
  cin = {'model': {'params': dict(yaml_dict['model']['params'])}}
  cin['model']['params']['cond_stage_config'] = {
      'target': 'ldm.modules.encoders.modules.ClassEmbedder', 'params': {'embed_dim': 512, 'key': 'class_label'}}
  got = config_from_yaml(cin)
  assert got['cond_stage'] == {'type': 'class', 'n_classes': 1000, 'embed_dim': 512}


@pytest.mark.slow
@pytest.mark.parametrize('name', ['ldm_lsun_churches', 'ldm_lsun_bedrooms', 'ldm_cin256_v2'])
def test_full_unet_matches_torch_reference(name):
  """Full-size UNet, one forward of batch 2 at t = 0 and 999 (eager Flax: no whole-graph compile).

  All three full configs run in CI (about a minute each on 2 cores).
  """
  config = get_config(name)
  tm, sd, model, params = _torch_and_flax(config, meta_init=True)
  x, _, y = _inputs(config, batch=2)
  t = np.array([0, 999], np.int32)
  eps = model.apply({'params': params}, jnp.asarray(x), jnp.asarray(t), None, None if y is None else jnp.asarray(y))
  assert _rel_err(eps, _torch_eps(tm, sd, x, t, y)) <= 1e-4
