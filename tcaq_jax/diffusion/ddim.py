"""The DDIM sampler: the whole trajectory is one jitted `lax.scan`; the model is a parameter.

The model function has the signature (docs/ARCHITECTURE.md)
    eps_fn(x, t, step_index, cond) -> eps
  x: [B, H, W, C] float32, t: [B] int32 model timesteps, step_index: int32 scalar (0 = first, noisiest step of
  the trajectory; quantizers index per-timestep state with it), cond: a pytree with a leading batch axis or None.
Pass it as a `jax.tree_util.Partial(fn, params, ...)` so that params are traced arguments of the jitted sampler
(not constants baked into the program) and the compiled sampler is reused while `fn` stays the same object;
a plain callable is wrapped (and then its closed-over arrays are constants).

One step (CompVis ddim.py p_sample_ddim == ermongroup functions/denoising.py generalized_steps):
  x0   = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
  x'   = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
Classifier-free guidance: eps = eps_u + s (eps_c - eps_u), evaluated as one call on the doubled batch
[uncond; cond] like LDM.

Randomness is per sample: sample i of a run with seed s uses key_i = fold_in(PRNGKey(s), i); x_T is drawn from
fold_in(key_i, 0) and the noise of step j from fold_in(key_i, j + 1). The images therefore depend only on
(seed, sample index), not on the batch size or the number of devices.

  coeffs = sampler_coefficients(config, num_steps=100, skip_type='quad', eta=0.0)
  sampler = DDIMSampler(eps_fn, coeffs, shape=(32, 32, 3))
  out = sampler.sample(seed=0, start=0, batch_size=64)        # out['images']: [64, 32, 32, 3] float32
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import Partial

from tcaq_jax.diffusion import sharding
from tcaq_jax.diffusion.schedules import (DDIMCoefficients, ddim_coefficients, ddim_timesteps,
                                          schedule_from_config)

__all__ = ['SamplerError', 'sampler_coefficients', 'sample_keys', 'initial_noise', 'ddim_step', 'ddim_trajectory',
           'DDIMSampler', 'as_partial']


class SamplerError(ValueError):
  """Bad sampler arguments (shapes, record steps, guidance without an unconditional input)."""


def sampler_coefficients(config: dict, num_steps: int, skip_type: str = 'uniform', eta: float = 0.0,
                         style: str | None = None) -> DDIMCoefficients:
  """DDIM constants for a model config. style defaults to the config's family ('ddim' or 'ldm')."""
  style = style or ('ldm' if config.get('family') == 'ldm' else 'ddim')
  alpha_bar = schedule_from_config(config)
  seq = ddim_timesteps(alpha_bar.shape[0], num_steps, skip_type, style)
  return ddim_coefficients(alpha_bar, seq, eta, style)


def sample_keys(seed: int, start: int, n: int) -> jax.Array:
  """Per-sample keys fold_in(PRNGKey(seed), i) for i in [start, start + n): uint32 [n, 2]."""
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + n, dtype=jnp.uint32))


def _per_sample_normal(keys, salt, shape):
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), shape, jnp.float32))(keys)


def initial_noise(keys, shape: Sequence[int]) -> jax.Array:
  """x_T: [n, *shape] standard normal, sample i from fold_in(keys[i], 0)."""
  return _per_sample_normal(keys, 0, tuple(shape))


def as_partial(fn: Callable | None) -> Partial | None:
  """A `Partial` (a pytree) for jit arguments; plain callables become static Partials."""
  if fn is None or isinstance(fn, Partial):
    return fn
  return Partial(fn)


def _concat(a, b):
  return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def ddim_step(eps_fn: Callable, x, keys, cond, uncond, i, t, a, a_prev, sigma, guidance_scale,
              use_noise: bool, use_guidance: bool):
  """One DDIM step from x_t (step index i, model timestep t, scalars a = alpha_bar_t, a_prev, sigma) -> x_prev.
  Shared by the scan sampler below and `tcaq_jax.diffusion.host_sampler.HostLoopSampler`."""
  b = x.shape[0]
  tt = jnp.full((b,), t, jnp.int32)
  if use_guidance:
    e = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([tt, tt]), i, _concat(uncond, cond))
    eps = e[:b] + guidance_scale * (e[b:] - e[:b])
  else:
    eps = eps_fn(x, tt, i, cond)
  eps = eps.astype(jnp.float32)
  x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
  x_next = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps
  if use_noise:
    x_next = x_next + sigma * _per_sample_normal(keys, i + 1, x.shape[1:])
  return x_next


def ddim_trajectory(eps_fn: Callable, consts: dict, x_T: jax.Array, keys: jax.Array | None = None,
                    cond: Any = None, uncond: Any = None, guidance_scale: float | jax.Array = 1.0,
                    record: str | Sequence[int] | None = None, use_noise: bool = True,
                    use_guidance: bool = False):
  """Runs the DDIM trajectory (traceable; `DDIMSampler` jits it).

  consts: {'timesteps' int32 [S], 'alphas', 'alphas_prev', 'sigmas' float32 [S]} in sampling order.
  x_T: [B, H, W, C]; keys: [B, 2] per-sample keys (needed when use_noise).
  record: None; 'all' (every step's input x_t, [S, B, H, W, C]); or a sequence of k step indices whose x_t go
  to a [k, B, H, W, C] buffer carried through the scan (the same values, less memory).
  Returns (x_final [B, H, W, C], recorded x_t or None).
  """
  S = consts['timesteps'].shape[0]
  B = x_T.shape[0]
  if isinstance(record, str) and record != 'all':
    raise SamplerError(f"record must be None, 'all' or step indices, got {record!r}")
  slots = None
  if record is not None and not isinstance(record, str):
    steps = [int(s) for s in record]
    if not steps or min(steps) < 0 or max(steps) >= S or len(set(steps)) != len(steps):
      raise SamplerError(f'record steps must be distinct indices in [0, {S}), got {steps}')
    slot_of = np.full((S,), -1, np.int32)
    slot_of[steps] = np.arange(len(steps), dtype=np.int32)
    slots = jnp.asarray(slot_of)

  def body(carry, inp):
    x, buf = carry
    i = inp['i']
    x_next = ddim_step(eps_fn, x, keys, cond, uncond, i, inp['t'], inp['a'], inp['a_prev'], inp['sigma'],
                       guidance_scale, use_noise, use_guidance)
    if slots is not None:
      slot = inp['slot']
      buf = lax.cond(slot >= 0, lambda b: lax.dynamic_update_index_in_dim(b, x, slot, 0), lambda b: b, buf)
    out = x if record == 'all' else None
    return (x_next, buf), out

  xs = {'i': jnp.arange(S, dtype=jnp.int32), 't': jnp.asarray(consts['timesteps'], jnp.int32),
        'a': jnp.asarray(consts['alphas'], jnp.float32), 'a_prev': jnp.asarray(consts['alphas_prev'], jnp.float32),
        'sigma': jnp.asarray(consts['sigmas'], jnp.float32)}
  buf0 = None
  if slots is not None:
    xs['slot'] = slots
    buf0 = jnp.zeros((len(record),) + x_T.shape, x_T.dtype)
  (x_final, buf), ys = lax.scan(body, (x_T, buf0), xs)
  return x_final, (ys if record == 'all' else buf)


def _consts(coeffs: DDIMCoefficients) -> dict:
  return {'timesteps': np.asarray(coeffs.timesteps, np.int32), 'alphas': np.asarray(coeffs.alphas, np.float32),
          'alphas_prev': np.asarray(coeffs.alphas_prev, np.float32),
          'sigmas': np.asarray(coeffs.sigmas, np.float32)}


@functools.partial(jax.jit, static_argnames=('shape', 'record', 'use_noise', 'use_guidance'))
def _run(eps_fn, decode_fn, consts, keys, cond, uncond, guidance_scale, *, shape, record, use_noise,
         use_guidance):
  x_T = initial_noise(keys, shape)
  x, rec = ddim_trajectory(eps_fn, consts, x_T, keys, cond, uncond, guidance_scale, record, use_noise,
                           use_guidance)
  images = decode_fn(x) if decode_fn is not None else x
  return {'images': images, 'x_final': x, 'x_T': x_T, 'recorded': rec}


class DDIMSampler:
  """Batched, sharded, seeded DDIM sampling.

  eps_fn: see the module docstring. coeffs: `DDIMCoefficients`. shape: (H, W, C) of x (latent shape for LDM).
  decode_fn: x_final [B, H, W, C] -> images (e.g. an LDM first stage); None keeps x.
  guidance_scale: classifier-free guidance scale s (1.0: none); `sample` then needs `uncond`.
  mesh: a 1-D 'batch' mesh (default: all local devices).
  """

  def __init__(self, eps_fn: Callable, coeffs: DDIMCoefficients, shape: Sequence[int],
               decode_fn: Callable | None = None, guidance_scale: float = 1.0, mesh=None):
    self.eps_fn = as_partial(eps_fn)
    self.decode_fn = as_partial(decode_fn)
    self.coeffs = coeffs
    self.shape = tuple(int(s) for s in shape)
    self.guidance_scale = float(guidance_scale)
    self.mesh = mesh if mesh is not None else sharding.batch_mesh()
    self.consts = sharding.replicate(_consts(coeffs), self.mesh)
    self.use_noise = bool(np.any(np.asarray(coeffs.sigmas) > 0))
    self._fns = sharding.replicate((self.eps_fn, self.decode_fn), self.mesh)

  @property
  def num_steps(self) -> int:
    return self.coeffs.num_steps

  def prepare(self, seed: int, start: int, batch_size: int, cond: Any = None, uncond: Any = None,
              record: str | Sequence[int] | None = None) -> tuple[tuple, dict]:
    """The (sharded) positional arguments and static keywords of the jitted sampler `_run` for one batch.

    `_run.lower(*args, **static).compile()` gives an executable (ahead-of-time compilation, bench/sample.py).
    """
    use_guidance = self.guidance_scale != 1.0
    if use_guidance and (uncond is None or cond is None):
      raise SamplerError(f'guidance_scale={self.guidance_scale} needs both cond and uncond')
    if not (record is None or isinstance(record, str)):
      record = tuple(int(s) for s in np.asarray(record).reshape(-1))
    padded = sharding.pad_to_multiple(batch_size, self.mesh.devices.size)
    keys = sample_keys(seed, start, padded)
    pad = lambda tree: jax.tree.map(
        lambda a: jnp.concatenate([jnp.asarray(a), jnp.repeat(jnp.asarray(a)[-1:], padded - batch_size, 0)])
        if padded != batch_size else jnp.asarray(a), tree)
    keys, cond, uncond = sharding.shard_batch((keys, pad(cond), pad(uncond)), self.mesh)
    eps_fn, decode_fn = self._fns
    args = (eps_fn, decode_fn, self.consts, keys, cond, uncond, jnp.float32(self.guidance_scale))
    static = {'shape': self.shape, 'record': record, 'use_noise': self.use_noise, 'use_guidance': use_guidance}
    return args, static

  def sample(self, seed: int, start: int, batch_size: int, cond: Any = None, uncond: Any = None,
             record: str | Sequence[int] | None = None) -> dict:
    """Samples indices [start, start + batch_size) of the run with `seed`.

    cond / uncond: pytrees with leading axis batch_size (or None). Returns numpy-convertible arrays:
    'images' (decoded), 'x_final', 'x_T' [B, ...] and 'recorded' (see `ddim_trajectory`; step axis first).
    """
    args, static = self.prepare(seed, start, batch_size, cond, uncond, record)
    out = _run(*args, **static)
    padded = args[3].shape[0]
    if padded != batch_size:
      out = {k: (None if v is None else v[:, :batch_size] if k == 'recorded' else v[:batch_size])
             for k, v in out.items()}
    return out
