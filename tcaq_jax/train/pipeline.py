"""The calibration pipeline as data and stage functions: TCAQ-DM (TCR + DAQ + BRECQ/AdaRound + PAR) and baselines.

  report = run(Config(method='tcaq', w_bits=4, a_bits=8))     # or run({'w_bits': 4, ...}) with flag names

Flow (METHOD.md): `Setup` (FP model, sampler settings, policy, reconstruction units; built once) ->
  capture(setup, 0)            calibration set: one FP sampling pass recording x_t at the selected steps
  initialise(setup, data)      TCR ratios, weight scales (Lp / min-max) and AdaRound alphas, then search_acts
  search_acts(setup, q, data)  per-step activation ranges (percentile search) and DAQ choices
  reconstruct_unit(...)        BRECQ/AdaRound on one unit (inputs from the partially quantized model, targets FP)
  capture(setup, r, q)         PAR round r > 0: recapture with the quantized model, re-search, reconstruct again
Each stage takes and returns values (a `QState`, a data dict); `run` is the loop that threads one `CalibState`
through them and checkpoints it after every stage, so re-running with the same out_dir resumes at the next one.
Compiled functions are built once per run and signature (unit path, set size, ...) by `Setup` and reused across
units and PAR rounds.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Callable

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax import checkpoint
from tcaq_jax.assets import DEMO_UNET_DIR
from tcaq_jax.diffusion.batched import sample_all
from tcaq_jax.diffusion.capture import CalibData
from tcaq_jax.diffusion.ddim import sampler_coefficients
from tcaq_jax.diffusion.host_sampler import make_sampler
from tcaq_jax.images import grid_scale, save_grid, to_uint8
from tcaq_jax.models import family
from tcaq_jax.quant.policy import build_policy
from tcaq_jax.quant.state import LayerQState, QState, merge_layers, to_tree, from_tree
from tcaq_jax.quantized import quant_eps_fn, quant_forward
from tcaq_jax.train import act_search, blocks, init as qinit, par, recon
from tcaq_jax.train.config import RESUMABLE, CalibrationError, Config

__all__ = ['CalibrationError', 'Hooks', 'Progress', 'CalibState', 'Setup', 'capture', 'initialise', 'search_acts',
           'reconstruct_unit', 'save_state', 'run']


@dataclasses.dataclass(frozen=True)
class Hooks:
  """Test and tooling hooks (None: off). after_save(state): called after every checkpoint (raise to simulate a
  kill); loss_hook(rnd, unit_index) -> None or fn(loss, iteration) -> loss applied inside that unit's loss."""
  after_save: Callable[['CalibState'], None] | None = None
  loss_hook: Callable[[int, int], Callable | None] | None = None


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a run stands: the next unit of round `round`; act_done: this round's activation search is done."""
  round: int = 0
  next_unit: int = 0
  act_done: bool = True
  done: bool = False

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@flax.struct.dataclass
class CalibState:
  """The one state a run threads through its stages and saves after each: the quantizer state (a pytree),
  progress, the report so far and the checkpoint step (static metadata)."""
  qstate: QState
  progress: Progress = flax.struct.field(pytree_node=False, default_factory=Progress)
  report: dict = flax.struct.field(pytree_node=False, default_factory=dict)
  ckpt_step: int = flax.struct.field(pytree_node=False, default=0)


class Setup:
  """What a run knows before any stage: config, FP model and params, sampler coefficients, policy, units; and
  the compiled functions it builds once per signature and reuses across units and rounds."""

  def __init__(self, cfg: Config):
    self.cfg = cfg
    if cfg.model_dir or not cfg.model_config:
      self.model, self.params, self.mconfig = family.load(cfg.model_dir or DEMO_UNET_DIR)
    else:
      self.model, self.params, self.mconfig = family.random_model(cfg.model_config, cfg.seed)
    self.coeffs = sampler_coefficients(self.mconfig, cfg.num_steps, cfg.skip_type, cfg.eta)
    self.n_steps = int(self.coeffs.num_steps)
    self.shape = family.sample_shape(self.mconfig)
    args, kwargs = family.example_inputs(self.mconfig, 1)
    self.policy = build_policy(self.model, {'params': self.params}, args, cfg.preset, cfg.w_bits, cfg.a_bits,
                               cfg.softmax_bits, cfg.policy_override, example_kwargs=kwargs)
    self.units = blocks.find_units(self.model, {'params': self.params}, args, kwargs, self.policy,
                                   family.block_class_regex(self.mconfig))
    self.fp_fwd = family.forward(self.model, self.mconfig)
    self.q_fwd = quant_forward(self.model, self.policy, self.mconfig)
    self.fp_eps = family.eps_fn(self.model, self.params, self.mconfig)
    self.guidance = cfg.guidance_scale != 1.0
    self._compiled: dict = {}

  def compiled(self, signature: tuple, build: Callable[[], Any]) -> Any:
    """build() once per signature (a tuple naming what is compiled and its static inputs)."""
    if signature not in self._compiled:
      self._compiled[signature] = build()
    return self._compiled[signature]

  def sampler(self, eps_fn, decode: bool = False):
    dec = family.decode_fn(self.model, self.params, self.mconfig) if decode else None
    return make_sampler(eps_fn, self.coeffs, self.shape, dec, self.cfg.guidance_scale, self.cfg.sampler_loop)

  def q_eps(self, qstate: QState):
    return quant_eps_fn(self.model, self.params, qstate, self.policy, self.mconfig)


# ------------------------------------------------------------------------------------------------- stages

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


def _arrays(data: dict) -> tuple:
  return (data['x'], data['t'], data['step'], data['cond'])


def calib_dir(setup: Setup, rnd: int) -> str:
  """Where round `rnd`'s calibration set lives (--calib_dir for round 0 when given)."""
  if rnd == 0 and setup.cfg.calib_dir:
    return setup.cfg.calib_dir
  return par.round_dir(setup.cfg.out_dir, rnd)


def capture(setup: Setup, rnd: int, qstate: QState | None = None) -> tuple[dict, float]:
  """Round 0: the FP calibration set; round r > 0: recaptured with the quantized model (PAR, same seeds).
  Reuses a complete capture on disk. Returns (flat data dict, seconds)."""
  cfg = setup.cfg
  d = calib_dir(setup, rnd)
  if rnd == 0 and cfg.calib_dir and not os.path.isfile(os.path.join(d, 'index.json')):
    raise CalibrationError(f'--calib_dir={d!r} is not a complete capture (index.json missing)')
  eps = setup.fp_eps if rnd == 0 else setup.q_eps(qstate)
  cond, uncond = family.cond_arrays(setup.mconfig, cfg.calib_samples, cfg.seed)
  t0 = time.time()
  cd = par.recapture(setup.sampler, eps, d, cfg.calib_samples, cfg.calib_steps, cfg.seed, cfg.capture_batch,
                     cond, uncond, meta={'round': rnd, 'model': setup.mconfig.get('name'), 'quantized': rnd > 0})
  seconds = time.time() - t0
  if cd.index['num_steps'] != setup.n_steps:
    raise CalibrationError(f'capture {d!r} was made with a {cd.index["num_steps"]}-step sampler, but '
                           f'--num_steps={cfg.num_steps} gives {setup.n_steps}')
  return _flat_data(cd, setup.guidance), seconds


def recon_subset(cfg: Config, data: dict) -> dict:
  """A random subset of --recon_samples samples (all when 0 or more than there are)."""
  n, m = data['x'].shape[0], cfg.recon_samples
  if not m or m >= n:
    return data
  idx = np.sort(np.random.default_rng(cfg.seed).choice(n, m, replace=False))
  return {k: v[idx] for k, v in data.items()}


def _slots(setup: Setup, data: dict, per_step: bool):
  step_slot, k = qinit.step_slots(setup.n_steps, np.unique(data['step']), per_step)
  return step_slot, k, qinit.calib_slot_ids(step_slot, data['step'])


def initialise(setup: Setup, data: dict) -> tuple[QState, dict]:
  """TCR ratios, weight quantizers (and AdaRound alphas), then `search_acts`. Returns (qstate, timings)."""
  cfg = setup.cfg
  step_slot, _, _ = _slots(setup, data, cfg.act_per_step)
  timings = {}
  t0 = time.time()
  ratios = {}
  if cfg.tcr:
    kinds = ('conv', 'dense') if cfg.tcr_dense else ('conv',)
    paths = [s.path for s in setup.policy.layers.values() if s.acts and s.kind in kinds]
    _, tk, tsid = _slots(setup, data, True)        # TCR statistics are per calibration step, always
    peaks = qinit.collect_peaks(setup.fp_fwd, paths, _arrays(data), tsid, tk, cfg.forward_batch,
                                consts=setup.params)
    ratios = qinit.tcr_ratios(peaks, cfg.r_tru, cfg.tcr_target)
  timings['tcr_s'] = time.time() - t0
  t0 = time.time()
  layers = qinit.init_weights(setup.params, setup.policy, ratios, cfg.weight_init, adaround=cfg.reconstruct)
  timings['weight_init_s'] = time.time() - t0
  qstate, secs = search_acts(setup, QState(step_slot=jnp.asarray(step_slot), layers=layers), data)
  timings['act_search_s'] = secs
  return qstate, timings


def search_acts(setup: Setup, qstate: QState, data: dict) -> tuple[QState, float]:
  """Per-slot activation ranges (and DAQ choices) on `data`, merged into qstate. Returns (qstate, seconds)."""
  cfg = setup.cfg
  step_slot, k, sid = _slots(setup, data, cfg.act_per_step)
  ratio_paths = tuple(sorted(p for p, st in qstate.layers.items()
                             if st.r is not None and p in setup.policy.layers and setup.policy.layers[p].acts))
  search_fn = setup.compiled(('act_search', ratio_paths), lambda: act_search.make_search(
      setup.fp_fwd, setup.policy, ratio_paths, cfg.act_pcts, cfg.daq, cfg.daq_log_kind))
  t0 = time.time()
  acts = act_search.search_act_scales(setup.fp_fwd, setup.policy, qstate.layers, _arrays(data), sid, k,
                                      cfg.act_batch, cfg.act_pcts, cfg.daq, cfg.daq_log_kind, seed=cfg.seed,
                                      consts=setup.params, search_fn=search_fn)
  return QState(step_slot=jnp.asarray(step_slot), layers=merge_layers(qstate.layers, acts)), time.time() - t0


def _trainable(qstate: QState, unit: blocks.Unit, learn: bool) -> dict:
  """{layer path: LayerQState with the fields reconstruction trains (alpha; a_scale when learned)}."""
  theta = {}
  for p in unit.layers:
    st = qstate.layers.get(p, LayerQState())
    th = LayerQState(alpha=st.alpha, a_scale=st.a_scale if learn else None)
    if th.set_fields():
      theta[p] = th
  return theta


def reconstruct_unit(setup: Setup, rnd: int, k: int, qstate: QState, data: dict,
                     loss_hook: Callable | None = None) -> tuple[QState, dict]:
  """BRECQ/AdaRound on unit k in round rnd. Returns (qstate with the unit's trained fields, stats)."""
  cfg = setup.cfg
  unit = setup.units[k]
  t0 = time.time()
  io_fn = setup.compiled(('io', unit.path), lambda: blocks.make_io_capture(unit.path, setup.q_fwd, setup.fp_fwd))
  io = blocks.capture_unit_io(io_fn, _arrays(data), cfg.forward_batch, in_consts=(setup.params, qstate),
                              out_consts=setup.params)
  steps = jnp.asarray(data['step'])
  t_cap = time.time() - t0
  learn = cfg.learn_act_scale
  theta = _trainable(qstate, unit, learn)
  aux = blocks.unit_aux(setup.params, qstate, unit)
  soft = setup.compiled(('apply', unit.path, 'soft'),
                        lambda: blocks.unit_apply_fn(setup.model, setup.policy, unit, io, 'soft', learn))
  hard = setup.compiled(('apply', unit.path, 'hard'),
                        lambda: blocks.unit_apply_fn(setup.model, setup.policy, unit, io, 'hard', learn))
  rcfg = cfg.recon_for_round(rnd)
  n = int(steps.shape[0])
  stats = {'unit': unit.path, 'cls': unit.cls, 'round': rnd, 'index': k, 'layers': len(unit.layers),
           'iters': rcfg.iters, 'capture_s': t_cap}
  eval_fn = setup.compiled(('eval', unit.path), lambda: recon.make_eval(hard))
  if cfg.eval_units and theta:
    stats['mse_before'] = recon.eval_loss(eval_fn, theta, aux, io.leaves, io.output, steps)
  if loss_hook is None:
    chunk_fn = setup.compiled(('chunk', unit.path, n), lambda: recon.make_chunk(soft, n, rcfg))
  else:
    chunk_fn = recon.make_chunk(soft, n, rcfg, loss_hook)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), rnd), k)
  try:
    theta, rstats = recon.reconstruct(soft, theta, aux, io.leaves, io.output, steps, rcfg, key, block=unit.path,
                                      chunk_fn=chunk_fn)
  except recon.NonFiniteLossError as e:
    raise CalibrationError(f'{e} (round {rnd}, unit {k}); {cfg.out_dir} keeps the state saved before '
                           f'this unit: fix the cause and re-run to resume') from e
  stats.update({k2: v for k2, v in rstats.items() if k2 != 'iters'})
  if cfg.eval_units and theta:
    stats['mse_after'] = recon.eval_loss(eval_fn, theta, aux, io.leaves, io.output, steps)
  stats['seconds_total'] = time.time() - t0
  return qstate.merge(theta), stats


def sample_grid(setup: Setup, qstate: QState, path: str) -> None:
  """--png_samples images of the quantized model (seed + 1) as one PNG grid."""
  cfg = setup.cfg
  n = cfg.png_samples
  if n <= 0:
    return
  cond, uncond = family.cond_arrays(setup.mconfig, n, cfg.seed)
  images = sample_all(setup.sampler(setup.q_eps(qstate), decode=True), n, cfg.capture_batch, cfg.seed + 1,
                      cond, uncond)
  save_grid(path, to_uint8(images), scale=grid_scale(images.shape[2]))


# ----------------------------------------------------------------------------------------- checkpoints

def save_state(setup: Setup, state: CalibState) -> None:
  """Atomically writes `state` as checkpoint step state.ckpt_step of out_dir (params, qstate, meta)."""
  meta = {'config': setup.cfg.to_flat(), 'model_config': setup.mconfig, 'policy': setup.policy.to_dict(),
          'units': [u.to_dict() for u in setup.units], 'progress': state.progress.to_dict(),
          'report': _jsonable(state.report), 'ckpt_step': state.ckpt_step}
  checkpoint.save(setup.cfg.out_dir, state.ckpt_step, setup.params, qstate=to_tree(jax.device_get(state.qstate)),
                  meta=meta)


def _jsonable(d):
  import json
  return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _check_compatible(stored: dict, now: dict, out_dir: str) -> None:
  for k, v in now.items():
    if k in RESUMABLE or k not in stored:
      continue
    if v != stored[k]:
      raise CalibrationError(f'{out_dir} holds a run with --{k}={stored[k]!r}, now --{k}={v!r}: use another '
                             f'--out_dir (or the same flags) to resume')


def restore_state(setup: Setup) -> CalibState | None:
  """The last saved state of out_dir (None when it holds none); refuses a run made with other flags."""
  if checkpoint.latest_step(setup.cfg.out_dir) is None:
    return None
  ck = checkpoint.restore(setup.cfg.out_dir)
  meta = ck['meta'] or {}
  _check_compatible(meta.get('config', {}), setup.cfg.to_flat(), setup.cfg.out_dir)
  p = meta['progress']
  progress = Progress(p['round'], p['next_unit'], p.get('act_done', True), p.get('done', False))
  return CalibState(from_tree(ck['qstate']), progress, meta['report'], int(meta['ckpt_step']))


def _new_report(setup: Setup, timings: dict) -> dict:
  cfg = setup.cfg
  return {'model': setup.mconfig.get('name'), 'family': setup.mconfig['family'], 'method': cfg.method,
          'bits': {'w': cfg.w_bits, 'a': cfg.a_bits, 'softmax': cfg.softmax_bits},
          'components': {k: getattr(cfg, k) for k in ('tcr', 'daq', 'par', 'act_per_step', 'learn_act_scale')},
          'policy_summary': setup.policy.summary(), 'preset': cfg.preset,
          'policy_overrides': list(cfg.policy_override), 'num_units': len(setup.units), 'units': [],
          'init_timings': dict(timings), 'iters_scale': cfg.iters_scale}


# ------------------------------------------------------------------------------------------------- run

def run(cfg: Config | dict, hooks: Hooks = Hooks()) -> dict:
  """Runs (or resumes) a calibration; returns the report dict (also written to out_dir/report.json)."""
  cfg = (Config.from_flat(cfg) if isinstance(cfg, dict) else cfg).resolve()
  t_start = time.time()
  setup = Setup(cfg)
  os.makedirs(cfg.out_dir, exist_ok=True)
  timings: dict = {}

  def commit(state: CalibState, **progress) -> CalibState:
    state = state.replace(progress=Progress(**progress), ckpt_step=state.ckpt_step + 1)
    save_state(setup, state)
    if hooks.after_save is not None:
      hooks.after_save(state)
    return state

  state = restore_state(setup)
  if state is not None:
    logging.info('resuming %s at round %d, unit %d', cfg.out_dir, state.progress.round, state.progress.next_unit)
    report = dict(state.report)
    report['resumed'] = report.get('resumed', []) + [{'round': state.progress.round,
                                                       'unit': state.progress.next_unit}]
    state = state.replace(report=report)
  else:
    data, timings['capture_round0_s'] = capture(setup, 0)
    qstate, init_t = initialise(setup, data)
    timings.update(init_t)
    state = CalibState(qstate, Progress(), _new_report(setup, timings), ckpt_step=0)
    save_state(setup, state)
    if hooks.after_save is not None:
      hooks.after_save(state)
  if not state.progress.done:
    for rnd in range(state.progress.round, cfg.rounds):
      data, timings[f'capture_round{rnd}_s'] = capture(setup, rnd, state.qstate)
      if rnd > 0 and not state.progress.act_done:
        if cfg.par_research_act:
          qstate, secs = search_acts(setup, state.qstate, data)
          timings['act_search_s'] = timings.get('act_search_s', 0.) + secs
          state = state.replace(qstate=qstate)
        state = commit(state, round=rnd, next_unit=0, act_done=True, done=False)
      data = recon_subset(cfg, data)
      first = state.progress.next_unit if state.progress.round == rnd else 0
      for k in range(first, len(setup.units)):
        if cfg.recon_units and not re.search(cfg.recon_units, setup.units[k].path):
          continue
        hook = hooks.loss_hook(rnd, k) if hooks.loss_hook is not None else None
        qstate, stats = reconstruct_unit(setup, rnd, k, state.qstate, data, hook)
        report = dict(state.report, units=state.report['units'] + [stats])
        logging.info('round %d unit %d/%d %s: %s', rnd, k + 1, len(setup.units), setup.units[k].path,
                     {a: stats.get(a) for a in ('mse_before', 'mse_after', 'it_per_s')})
        state = commit(state.replace(qstate=qstate, report=report), round=rnd, next_unit=k + 1, act_done=True,
                       done=False)
      state = state.replace(progress=Progress(rnd + 1, 0, False, False))
    report = dict(state.report, timings={**state.report.get('timings', {}), **timings},
                  wall_s_this_process=time.time() - t_start)
    state = commit(state.replace(report=report), round=cfg.rounds, next_unit=0, act_done=True, done=True)
  report = dict(state.report, policy=setup.policy.to_dict())
  with open(os.path.join(cfg.out_dir, 'report.json'), 'w') as f:
    import json
    json.dump(_jsonable(report), f, indent=1)
  png = os.path.join(cfg.out_dir, 'samples.png')
  if not os.path.exists(png):
    t0 = time.time()
    sample_grid(setup, state.qstate, png)
    logging.info('sample grid %s (%.1f s)', png, time.time() - t0)
  return report
