"""Samples N images from a model directory (or a calibrated run) with the DDIM sampler: an .npz (arr_0 uint8
[N, H, W, C], as the guided-diffusion evaluator reads it) and a PNG grid.

  python -m tcaq_jax.eval.sample --flagfile configs/sample_demo.flags
  python -m tcaq_jax.eval.sample --model_dir DIR --num_samples 50000 --steps 100 --skip_type quad --eta 0
  python -m tcaq_jax.eval.sample --quant_dir runs/calib/demo_tcaq_w4a8 --out_dir samples/demo_w4a8

Hook for other eps functions: `generate(..., eps_fn_builder=f)` where f(model, params, config) returns the eps_fn
(a `jax.tree_util.Partial`, see tcaq_jax/diffusion/ddim.py); the full-precision one is `models.family.eps_fn`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
from absl import app, flags, logging

from tcaq_jax.assets import DEMO_UNET_DIR
from tcaq_jax.checkpoint import quiet_orbax_logs
from tcaq_jax.diffusion.batched import sample_all
from tcaq_jax.diffusion.ddim import sampler_coefficients
from tcaq_jax.diffusion.host_sampler import make_sampler
from tcaq_jax.images import grid_scale, save_grid, save_npz, to_uint8
from tcaq_jax.models import family

__all__ = ['define_flags', 'sample_images', 'generate']


def sample_images(sampler: Any, num_samples: int, batch_size: int, seed: int = 0,
                  cond: Any = None, uncond: Any = None, progress: bool = True) -> np.ndarray:
  """uint8 [N, H, W, C]; sample i depends only on (seed, i). cond/uncond: arrays [N, ...] or None."""
  return sample_all(sampler, num_samples, batch_size, seed, cond, uncond, progress=progress, convert=to_uint8)


def generate(model_dir: str, num_samples: int, batch_size: int, steps: int, skip_type: str, eta: float,
             seed: int, out_dir: str | None = None, eps_fn_builder: Callable | None = None,
             cond: Any = None, uncond: Any = None, guidance_scale: float = 1.0, grid: int = 64,
             progress: bool = True, sampler_loop: str = 'auto') -> np.ndarray:
  """Samples `num_samples` images; writes samples_{N}x{H}x{W}x{C}.npz and grid.png to out_dir when given.

  sampler_loop: 'device' (one jitted lax.scan, sharded over local devices), 'host' (a Python loop over one jitted
  step; much faster on XLA:CPU) or 'auto' (host on CPU, device otherwise). Both give the same images."""
  model, params, config = family.load(model_dir)
  builder = eps_fn_builder or family.eps_fn
  eps_fn = builder(model, params, config)
  coeffs = sampler_coefficients(config, steps, skip_type, eta)
  sampler = make_sampler(eps_fn, coeffs, family.sample_shape(config),
                         decode_fn=family.decode_fn(model, params, config), guidance_scale=guidance_scale,
                         loop=sampler_loop)
  t0 = time.time()
  images = sample_images(sampler, num_samples, batch_size, seed, cond, uncond, progress)
  logging.info('%d samples in %.1f s (%d steps, %s, eta %g)', num_samples, time.time() - t0, coeffs.num_steps,
               skip_type, eta)
  if out_dir:
    n, h, w, c = images.shape
    save_npz(os.path.join(out_dir, f'samples_{n}x{h}x{w}x{c}.npz'), images)
    save_grid(os.path.join(out_dir, 'grid.png'), images[:grid], scale=grid_scale(w))
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
    from tcaq_jax.quantized import load_quantized
    quantized = load_quantized(f.quant_dir)
    builder = lambda model, params, config: quantized.eps_fn
  generate(f.model_dir, f.num_samples, f.batch_size, f.steps, f.skip_type, f.eta, f.seed, f.out_dir,
           eps_fn_builder=builder, sampler_loop=f.sampler_loop)
  logging.info('wrote %s', f.out_dir)


if __name__ == '__main__':
  define_flags()
  app.run(main)
