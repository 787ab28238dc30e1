"""Post-training quantization of a diffusion UNet: TCAQ-DM (TCR + DAQ + BRECQ/AdaRound + PAR) and baselines.

  python -m tcaq_jax.train.calibrate                                   # the shipped digits demo at W4A8
  python -m tcaq_jax.train.calibrate --flagfile configs/cifar10_w4a8.flags

Pipeline (METHOD.md): load the FP model -> calibration set (loaded or captured in one sampling pass) -> policy
-> initialisation (TCR ratios, DAQ, weight Lp search, per-step activation percentile search) -> BRECQ block
reconstruction with AdaRound (inputs from the partially quantized model, targets from FP) -> PAR rounds
(recapture the calibration set with the quantized model, re-search activation scales, reconstruct again).
After initialisation and after every unit, `out_dir` gets an orbax checkpoint (params, quantizer state, meta =
config + policy + progress + report); re-running with the same out_dir resumes from the last one.
Outputs: out_dir/report.json (per-unit losses, timings, policy, bits), out_dir/samples.png.

CPU note: XLA:CPU runs convolutions inside while-loop bodies (lax.scan / fori_loop) ~20x slower than at top level,
so on CPU the reconstruction chunk and the sampler run as host loops over one jitted step (--recon_loop,
--sampler_loop; 'device' = one lax.fori_loop / lax.scan, the default on accelerators).

Methods: tcaq (default), qdiff (BRECQ + LSQ-learned activation scales; no TCR / DAQ / PAR / per-step scales),
minmax (min-max PTQ, no reconstruction). --tcr/--daq/--par/--act_per_step/--learn_act_scale override a
method's defaults (ablations).

Programmatic use: `run(CalibConfig(...))`; `load_quantized(out_dir)` rebuilds a quantized model and its eps_fn.
Flags are defined only when this file runs as a program (importing it defines none).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from tcaq_jax import checkpoint
from tcaq_jax.diffusion.capture import CalibData
from tcaq_jax.diffusion.ddim import sampler_coefficients
from tcaq_jax.models.configs import build_model, get_config
from tcaq_jax.quant.apply import qstate_from_tree, qstate_to_tree, quantized_apply
from tcaq_jax.quant.policy import Policy, build_policy
from tcaq_jax.train import act_search, blocks, init as qinit, par, recon

__all__ = ['CalibConfig', 'CalibrationError', 'METHOD_DEFAULTS', 'resolve_config', 'run', 'load_quantized',
           'QuantizedModel', 'make_quant_eps_fn']

METHOD_DEFAULTS = {
    'tcaq': dict(tcr=True, daq=True, par=True, act_per_step=True, learn_act_scale=False, weight_init='lp',
                 reconstruct=True),
    'qdiff': dict(tcr=False, daq=False, par=False, act_per_step=False, learn_act_scale=True, weight_init='lp',
                  reconstruct=True),
    'minmax': dict(tcr=False, daq=False, par=False, act_per_step=False, learn_act_scale=False,
                   weight_init='minmax', reconstruct=False),
}
# Config fields that may change between a run and its resumption.
_RESUMABLE = ('out_dir', 'png_samples', 'debug_stop_after_unit', 'debug_nan_unit', 'debug_nan_iter', 'chunk',
              'forward_batch', 'capture_batch', 'sampler_loop', 'recon_loop', 'eval_units')


class CalibrationError(RuntimeError):
  """The calibration cannot proceed (bad flag combination, incompatible out_dir, non-finite loss, ...)."""


@dataclasses.dataclass
class CalibConfig:
  """Every option of the pipeline (each is also a flag of the same name). None = the method's default."""
  # model
  model_dir: str = ''                 # converted model dir; '' and no model_config: the shipped demo UNet
  model_config: str = ''              # named config with random weights (tests, benchmarks)
  out_dir: str = ''                   # '' -> runs/calib/<model>_<method>_w<w>a<a>
  seed: int = 0
  # sampler (calibration capture, PAR recapture, the sample grid)
  num_steps: int = 100
  skip_type: str = 'quad'
  eta: float = 0.0
  guidance_scale: float = 1.0
  sampler_loop: str = 'auto'          # 'device': one lax.scan; 'host': Python loop over a jitted step; auto: host on CPU
  # calibration data
  calib_dir: str = ''                 # an existing capture (tcaq_jax.diffusion.capture); '' -> capture one
  calib_steps: int = 20
  calib_samples: int = 256
  capture_batch: int = 64
  forward_batch: int = 64
  recon_samples: int = 0              # reconstruction set size (random subset); 0 = all
  recon_units: str = ''               # regex: reconstruct only units whose path matches ('' = all)
  # policy and bits
  method: str = 'tcaq'
  preset: str = 'qdiff'
  policy_override: tuple = ()
  w_bits: int = 4
  a_bits: int = 8
  softmax_bits: int = 8
  # TCAQ components (None = method default)
  tcr: bool | None = None
  daq: bool | None = None
  par: bool | None = None
  act_per_step: bool | None = None
  learn_act_scale: bool | None = None
  r_tru: float = -1.0                 # TCR truncation R_tru; 0 = none; -1 = paper default (3 at W4A8, else none)
  tcr_target: str = 'min'
  tcr_dense: bool = True              # TCR also on linear layers (else conv only)
  daq_log_kind: str = 'log2'
  act_batch: int = 64
  act_pcts: tuple = act_search.DEFAULT_PCTS
  # reconstruction
  recon_iters: int = 20000
  par_iters: int = 10000
  par_rounds: int = 2
  par_research_act: bool = True
  iters_scale: float = 1.0
  recon_batch: int = 16
  lam: float = 0.01
  lr: float = 1e-3
  act_lr: float = 4e-5
  warmup: float = 0.2
  b_start: float = 20.0
  b_end: float = 2.0
  chunk: int = 1000
  eval_units: bool = True             # block MSE before / after each reconstruction (report)
  recon_loop: str = 'auto'            # 'device': chunk = one lax.fori_loop; 'host': loop over a jitted step
  # outputs
  png_samples: int = 16
  # test hooks
  debug_stop_after_unit: int = -1     # raise after saving unit k (round 0): simulates a kill
  debug_nan_unit: int = -1            # inject a NaN into unit k's loss (round 0) at iteration debug_nan_iter
  debug_nan_iter: int = 0


class _StopForTest(RuntimeError):
  """Raised by the debug_stop_after_unit hook."""


def resolve_config(cfg: CalibConfig) -> dict:
  """The config as a dict with method defaults filled in (tri-state components resolved)."""
  if cfg.method not in METHOD_DEFAULTS:
    raise CalibrationError(f'--method={cfg.method!r}: expected one of {sorted(METHOD_DEFAULTS)}')
  d = dataclasses.asdict(cfg)
  d['policy_override'] = list(d['policy_override'])
  d['act_pcts'] = [float(p) for p in d['act_pcts']]
  md = METHOD_DEFAULTS[cfg.method]
  for k in ('tcr', 'daq', 'par', 'act_per_step', 'learn_act_scale'):
    if d[k] is None:
      d[k] = md[k]
  if d['r_tru'] < 0:
    d['r_tru'] = 3.0 if (d['w_bits'], d['a_bits']) == (4, 8) else 0.0
  d['weight_init'] = md['weight_init']
  d['reconstruct'] = md['reconstruct']
  if cfg.method == 'minmax':
    d['act_pcts'] = [100.0]
  if d['learn_act_scale'] and not d['reconstruct']:
    d['learn_act_scale'] = False
  for name in ('w_bits', 'a_bits', 'softmax_bits'):
    if not 2 <= d[name] <= 16:
      raise CalibrationError(f'--{name}={d[name]}: expected 2..16')
  if not d['out_dir']:
    model = os.path.basename(os.path.normpath(d['model_dir'])) if d['model_dir'] else (d['model_config'] or 'demo')
    d['out_dir'] = os.path.join('runs', 'calib', f"{model}_{d['method']}_w{d['w_bits']}a{d['a_bits']}")
  return d


# ----------------------------------------------------------------------------------------------- model / data

def _load_fp(c: dict):
  if c['model_dir'] or not c['model_config']:
    from tcaq_jax.eval.digits import DEMO_UNET_DIR
    model_dir = c['model_dir'] or DEMO_UNET_DIR
    params, mconfig = checkpoint.load_model_dir(model_dir)
    model = build_model(mconfig)
  else:
    mconfig = get_config(c['model_config'])
    model = build_model(mconfig)
    args, kwargs = example_inputs(mconfig, 1)
    params = model.init(jax.random.PRNGKey(c['seed']), *args, **kwargs)['params']
    if mconfig.get('family') == 'ldm':          # the first stage (decoder) is not touched by the eps forward
      dec = model.init(jax.random.PRNGKey(c['seed'] + 1), args[0], method='decode')['params']
      params = {**dec, **params}
  return model, jax.tree.map(jnp.asarray, params), mconfig


def _has_cond(mconfig: dict) -> bool:
  return mconfig.get('family') == 'ldm' and bool(mconfig.get('cond_stage'))


def sample_shape(mconfig: dict) -> tuple:
  if mconfig.get('family') == 'ldm':
    return tuple(mconfig['latent_shape'])
  return (mconfig['resolution'], mconfig['resolution'], mconfig['in_channels'])


def example_inputs(mconfig: dict, batch: int = 1) -> tuple[tuple, dict]:
  x = jnp.zeros((batch,) + sample_shape(mconfig), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  kwargs = {'y': jnp.zeros((batch,), jnp.int32)} if _has_cond(mconfig) else {}
  return (x, t), kwargs


def _model_kwargs(has_cond: bool, cond):
  return {'y': cond} if has_cond else {}


def _fp_forward(model, has_cond):
  def fwd(params, x, t, s, c):
    del s
    return model.apply({'params': params}, x, t, **_model_kwargs(has_cond, c))
  return fwd


def _q_forward(model, policy, has_cond):
  def fwd(consts, x, t, s, c):
    params, qstate = consts
    return quantized_apply(model, {'params': params}, qstate, policy, x, t, step_index=s, weight_mode='hard',
                           **_model_kwargs(has_cond, c))
  return fwd


def _q_eps(model, policy, has_cond, params, qstate, x, t, step_index, cond):
  return quantized_apply(model, {'params': params}, qstate, policy, x, t, step_index=step_index,
                         weight_mode='hard', **_model_kwargs(has_cond, cond))


def _fp_eps(model, has_cond, params, x, t, step_index, cond):
  del step_index
  return model.apply({'params': params}, x, t, **_model_kwargs(has_cond, cond))


def make_quant_eps_fn(model, params, qstate, policy, mconfig: dict) -> Partial:
  """eps_fn(x, t, step_index, cond) of the quantized model (hard rounding) for the DDIM sampler."""
  return Partial(functools.partial(_q_eps, model, policy, _has_cond(mconfig)), params, qstate)


def _decode_fn(model, params, mconfig):
  if mconfig.get('family') != 'ldm':
    return None
  return Partial(functools.partial(lambda m, p, z: m.apply({'params': p}, z, method='decode'), model), params)


def _cond_arrays(mconfig: dict, n: int, seed: int):
  """Class labels for class-conditional LDMs (random classes; uncond = the null label)."""
  if not _has_cond(mconfig):
    return None, None
  ncls = int(mconfig['cond_stage']['n_classes']) - 1
  rng = np.random.default_rng(seed)
  cond = rng.integers(0, ncls, n).astype(np.int32)
  uncond = np.full((n,), int(mconfig.get('unconditional_label', ncls)), np.int32)
  return cond, uncond


def _flat_data(cd: CalibData, guidance: bool) -> dict:
  """A capture -> flat arrays {'x' [N,...], 't' [N], 'step' [N], 'cond' [N]} (plus uncond copies with CFG)."""
  k, n = cd.num_steps, cd.num_samples
  x = np.asarray(cd.x, np.float32).reshape((k * n,) + cd.x.shape[2:])
  t = np.repeat(cd.t.astype(np.int32), n)
  s = np.repeat(cd.step_index.astype(np.int32), n)
  c = np.tile(np.asarray(cd.cond, np.int32), k) if cd.cond is not None else np.zeros((k * n,), np.int32)
  data = {'x': x, 't': t, 'step': s, 'cond': c}
  if guidance and cd.uncond is not None:
    u = np.tile(np.asarray(cd.uncond, np.int32), k)
    data = {'x': np.concatenate([x, x]), 't': np.concatenate([t, t]), 'step': np.concatenate([s, s]),
            'cond': np.concatenate([c, u])}
  return data


# ---------------------------------------------------------------------------------------------- the pipeline

class _Pipeline:
  """State of one calibration run (see `run`)."""

  def __init__(self, c: dict):
    self.c = c
    self.out_dir = c['out_dir']
    self.model, self.params, self.mconfig = _load_fp(c)
    self.family = self.mconfig['family']
    self.has_cond = _has_cond(self.mconfig)
    self.coeffs = sampler_coefficients(self.mconfig, c['num_steps'], c['skip_type'], c['eta'])
    self.n_steps = int(self.coeffs.num_steps)
    self.shape = sample_shape(self.mconfig)
    args, kwargs = example_inputs(self.mconfig, 1)
    self.policy = build_policy(self.model, {'params': self.params}, args, c['preset'], c['w_bits'], c['a_bits'],
                               c['softmax_bits'], c['policy_override'], example_kwargs=kwargs)
    self.units = blocks.find_units(self.model, {'params': self.params}, args, kwargs, self.policy, self.family)
    self.fp_fwd = _fp_forward(self.model, self.has_cond)
    self.q_fwd = _q_forward(self.model, self.policy, self.has_cond)
    self.fp_eps = Partial(functools.partial(_fp_eps, self.model, self.has_cond), self.params)
    self.q_eps_fn = functools.partial(_q_eps, self.model, self.policy, self.has_cond)
    self.guidance = c['guidance_scale'] != 1.0
    self.timings: dict = {}
    self.cache: dict = {}                 # compiled functions reused across units / PAR rounds
    self.unit_fns: dict = {}              # unit path -> (soft, hard) apply fns (reused across rounds)

  # -- data
  def _sampler(self, eps_fn, decode_fn=None):
    return _TupleRecord(par.make_sampler(eps_fn, self.coeffs, self.shape, decode_fn, self.c['guidance_scale'],
                                         self.c['sampler_loop']))

  def calib_dir(self, rnd: int) -> str:
    if rnd == 0 and self.c['calib_dir']:
      return self.c['calib_dir']
    return par.round_dir(self.out_dir, rnd)

  def calibration(self, rnd: int, qstate: dict | None) -> dict:
    """Round 0: the FP capture; round r > 0: recaptured with the quantized model (PAR, same seeds)."""
    d = self.calib_dir(rnd)
    if rnd == 0 and self.c['calib_dir'] and not os.path.isfile(os.path.join(d, 'index.json')):
      raise CalibrationError(f'--calib_dir={d!r} is not a complete capture (index.json missing)')
    eps = self.fp_eps if rnd == 0 else Partial(self.q_eps_fn, self.params, qstate)
    cond, uncond = _cond_arrays(self.mconfig, self.c['calib_samples'], self.c['seed'])
    t0 = time.time()
    cd = par.recapture(self._sampler, eps, d, self.c['calib_samples'], self.c['calib_steps'], self.c['seed'],
                       self.c['capture_batch'], cond, uncond,
                       meta={'round': rnd, 'model': self.mconfig.get('name'), 'quantized': rnd > 0})
    self.timings[f'capture_round{rnd}_s'] = time.time() - t0
    if cd.index['num_steps'] != self.n_steps:
      raise CalibrationError(f'capture {d!r} was made with a {cd.index["num_steps"]}-step sampler, but '
                             f'--num_steps={self.c["num_steps"]} gives {self.n_steps}')
    return _flat_data(cd, self.guidance)

  def _arrays(self, data: dict):
    return (data['x'], data['t'], data['step'], data['cond'])

  def recon_subset(self, data: dict) -> dict:
    n = data['x'].shape[0]
    m = self.c['recon_samples']
    if not m or m >= n:
      return data
    idx = np.sort(np.random.default_rng(self.c['seed']).choice(n, m, replace=False))
    return {k: v[idx] for k, v in data.items()}

  # -- initialisation
  def slots(self, data: dict):
    step_slot, k = qinit.step_slots(self.n_steps, np.unique(data['step']), self.c['act_per_step'])
    return step_slot, k, qinit.calib_slot_ids(step_slot, data['step'])

  def initialise(self, data: dict) -> dict:
    c = self.c
    step_slot, k, sid = self.slots(data)
    t0 = time.time()
    ratios = {}
    if c['tcr']:
      kinds = ('conv', 'dense') if c['tcr_dense'] else ('conv',)
      paths = [s.path for s in self.policy.layers.values() if s.acts and s.kind in kinds]
      # TCR statistics are per calibration timestep, independent of --act_per_step.
      tslot, tk = qinit.step_slots(self.n_steps, np.unique(data['step']), True)
      peaks = qinit.collect_peaks(self.fp_fwd, paths, self._arrays(data), qinit.calib_slot_ids(tslot, data['step']),
                                  tk, c['forward_batch'], consts=self.params)
      ratios = qinit.tcr_ratios(peaks, c['r_tru'], c['tcr_target'])
    self.timings['tcr_s'] = time.time() - t0
    t0 = time.time()
    layers = qinit.init_weights(self.params, self.policy, ratios, c['weight_init'], adaround=c['reconstruct'])
    self.timings['weight_init_s'] = time.time() - t0
    qstate = {'step_slot': jnp.asarray(step_slot), 'layers': layers}
    return self.search_acts(qstate, data)

  def search_acts(self, qstate: dict, data: dict) -> dict:
    c = self.c
    step_slot, k, sid = self.slots(data)
    t0 = time.time()
    acts = act_search.search_act_scales(self.fp_fwd, self.policy, qstate['layers'], self._arrays(data), sid, k,
                                        c['act_batch'], c['act_pcts'], c['daq'], c['daq_log_kind'],
                                        seed=c['seed'], consts=self.params, cache=self.cache)
    self.timings['act_search_s'] = self.timings.get('act_search_s', 0.) + time.time() - t0
    layers = {p: dict(st) for p, st in qstate['layers'].items()}
    for p, st in acts.items():
      layers.setdefault(p, {}).update(st)
    return {'step_slot': jnp.asarray(step_slot), 'layers': layers}

  # -- reconstruction
  def recon_unit(self, rnd: int, k: int, qstate: dict, data: dict) -> tuple[dict, dict]:
    c = self.c
    unit = self.units[k]
    arrays = self._arrays(data)
    t0 = time.time()
    io = blocks.capture_unit_io(unit.path, arrays, c['forward_batch'], in_forward=self.q_fwd,
                                in_consts=(self.params, qstate), out_forward=self.fp_fwd, out_consts=self.params,
                                cache=self.cache)
    tgt = io.output
    steps = jnp.asarray(data['step'])
    t_cap = time.time() - t0
    learn = c['learn_act_scale']
    theta = {}
    for p in unit.layers:
      st = qstate['layers'].get(p, {})
      th = {}
      if 'alpha' in st:
        th['alpha'] = st['alpha']
      if learn and 'a_scale' in st:
        th['a_scale'] = st['a_scale']
      if th:
        theta[p] = th
    aux = blocks.unit_aux(self.params, qstate, unit)
    if unit.path not in self.unit_fns:
      self.unit_fns[unit.path] = (blocks.unit_apply_fn(self.model, self.policy, unit, io, 'soft', learn),
                                  blocks.unit_apply_fn(self.model, self.policy, unit, io, 'hard', learn))
    soft, hard = self.unit_fns[unit.path]
    iters = int(round((c['recon_iters'] if rnd == 0 else c['par_iters']) * c['iters_scale']))
    rcfg = recon.ReconConfig(iters=iters, batch=c['recon_batch'], lam=c['lam'], b_start=c['b_start'],
                             b_end=c['b_end'], warmup=c['warmup'], lr=c['lr'], act_lr=c['act_lr'],
                             chunk=c['chunk'], loop=c['recon_loop'],
                             nan_at_iter=c['debug_nan_iter'] if (rnd == 0 and k == c['debug_nan_unit']) else -1)
    stats = {'unit': unit.path, 'cls': unit.cls, 'round': rnd, 'index': k, 'layers': len(unit.layers),
             'iters': iters, 'capture_s': t_cap}
    if c['eval_units'] and theta:
      stats['mse_before'] = recon.eval_loss(hard, theta, aux, io.leaves, tgt, steps, cache=self.cache)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(c['seed']), rnd), k)
    try:
      theta, rstats = recon.reconstruct(soft, theta, aux, io.leaves, tgt, steps, rcfg, key, block=unit.path,
                                        cache=self.cache)
    except recon.NonFiniteLossError as e:
      raise CalibrationError(f'{e} (round {rnd}, unit {k}); {self.out_dir} keeps the state saved before '
                             f'this unit: fix the cause and re-run to resume') from e
    stats.update({k2: v for k2, v in rstats.items() if k2 != 'iters'})
    if c['eval_units'] and theta:
      stats['mse_after'] = recon.eval_loss(hard, theta, aux, io.leaves, tgt, steps, cache=self.cache)
    layers = dict(qstate['layers'])
    for p, th in theta.items():
      layers[p] = {**layers[p], **th}
    stats['seconds_total'] = time.time() - t0
    return {'step_slot': qstate['step_slot'], 'layers': layers}, stats

  # -- checkpoints
  def save(self, ckpt_step: int, qstate: dict, progress: dict, report: dict):
    meta = {'config': _jsonable(self.c), 'model_config': self.mconfig, 'policy': self.policy.to_dict(),
            'units': [u.to_dict() for u in self.units], 'progress': progress, 'report': report,
            'ckpt_step': ckpt_step}
    checkpoint.save(self.out_dir, ckpt_step, self.params, qstate=qstate_to_tree(jax.device_get(qstate)),
                    meta=meta)

  def sample_grid(self, qstate: dict, path: str):
    n = self.c['png_samples']
    if n <= 0:
      return
    sampler = self._sampler(Partial(self.q_eps_fn, self.params, qstate),
                            _decode_fn(self.model, self.params, self.mconfig))
    cond, uncond = _cond_arrays(self.mconfig, n, self.c['seed'])
    imgs = []
    for i in range(0, n, self.c['capture_batch']):
      bs = min(self.c['capture_batch'], n - i)
      out = sampler.sample(self.c['seed'] + 1, i, bs, cond=None if cond is None else cond[i:i + bs],
                           uncond=None if uncond is None else uncond[i:i + bs])
      imgs.append(np.asarray(out['images']))
    save_grid(path, np.concatenate(imgs))


class _TupleRecord:
  """Passes `record` to DDIMSampler.sample as a tuple of ints (capture() hands it a NumPy array)."""

  def __init__(self, sampler):
    self._s = sampler

  def __getattr__(self, name):
    return getattr(self._s, name)

  def sample(self, *args, record=None, **kwargs):
    if record is not None and not isinstance(record, str):
      record = tuple(int(v) for v in np.asarray(record).reshape(-1))
    return self._s.sample(*args, record=record, **kwargs)


def _jsonable(d):
  return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def save_grid(path: str, images: np.ndarray) -> None:
  """images: float [-1, 1] [N, H, W, C] -> one PNG grid, tiles upscaled to ~128 px (eval.sample's writers)."""
  from tcaq_jax.eval.sample import save_grid as _save_grid, to_uint8
  _save_grid(path, to_uint8(images), scale=max(1, 128 // images.shape[2]))


def _check_compatible(stored: dict, now: dict, out_dir: str):
  for k, v in now.items():
    if k in _RESUMABLE or k not in stored:
      continue
    if _jsonable({'v': v})['v'] != stored[k]:
      raise CalibrationError(f'{out_dir} holds a run with --{k}={stored[k]!r}, now --{k}={v!r}: use another '
                             f'--out_dir (or the same flags) to resume')


def run(cfg: CalibConfig | dict) -> dict:
  """Runs (or resumes) a calibration; returns the report dict (also written to out_dir/report.json)."""
  if isinstance(cfg, dict):
    cfg = CalibConfig(**cfg)
  c = resolve_config(cfg)
  t_start = time.time()
  pipe = _Pipeline(c)
  out_dir = c['out_dir']
  os.makedirs(out_dir, exist_ok=True)
  rounds = 1 + (c['par_rounds'] if (c['par'] and c['reconstruct']) else 0)
  last = checkpoint.latest_step(out_dir)
  if last is not None:
    ck = checkpoint.restore(out_dir)
    meta = ck['meta'] or {}
    _check_compatible(meta.get('config', {}), c, out_dir)
    qstate = qstate_from_tree(ck['qstate'])
    progress, report, ckpt_step = meta['progress'], meta['report'], int(meta['ckpt_step'])
    logging.info('resuming %s at round %d, unit %d', out_dir, progress['round'], progress['next_unit'])
    report.setdefault('resumed', []).append({'round': progress['round'], 'unit': progress['next_unit']})
  else:
    data0 = pipe.calibration(0, None)
    qstate = pipe.initialise(data0)
    progress = {'round': 0, 'next_unit': 0, 'act_done': True, 'done': False}
    report = {'model': pipe.mconfig.get('name'), 'family': pipe.family, 'method': c['method'],
              'bits': {'w': c['w_bits'], 'a': c['a_bits'], 'softmax': c['softmax_bits']},
              'components': {k: c[k] for k in ('tcr', 'daq', 'par', 'act_per_step', 'learn_act_scale')},
              'policy_summary': pipe.policy.summary(), 'preset': c['preset'],
              'policy_overrides': c['policy_override'], 'num_units': len(pipe.units), 'units': [],
              'init_timings': dict(pipe.timings), 'iters_scale': c['iters_scale']}
    ckpt_step = 0
    pipe.save(ckpt_step, qstate, progress, report)
  if not progress.get('done'):
    if c['reconstruct']:
      for rnd in range(progress['round'], rounds):
        data = pipe.calibration(rnd, qstate)
        if rnd > 0 and not progress.get('act_done'):
          if c['par_research_act']:
            qstate = pipe.search_acts(qstate, data)
          progress = {'round': rnd, 'next_unit': 0, 'act_done': True, 'done': False}
          ckpt_step += 1
          pipe.save(ckpt_step, qstate, progress, report)
        data = pipe.recon_subset(data)
        first = progress['next_unit'] if progress['round'] == rnd else 0
        for k in range(first, len(pipe.units)):
          if c['recon_units'] and not re.search(c['recon_units'], pipe.units[k].path):
            continue
          qstate, stats = pipe.recon_unit(rnd, k, qstate, data)
          report['units'].append(stats)
          logging.info('round %d unit %d/%d %s: %s', rnd, k + 1, len(pipe.units), pipe.units[k].path,
                       {a: stats.get(a) for a in ('mse_before', 'mse_after', 'it_per_s')})
          progress = {'round': rnd, 'next_unit': k + 1, 'act_done': True, 'done': False}
          ckpt_step += 1
          pipe.save(ckpt_step, qstate, progress, report)
          if rnd == 0 and k == c['debug_stop_after_unit']:
            raise _StopForTest(f'debug_stop_after_unit={k}')
        progress = {'round': rnd + 1, 'next_unit': 0, 'act_done': False, 'done': False}
    progress = {'round': rounds, 'next_unit': 0, 'act_done': True, 'done': True}
    report['timings'] = {**report.get('timings', {}), **pipe.timings}
    report['wall_s_this_process'] = time.time() - t_start
    ckpt_step += 1
    pipe.save(ckpt_step, qstate, progress, report)
  report['policy'] = pipe.policy.to_dict()
  with open(os.path.join(out_dir, 'report.json'), 'w') as f:
    json.dump(_jsonable(report), f, indent=1)
  png = os.path.join(out_dir, 'samples.png')
  if not os.path.exists(png):
    t0 = time.time()
    pipe.sample_grid(qstate, png)
    logging.info('sample grid %s (%.1f s)', png, time.time() - t0)
  return report


# ------------------------------------------------------------------------------------------------ loading

@dataclasses.dataclass
class QuantizedModel:
  model: Any
  params: Any
  qstate: dict
  policy: Policy
  eps_fn: Partial
  config: dict
  meta: dict

  def __iter__(self):
    return iter((self.model, self.params, self.qstate, self.policy, self.eps_fn))


def load_quantized(out_dir: str) -> QuantizedModel:
  """Rebuilds a calibrated model from its out_dir (latest checkpoint): unpacks as
  (model, params, qstate, policy, eps_fn); also has .config (model config) and .meta."""
  ck = checkpoint.restore(out_dir)
  meta = ck['meta'] or {}
  if 'model_config' not in meta or 'policy' not in meta or ck['qstate'] is None:
    raise CalibrationError(f'{out_dir!r} is not a calibration output (no model_config / policy / qstate)')
  mconfig = meta['model_config']
  model = build_model(mconfig)
  params = jax.tree.map(jnp.asarray, ck['params'])
  qstate = qstate_from_tree(ck['qstate'])
  policy = Policy.from_dict(meta['policy'])
  eps_fn = make_quant_eps_fn(model, params, qstate, policy, mconfig)
  if not meta.get('progress', {}).get('done'):
    logging.warning('%s: calibration not finished (progress %s); using its latest state', out_dir,
                    meta.get('progress'))
  return QuantizedModel(model, params, qstate, policy, eps_fn, mconfig, meta)


# ------------------------------------------------------------------------------------------------ flags

def define_flags():
  """absl flags mirroring CalibConfig (called only when run as a program)."""
  from absl import flags
  for f in dataclasses.fields(CalibConfig):
    default = f.default
    help_ = f'CalibConfig.{f.name}'
    if f.name in ('tcr', 'daq', 'par', 'act_per_step', 'learn_act_scale'):
      flags.DEFINE_bool(f.name, None, f'{help_} (default: the method\'s)')
    elif isinstance(default, bool):
      flags.DEFINE_bool(f.name, default, help_)
    elif isinstance(default, int):
      flags.DEFINE_integer(f.name, default, help_)
    elif isinstance(default, float):
      flags.DEFINE_float(f.name, default, help_)
    elif f.name == 'policy_override':
      flags.DEFINE_multi_string(f.name, [], f'{help_}: REGEX:SPEC, repeat the flag for several rules')
    elif isinstance(default, tuple):
      flags.DEFINE_list(f.name, [str(v) for v in default], help_)
    else:
      flags.DEFINE_string(f.name, default, help_)


def config_from_flags() -> CalibConfig:
  from absl import flags
  fl = flags.FLAGS
  kw = {}
  for f in dataclasses.fields(CalibConfig):
    v = getattr(fl, f.name)
    if f.name == 'act_pcts':
      v = tuple(float(x) for x in v)
    elif f.name == 'policy_override':
      v = tuple(v)
    kw[f.name] = v
  return CalibConfig(**kw)


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  report = run(config_from_flags())
  logging.info('done: %d units, report in %s', len(report.get('units', [])),
               os.path.join(resolve_config(config_from_flags())['out_dir'], 'report.json'))


if __name__ == '__main__':
  from absl import app
  define_flags()
  app.run(main)
