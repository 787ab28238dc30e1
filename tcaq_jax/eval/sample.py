"""Samples N images from a model directory (or a calibrated run) with the DDIM sampler: an .npz (arr_0 uint8
[N, H, W, C], as the guided-diffusion evaluator reads it) and a PNG grid.

  python -m tcaq_jax.eval.sample --flagfile configs/sample_demo.flags
  python -m tcaq_jax.eval.sample --model_dir DIR --num_samples 50000 --steps 100 --skip_type quad --eta 0
  python -m tcaq_jax.eval.sample --quant_dir runs/calib/demo_tcaq_w4a8 --out_dir samples/demo_w4a8
  python -m tcaq_jax.eval.sample --quant_dir exports/demo_w8a8 --backend=int    # an exported dir (tcaq_jax.export)
  python -m tcaq_jax.eval.sample --model_dir models/ldm_cin256_v2 --class_labels 88,207 --guidance_scale 3

Class-conditional LDMs sample with class labels: --class_labels=random (default) draws them uniformly with the
sample seed (`models.family.cond_arrays`, as calibration does), a comma list (e.g. 88,207) is cycled over the
samples; the labels are written next to the images (the .npz's arr_1, guided-diffusion's class-conditional format).

Hook for other eps functions: `generate(..., eps_fn_builder=f)` where f(model, params, config) returns the eps_fn
(a `jax.tree_util.Partial`, see tcaq_jax/diffusion/ddim.py); the full-precision one is `models.family.eps_fn`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
from absl import flags, logging

from tcaq_jax import cli
from tcaq_jax.assets import DEMO_UNET_DIR
from tcaq_jax.checkpoint import quiet_orbax_logs
from tcaq_jax.diffusion.batched import sample_all
from tcaq_jax.diffusion.ddim import sampler_coefficients
from tcaq_jax.diffusion.host_sampler import make_sampler
from tcaq_jax.images import grid_scale, save_grid, save_npz, to_uint8
from tcaq_jax.models import family

__all__ = ['SampleError', 'define_flags', 'class_labels', 'sample_images', 'generate', 'sample_main']


class SampleError(ValueError):
  """Bad sampling flags, non-finite samples, or an output that would overwrite earlier samples."""


def _finite_uint8(images) -> np.ndarray:
  images = np.asarray(images)
  if not np.isfinite(images).all():
    bad = int((~np.isfinite(images.reshape(images.shape[0], -1))).any(axis=1).sum())
    raise SampleError(f'{bad} of {images.shape[0]} samples in a batch are not finite (NaN / Inf): the model or '
                      'its quantizer state is broken; nothing was written')
  return to_uint8(images)


def class_labels(config: dict, num_samples: int, seed: int, spec: str | None = 'random') -> tuple[Any, Any]:
  """(cond int32 [N], uncond int32 [N]) for a class-conditional model, (None, None) for others.

  spec: 'random' / None (labels drawn uniformly with `seed`, `family.cond_arrays`) or a comma list of class
  indices cycled over the N samples. uncond: the model's null label (classifier-free guidance)."""
  random = spec is None or str(spec).strip().lower() == 'random'
  if not family.has_cond(config):
    if not random:
      raise SampleError(f'--class_labels={spec!r}: {config.get("name")!r} is not class-conditional')
    return None, None
  cond, uncond = family.cond_arrays(config, num_samples, seed)
  if random:
    return cond, uncond
  n_classes = int(config['cond_stage']['n_classes']) - 1
  try:
    labels = [int(v) for v in str(spec).split(',')]
  except ValueError:
    raise SampleError(f"--class_labels={spec!r}: expected 'random' or comma-separated class indices") from None
  bad = [v for v in labels if not 0 <= v < n_classes]
  if bad:
    raise SampleError(f'--class_labels: {bad[0]} is not a class of {config.get("name")!r} (0 .. {n_classes - 1})')
  return np.resize(np.asarray(labels, np.int32), num_samples), uncond


def sample_images(sampler: Any, num_samples: int, batch_size: int, seed: int = 0,
                  cond: Any = None, uncond: Any = None, progress: bool = True) -> np.ndarray:
  """uint8 [N, H, W, C]; sample i depends only on (seed, i). cond/uncond: arrays [N, ...] or None.
  Raises SampleError when a sample is not finite."""
  if num_samples < 1 or batch_size < 1:
    raise SampleError(f'--num_samples={num_samples} and --batch_size={batch_size} must be >= 1')
  return sample_all(sampler, num_samples, batch_size, seed, cond, uncond, progress=progress, convert=_finite_uint8)


def generate(model_dir: str | None, num_samples: int, batch_size: int, steps: int, skip_type: str, eta: float,
             seed: int, out_dir: str | None = None, eps_fn_builder: Callable | None = None,
             cond: Any = None, uncond: Any = None, guidance_scale: float = 1.0, grid: int = 64,
             progress: bool = True, sampler_loop: str = 'auto', loaded: tuple | None = None,
             overwrite: bool = True) -> np.ndarray:
  """Samples `num_samples` images; writes samples_{N}x{H}x{W}x{C}.npz and grid.png to out_dir when given.

  The model comes from model_dir, or `loaded` = (model, params, config). sampler_loop: 'device' (one jitted
  lax.scan, sharded over local devices), 'host' (a Python loop over one jitted step; much faster on XLA:CPU) or
  'auto' (host on CPU, device otherwise). Both give the same images. overwrite=False refuses an out_dir that
  already holds samples (before sampling). A class-conditional model without `cond` samples labels drawn with
  `seed` (`class_labels`); the labels go into the .npz as arr_1."""
  model, params, config = loaded if loaded is not None else family.load(model_dir)
  if cond is None and family.has_cond(config):
    cond, uncond = class_labels(config, num_samples, seed)
  if out_dir and not overwrite:
    old = sorted(f for f in os.listdir(out_dir) if f.startswith('samples_') and f.endswith('.npz')) \
        if os.path.isdir(out_dir) else []
    if old:
      raise SampleError(f'--out_dir={out_dir!r} already holds {old[0]}: pass --overwrite or choose another '
                        '--out_dir')
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
    path = os.path.join(out_dir, f'samples_{n}x{h}x{w}x{c}.npz')
    if cond is None:
      save_npz(path, images)
    else:                          # guided-diffusion's class-conditional samples: arr_0 images, arr_1 labels
      os.makedirs(out_dir, exist_ok=True)
      np.savez(path, arr_0=images, arr_1=np.asarray(cond, np.int32))
    save_grid(os.path.join(out_dir, 'grid.png'), images[:grid], scale=grid_scale(w))
  return images


def define_flags() -> None:
  """The sampling flags (defined only by entry points, so importing this module defines none)."""
  flags.DEFINE_string('model_dir', None, 'model dir (save_model_dir format); default: the demo UNet, or with '
                      "--quant_dir the calibrated run's own weights (a given --model_dir must hold the same weights)")
  flags.DEFINE_integer('num_samples', 64, 'number of samples')
  flags.DEFINE_integer('batch_size', 64, 'global batch size (split over local devices)')
  flags.DEFINE_integer('steps', None, "DDIM steps (default 100; with --quant_dir: the run's, and no other is "
                       'accepted)')
  flags.DEFINE_enum('skip_type', None, ['uniform', 'quad'], "step sequence (default quad; with --quant_dir: the "
                    "run's)")
  flags.DEFINE_float('eta', None, "DDIM eta, 0: deterministic, 1: DDPM posterior variance (default 0; with "
                     "--quant_dir: the run's)")
  flags.DEFINE_integer('seed', 0, 'seed (sample i uses fold_in(PRNGKey(seed), i))')
  flags.DEFINE_string('out_dir', None, 'output directory (default: samples/<name of the model or run dir>)')
  flags.DEFINE_bool('overwrite', False, 'replace samples already in --out_dir')
  flags.DEFINE_string('quant_dir', None, 'sample the quantized model calibrated into this dir (the --out_dir of '
                      'tcaq_jax.train.calibrate)')
  flags.DEFINE_enum('backend', None, ['int', 'fake'], "--quant_dir holding an exported model "
                    "(tcaq_jax.export): 'int' runs its <= 8-bit conv / linear layers on integer kernels (default), "
                    "'fake' fake-quantizes; a calibration run dir samples with fake quant only")
  flags.DEFINE_string('class_labels', 'random', "class-conditional models: 'random' (uniform, drawn with --seed) "
                      'or comma-separated class indices cycled over the samples (e.g. 88,207)')
  flags.DEFINE_float('guidance_scale', None, 'classifier-free guidance scale of class-conditional models (1: none; '
                     "default: with --quant_dir the run's, else 1)")
  flags.DEFINE_enum('sampler_loop', 'auto', ['auto', 'device', 'host'],
                    "'device': the trajectory is one jitted lax.scan (sharded over local devices); 'host': a Python "
                    "loop over one jitted step (XLA:CPU runs scan bodies ~20x slower); auto: host on CPU")


def sample_main(f) -> str:
  """The CLI's work on parsed flag values `f` (absl FLAGS or any object with the same attributes); returns the
  out_dir it wrote."""
  builder, loaded, guidance = None, None, None
  steps, skip_type, eta = (100 if f.steps is None else f.steps, f.skip_type or 'quad',
                           0.0 if f.eta is None else f.eta)
  if f.quant_dir and os.path.isfile(os.path.join(f.quant_dir, 'manifest.json')):
    from tcaq_jax.export import load_exported
    from tcaq_jax.quantized import check_sampler_settings
    m = load_exported(f.quant_dir)
    steps, skip_type, eta = check_sampler_settings({'config': m.sampler}, f.steps, f.skip_type, f.eta, f.quant_dir)
    eps = m.eps_fn(f.backend or 'int')
    loaded, builder = (m.model, m.params, m.config), lambda model, params, config: eps
    guidance = m.sampler.get('guidance_scale')
  elif f.quant_dir:
    from tcaq_jax.quantized import RunDirError, check_sampler_settings, load_quantized, params_fingerprint
    if f.backend == 'int':
      raise SampleError(f'--backend=int needs an exported dir; {f.quant_dir!r} is a calibration run: export it '
                        'with `python -m tcaq_jax.export --run_dir RUN --out DIR`')
    q = load_quantized(f.quant_dir)
    steps, skip_type, eta = check_sampler_settings(q.meta, f.steps, f.skip_type, f.eta, f.quant_dir)
    if f.model_dir:
      model, params, config = family.load(f.model_dir)
      stored = q.meta.get('model_fingerprint')
      if stored is not None and params_fingerprint(params) != stored:
        raise RunDirError(f'--model_dir={f.model_dir!r} holds other weights than {f.quant_dir!r} was calibrated '
                          'from: drop --model_dir to use the run\'s own weights')
    loaded = (q.model, q.params, q.config)
    builder = lambda model, params, config: q.eps_fn
    guidance = q.meta.get('config', {}).get('guidance_scale')
  else:
    loaded = family.load(f.model_dir or DEMO_UNET_DIR)
  guidance = float(f.guidance_scale if f.guidance_scale is not None else guidance or 1.0)
  cond, uncond = class_labels(loaded[2], f.num_samples, f.seed, f.class_labels)
  if guidance != 1.0 and cond is None:
    raise SampleError(f'--guidance_scale={guidance}: {loaded[2].get("name")!r} is not class-conditional')
  source = f.quant_dir or f.model_dir or DEMO_UNET_DIR
  out_dir = f.out_dir or os.path.join('samples', os.path.basename(os.path.normpath(source)))
  generate(None, f.num_samples, f.batch_size, steps, skip_type, eta, f.seed, out_dir, eps_fn_builder=builder,
           cond=cond, uncond=uncond, guidance_scale=guidance, sampler_loop=f.sampler_loop, loaded=loaded,
           overwrite=f.overwrite)
  return out_dir


def main(argv):
  del argv
  quiet_orbax_logs()
  logging.info('wrote %s', sample_main(flags.FLAGS))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
