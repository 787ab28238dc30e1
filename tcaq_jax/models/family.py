"""Everything that depends on the model family ('ddim' pixel-space UNets, 'ldm' latent diffusion), in one place.

Callers above `models/` never test `config['family']` themselves; they ask here:
  model, params, config = load(model_dir)                    # validated against the model's param tree
  model, params, config = random_model('ddim_tiny', seed=0)  # named config, random weights
  (x, t), kwargs = example_inputs(config, batch=1)           # zeros of the right shapes (+ class labels)
  sample_shape(config)                                       # (H, W, C) of x (the latent shape for LDMs)
  eps = eps_fn(model, params, config)                        # FP eps_fn(x, t, step_index, cond) for the sampler
  dec = decode_fn(model, params, config)                     # latents -> images (None for pixel models)
  model_kwargs(config, cond)                                 # {'y': cond} for class-conditional LDMs
  cond, uncond = cond_arrays(config, n, seed)                # random class labels (+ null label) or (None, None)
  block_class_regex(config)                                  # reconstruction-unit classes
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from tcaq_jax.models import configs

__all__ = ['FamilyError', 'FAMILIES', 'BLOCK_CLASSES', 'family_of', 'load', 'random_model', 'abstract_params',
           'example_inputs', 'init_method', 'sample_shape', 'has_cond', 'model_kwargs', 'eps_fn', 'forward',
           'decode_fn', 'cond_arrays', 'block_class_regex']

FAMILIES = ('ddim', 'ldm')
# Classes of the modules that form one reconstruction unit (METHOD.md section 5).
BLOCK_CLASSES = {
    'ddim': r'^(ResnetBlock|AttnBlock)$',
    'ldm': r'^(ResBlock|AttentionBlock|SpatialTransformer)$',
}


class FamilyError(ValueError):
  """A config with an unknown family, or a model dir whose params do not fit its config."""


def family_of(config: dict) -> str:
  family = config.get('family')
  if family not in FAMILIES:
    raise FamilyError(f'config {config.get("name")!r} has unknown family {family!r} (expected one of {FAMILIES})')
  return family


def sample_shape(config: dict) -> tuple:
  """(H, W, C) of the sampler's x: the image for DDIM UNets, the latent for LDMs."""
  if family_of(config) == 'ldm':
    return tuple(config['latent_shape'])
  return (config['resolution'], config['resolution'], config['in_channels'])


def has_cond(config: dict) -> bool:
  """True for class-conditional LDMs (the forward takes class labels y)."""
  return family_of(config) == 'ldm' and bool(config.get('cond_stage'))


def model_kwargs(config: dict, cond) -> dict:
  return {'y': cond} if has_cond(config) else {}


def example_inputs(config: dict, batch: int = 1, abstract: bool = False) -> tuple[tuple, dict]:
  """((x [B, *sample_shape], t [B]), kwargs): zeros, or jax.ShapeDtypeStructs when abstract."""
  make = (lambda s, d: jax.ShapeDtypeStruct(s, d)) if abstract else (lambda s, d: jnp.zeros(s, d))
  x = make((batch,) + sample_shape(config), jnp.float32)
  t = make((batch,), jnp.int32)
  kwargs = {'y': make((batch,), jnp.int32)} if has_cond(config) else {}
  return (x, t), kwargs


def init_method(config: dict) -> str | None:
  """The `model.init` method that touches every parameter (LDM: UNet, embedder and first stage)."""
  return 'init_all' if family_of(config) == 'ldm' else None


def abstract_params(config: dict, model=None) -> dict:
  """The model's parameter tree as nested dicts of jax.ShapeDtypeStruct (no computation)."""
  model = configs.build_model(config) if model is None else model
  (x, t), _ = example_inputs(config, 1, abstract=True)
  method = init_method(config)
  kw = {'method': method} if method else {}
  return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, **kw), x, t)['params']


def load(directory: str):
  """(model, params as jnp float32, config) from a model dir written by `checkpoint.save_model_dir`.

  The stored tree must equal the model's exactly and hold only finite values: CheckpointError lists missing /
  unexpected / misshaped leaves and leaves with NaN or Inf.
  """
  from flax import traverse_util

  from tcaq_jax import checkpoint

  raw, config = checkpoint.load_model_dir(directory)
  model = configs.build_model(config)
  target = traverse_util.flatten_dict(abstract_params(config, model))
  got = traverse_util.flatten_dict(raw)
  problems = [f'missing {"/".join(p)}' for p in target if p not in got]
  problems += [f'unexpected {"/".join(p)}' for p in got if p not in target]
  problems += [f'{"/".join(p)}: stored {tuple(got[p].shape)}, model expects {tuple(s.shape)}'
               for p, s in target.items() if p in got and tuple(got[p].shape) != tuple(s.shape)]
  problems += [f'{"/".join(p)}: {int(np.size(got[p]) - np.isfinite(got[p]).sum())} non-finite values (NaN / Inf)'
               for p in target if p in got and not np.isfinite(got[p]).all()]
  if problems:
    more = f'; ... and {len(problems) - 40} more' if len(problems) > 40 else ''
    raise checkpoint.CheckpointError(f'{directory}: params unusable with model {config.get("name")!r}: '
                                     + '; '.join(problems[:40]) + more)
  params = traverse_util.unflatten_dict({p: jnp.asarray(got[p], jnp.float32) for p in target})
  return model, params, config


def random_model(name: str, seed: int = 0):
  """(model, params, config) of a named config with random weights (tests, benchmarks). For LDMs the first
  stage (decoder) is initialised too, with seed + 1."""
  config = configs.get_config(name)
  model = configs.build_model(config)
  args, kwargs = example_inputs(config, 1)
  params = model.init(jax.random.PRNGKey(seed), *args, **kwargs)['params']
  if family_of(config) == 'ldm':          # the first stage (decoder) is not touched by the eps forward
    dec = model.init(jax.random.PRNGKey(seed + 1), args[0], method='decode')['params']
    params = {**dec, **params}
  return model, jax.tree.map(jnp.asarray, params), config


def _eps(model, cond_kw, params, x, t, step_index, cond):
  del step_index
  return model.apply({'params': params}, x, t, **({'y': cond} if cond_kw else {}))


def eps_fn(model, params, config: dict) -> Partial:
  """The FP eps_fn(x, t, step_index, cond) of the DDIM sampler (cond: class labels [B] for conditional LDMs,
  ignored otherwise). params are the Partial's traced leaves."""
  return Partial(functools.partial(_eps, model, has_cond(config)), params)


def forward(model, config: dict):
  """fwd(params, x, t, step_index, cond) -> eps: the FP model as a function of its params (calibration)."""
  return functools.partial(_eps, model, has_cond(config))


def _decode(model, params, z):
  return model.apply({'params': params}, z, method='decode')


def decode_fn(model, params, config: dict) -> Partial | None:
  """LDM: latents -> images through the first stage; pixel-space models: None (x is the image)."""
  if family_of(config) != 'ldm':
    return None
  return Partial(functools.partial(_decode, model), params)


def cond_arrays(config: dict, n: int, seed: int) -> tuple[Any, Any]:
  """Class labels for class-conditional LDMs: (random classes int32 [n], the null label [n]); else (None, None)."""
  if not has_cond(config):
    return None, None
  ncls = int(config['cond_stage']['n_classes']) - 1
  rng = np.random.default_rng(seed)
  cond = rng.integers(0, ncls, n).astype(np.int32)
  uncond = np.full((n,), int(config.get('unconditional_label', ncls)), np.int32)
  return cond, uncond


def block_class_regex(config: dict) -> str:
  """Regex over module class names: the outermost matching modules are the reconstruction units."""
  return BLOCK_CLASSES[family_of(config)]
