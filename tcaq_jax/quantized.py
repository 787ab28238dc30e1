"""A quantized model: its eps_fn for the sampler, and loading one from a calibration run dir.

Below both `train/` (which writes run dirs) and `eval/` (which samples from them):
  q = load_quantized('runs/calib/demo_tcaq_w4a8')     # latest checkpoint of a `tcaq_jax.train.calibrate` run
  model, params, qstate, policy, eps_fn = q            # also q.config (model config) and q.meta
  eps = quant_eps_fn(model, params, qstate, policy, config)   # eps_fn(x, t, step_index, cond), hard rounding,
                                                               # less qstate.out_bias[step_index] when set
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from tcaq_jax import checkpoint
from tcaq_jax.models import configs, family
from tcaq_jax.quant.apply import correct_output, quantized_apply
from tcaq_jax.quant.policy import Policy
from tcaq_jax.quant.state import QState, from_tree

__all__ = ['RunDirError', 'QuantizedModel', 'params_fingerprint', 'check_sampler_settings', 'quant_forward',
           'quant_eps_fn', 'load_quantized']


class RunDirError(checkpoint.CheckpointError):
  """A directory is not (or not yet) a calibration output, or does not fit what it is used with."""


def params_fingerprint(params) -> str:
  """SHA-256 (hex, first 16 digits) over the params' paths, dtypes, shapes and bytes: the identity of a model's
  weights, recorded in a run dir so that a resume or a sampling run with other weights is refused."""
  import hashlib

  import numpy as np
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def check_sampler_settings(meta: dict, steps: int | None, skip_type: str | None, eta: float | None,
                           where: str) -> tuple[int, str, float]:
  """The sampler settings a run was calibrated for (its per-step activation scales index those steps); given
  values must equal them (RunDirError otherwise); None takes the run's. Returns (steps, skip_type, eta)."""
  cfg = meta.get('config', {})
  want = (cfg.get('num_steps'), cfg.get('skip_type'), cfg.get('eta'))
  if None in want:
    raise RunDirError(f'{where}: the run records no sampler settings (num_steps / skip_type / eta)')
  got = tuple(w if g is None else g for g, w in zip((steps, skip_type, eta), want))
  if (int(got[0]), str(got[1]), float(got[2])) != (int(want[0]), str(want[1]), float(want[2])):
    raise RunDirError(f'{where} was calibrated for --steps={want[0]} --skip_type={want[1]} --eta={want[2]}, '
                      f'asked for --steps={got[0]} --skip_type={got[1]} --eta={got[2]}: its per-step '
                      'activation scales only fit the calibrated steps')
  return int(want[0]), str(want[1]), float(want[2])


def _q_eps(model, policy, cond_kw, params, qstate, x, t, step_index, cond):
  eps = quantized_apply(model, {'params': params}, qstate, policy, x, t, step_index=step_index,
                        weight_mode='hard', **({'y': cond} if cond_kw else {}))
  return correct_output(eps, qstate, step_index)          # --eps_bias (QState.out_bias; None: unchanged)


def quant_forward(model, policy, config: dict):
  """fwd((params, qstate), x, t, step_index, cond) -> eps of the quantized model (hard rounding)."""
  fn = functools.partial(_q_eps, model, policy, family.has_cond(config))
  return lambda consts, x, t, s, c: fn(consts[0], consts[1], x, t, s, c)


def quant_eps_fn(model, params, qstate: QState, policy, config: dict, like: Partial | None = None) -> Partial:
  """eps_fn(x, t, step_index, cond) of the quantized model (hard rounding) for the DDIM sampler; params and
  qstate are the Partial's traced leaves. like: an earlier result for the same model and policy, whose function
  object is reused so that jitted samplers see the same structure and reuse their compiled step."""
  fn = like.func if like is not None else functools.partial(_q_eps, model, policy, family.has_cond(config))
  return Partial(fn, params, qstate)


@dataclasses.dataclass
class QuantizedModel:
  model: Any
  params: Any
  qstate: QState
  policy: Policy
  eps_fn: Partial
  config: dict
  meta: dict

  def __iter__(self):
    return iter((self.model, self.params, self.qstate, self.policy, self.eps_fn))


FP_MODEL_DIR = 'fp_model'        # a calibration run's FP params, written once (train.calib_state.save_state)


def _fp_params(out_dir: str, meta: dict):
  """The FP params of an unfinished run: its steps hold none; they are in out_dir/fp_model, written once."""
  import os
  fp_dir = os.path.join(out_dir, FP_MODEL_DIR)
  try:
    params, _ = checkpoint.load_model_dir(fp_dir)
  except checkpoint.CheckpointError as e:
    raise RunDirError(f'{out_dir!r}: its latest step holds no params and {fp_dir!r} cannot be read ({e})') from e
  want = meta.get('model_fingerprint')
  if want is not None and params_fingerprint(params) != want:
    raise RunDirError(f'{fp_dir!r} holds other weights than the run was calibrated from (fingerprint '
                      f'{params_fingerprint(params)}, the run records {want})')
  return params


def load_quantized(out_dir: str) -> QuantizedModel:
  """Rebuilds a calibrated model from its run dir (latest checkpoint): unpacks as
  (model, params, qstate, policy, eps_fn); also has .config (model config) and .meta."""
  ck = checkpoint.restore(out_dir)
  meta = ck['meta'] or {}
  if 'model_config' not in meta or 'policy' not in meta or ck['qstate'] is None:
    raise RunDirError(f'{out_dir!r} is not a calibration output (no model_config / policy / qstate)')
  mconfig = meta['model_config']
  model = configs.build_model(mconfig)
  params = jax.tree.map(jnp.asarray, ck['params'] if ck['params'] is not None else _fp_params(out_dir, meta))
  qstate = from_tree(ck['qstate'])
  policy = Policy.from_dict(meta['policy'])
  eps_fn = quant_eps_fn(model, params, qstate, policy, mconfig)
  if not meta.get('progress', {}).get('done'):
    logging.warning('%s: calibration not finished (progress %s); using its latest state', out_dir,
                    meta.get('progress'))
  return QuantizedModel(model, params, qstate, policy, eps_fn, mconfig, meta)
