"""Samples N images from a model directory with the jitted DDIM sampler: an .npz (arr_0 uint8 [N, H, W, C], as
the guided-diffusion evaluator reads it) and a PNG grid.

  python -m tcaq_jax.eval.sample --flagfile configs/sample_demo.flags
  python -m tcaq_jax.eval.sample --model_dir DIR --num_samples 50000 --steps 100 --skip_type quad --eta 0

Hook for quantized models: `generate(..., eps_fn_builder=f)` where f(model, params, config) returns the eps_fn
(a `jax.tree_util.Partial`, see tcaq_jax/diffusion/ddim.py). The full-precision builder is `make_eps_fn`.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.tree_util import Partial

from tcaq_jax.checkpoint import load_model_dir, quiet_orbax_logs
from tcaq_jax.diffusion.ddim import sampler_coefficients
from tcaq_jax.diffusion.host_sampler import make_sampler
from tcaq_jax.eval.digits import DEMO_UNET_DIR
from tcaq_jax.models.configs import build_model

__all__ = ['define_flags', 'load_model', 'make_eps_fn', 'make_decode_fn', 'sample_images', 'generate', 'to_uint8', 'save_npz',
           'save_grid']


def load_model(model_dir: str):
  """-> (flax module, params as jnp arrays, config) from a `save_model_dir` directory."""
  params, config = load_model_dir(model_dir)
  return build_model(config), jax.tree.map(jnp.asarray, params), config


def _ddim_eps(model, params, x, t, step_index, cond):
  del step_index, cond
  return model.apply({'params': params}, x, t)


def _ldm_eps(model, params, x, t, step_index, cond):
  del step_index
  return model.apply({'params': params}, x, t, y=cond)


def _ldm_decode(model, params, z):
  return model.apply({'params': params}, z, method='decode')


def make_eps_fn(model, params, config: dict | None = None) -> Partial:
  """The full-precision eps_fn(x, t, step_index, cond) for a DDIM UNet (cond ignored) or an LDM (cond = class
  labels y [B] int32, 1000 = unconditional). params are the Partial's traced leaves."""
  family = (config or getattr(model, 'config', {}) or {}).get('family', 'ddim')
  fn = _ldm_eps if family == 'ldm' else _ddim_eps
  return Partial(functools.partial(fn, model), params)


def make_decode_fn(model, params, config: dict) -> Partial | None:
  """LDM: latents -> images through the first stage; DDIM: None (x is the image)."""
  if config.get('family') != 'ldm':
    return None
  return Partial(functools.partial(_ldm_decode, model), params)


def to_uint8(x) -> np.ndarray:
  """[-1, 1] float -> uint8 exactly like the DDIM repo: clamp((x + 1) / 2, 0, 1) * 255 + 0.5, floored."""
  x01 = np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  return np.floor(x01 * 255.0 + 0.5).astype(np.uint8)


def sample_images(sampler: Any, num_samples: int, batch_size: int, seed: int = 0,
                  cond: Any = None, uncond: Any = None, progress: bool = True) -> np.ndarray:
  """uint8 [N, H, W, C]; sample i depends only on (seed, i). cond/uncond: arrays [N, ...] or None."""
  from tqdm import tqdm
  out = []
  starts = range(0, num_samples, batch_size)
  for start in tqdm(starts, desc='sampling', unit='batch', disable=not progress):
    bs = min(batch_size, num_samples - start)
    sl = slice(start, start + bs)
    c = None if cond is None else np.asarray(cond)[sl]
    u = None if uncond is None else np.asarray(uncond)[sl]
    res = sampler.sample(seed, start, bs, cond=c, uncond=u)
    out.append(to_uint8(res['images']))
  return np.concatenate(out)


def save_npz(path: str, images: np.ndarray) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, arr_0=images)


def save_grid(path: str, images: np.ndarray, nrow: int | None = None, pad: int = 1, scale: int = 1) -> None:
  """images: uint8 [N, H, W, C] (C 1 or 3) -> one PNG, nrow per row, `pad` black pixels between tiles."""
  from PIL import Image
  n, h, w, c = images.shape
  nrow = nrow or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / nrow))
  grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
  for k in range(n):
    r, q = divmod(k, nrow)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[k]
  img = Image.fromarray(grid[..., 0] if c == 1 else grid)
  if scale != 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)


def generate(model_dir: str, num_samples: int, batch_size: int, steps: int, skip_type: str, eta: float,
             seed: int, out_dir: str | None = None, eps_fn_builder: Callable | None = None,
             cond: Any = None, uncond: Any = None, guidance_scale: float = 1.0, grid: int = 64,
             progress: bool = True, sampler_loop: str = 'auto') -> np.ndarray:
  """Samples `num_samples` images; writes samples_{N}x{H}x{W}x{C}.npz and grid.png to out_dir when given.

  sampler_loop: 'device' (one jitted lax.scan, sharded over local devices), 'host' (a Python loop over one jitted
  step; much faster on XLA:CPU) or 'auto' (host on CPU, device otherwise). Both give the same images."""
  model, params, config = load_model(model_dir)
  builder = eps_fn_builder or make_eps_fn
  eps_fn = builder(model, params, config)
  coeffs = sampler_coefficients(config, steps, skip_type, eta)
  if config.get('family') == 'ldm':
    shape = tuple(config['latent_shape'])
  else:
    shape = (config['resolution'], config['resolution'], config['in_channels'])
  sampler = make_sampler(eps_fn, coeffs, shape, decode_fn=make_decode_fn(model, params, config),
                         guidance_scale=guidance_scale, loop=sampler_loop)
  t0 = time.time()
  images = sample_images(sampler, num_samples, batch_size, seed, cond, uncond, progress)
  logging.info('%d samples in %.1f s (%d steps, %s, eta %g)', num_samples, time.time() - t0, coeffs.num_steps,
               skip_type, eta)
  if out_dir:
    n, h, w, c = images.shape
    save_npz(os.path.join(out_dir, f'samples_{n}x{h}x{w}x{c}.npz'), images)
    save_grid(os.path.join(out_dir, 'grid.png'), images[:grid], scale=max(1, 128 // w))
  return images


def define_flags() -> None:
  """The sampling flags (defined only by entry points, so importing this module defines none)."""
  flags.DEFINE_string('model_dir', DEMO_UNET_DIR, 'model dir (save_model_dir format); default: the demo UNet')
  flags.DEFINE_integer('num_samples', 64, 'number of samples')
  flags.DEFINE_integer('batch_size', 64, 'global batch size (split over local devices)')
  flags.DEFINE_integer('steps', 100, 'DDIM steps')
  flags.DEFINE_enum('skip_type', 'quad', ['uniform', 'quad'], 'step sequence')
  flags.DEFINE_float('eta', 0.0, 'DDIM eta (0: deterministic, 1: DDPM posterior variance)')
  flags.DEFINE_integer('seed', 0, 'seed (sample i uses fold_in(PRNGKey(seed), i))')
  flags.DEFINE_string('out_dir', 'samples/demo', 'output directory')
  flags.DEFINE_string('quant_dir', None, 'sample the quantized model calibrated into this dir (the --out_dir of '
                      'tcaq_jax.train.calibrate); --model_dir must be the FP model it was calibrated from')
  flags.DEFINE_enum('sampler_loop', 'auto', ['auto', 'device', 'host'],
                    "'device': the trajectory is one jitted lax.scan (sharded over local devices); 'host': a Python "
                    "loop over one jitted step (XLA:CPU runs scan bodies ~20x slower); auto: host on CPU")


def main(argv):
  del argv
  quiet_orbax_logs()
  f = flags.FLAGS
  builder = None
  if f.quant_dir:
    from tcaq_jax.train.calibrate import load_quantized
    quantized = load_quantized(f.quant_dir)
    builder = lambda model, params, config: quantized.eps_fn
  generate(f.model_dir, f.num_samples, f.batch_size, f.steps, f.skip_type, f.eta, f.seed, f.out_dir,
           eps_fn_builder=builder, sampler_loop=f.sampler_loop)
  logging.info('wrote %s', f.out_dir)


if __name__ == '__main__':
  define_flags()
  app.run(main)
