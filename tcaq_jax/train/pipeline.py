"""The calibration pipeline as data and stage functions: TCAQ-DM (TCR + DAQ + BRECQ/AdaRound + PAR) and baselines.

  report = run(Config(method='tcaq', w_bits=4, a_bits=8))     # or run({'w_bits': 4, ...}) with flag names

Flow (METHOD.md): `Setup` (FP model, sampler settings, policy, reconstruction units; built once) ->
  capture(setup, 0)            calibration set: one FP sampling pass recording x_t at the selected steps
  initialise(setup, data)      TCR ratios, weight scales (Lp / min-max) and AdaRound alphas, then search_acts
  search_acts(setup, q, data)  per-step activation ranges (percentile search) and DAQ choices
  reconstruct_unit(...)        BRECQ/AdaRound on one unit (inputs from the partially quantized model, targets FP)
  capture(setup, r, q)         PAR round r > 0: recapture with the quantized model, re-search, reconstruct again
  par_x_filter(setup, r, data) --par_x_range: a PAR round's (reconstruction, activation re-search) inputs
  fit_eps_bias(setup, q)       --eps_bias: the quantized model's mean eps error per sampler step (`eps_bias`)
Each stage takes and returns values (a `QState`, a data dict); `run` is the loop that threads one `CalibState`
through them and checkpoints it after every stage, so re-running with the same out_dir resumes at the next one.
Compiled functions are built once per signature by `Setup.compiled`: a unit's reconstruction functions (soft /
hard apply, the chunk, the block-MSE evaluator) per *unit signature* (block class, hyper-parameters, quantizers,
input shapes; `blocks.unit_program`), so units alike share one executable and PAR rounds reuse them; the unit
input capture per unit path; the activation search per set of TCR layers. report.json's `phases_this_process` and
`compile_this_process` say where the time went and how many XLA compiles it took; `precompile_this_process`
how much compiling ran ahead on the precompile thread and how long the main thread waited for it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import threading
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax import atomic_io
from tcaq_jax.assets import DEMO_UNET_DIR
from tcaq_jax.diffusion.batched import sample_all
from tcaq_jax.diffusion.capture import CalibData
from tcaq_jax.diffusion.ddim import sampler_coefficients
from tcaq_jax.diffusion.host_sampler import make_sampler
from tcaq_jax.images import grid_scale, save_grid, to_uint8
from tcaq_jax.jit_stats import CompileStats
from tcaq_jax.models import family
from tcaq_jax.quant import adaround
from tcaq_jax.quant.policy import build_policy
from tcaq_jax.quant.state import LayerQState, QState, from_tree, merge_layers, to_tree
from tcaq_jax.quantized import params_fingerprint, quant_eps_fn, quant_forward
from tcaq_jax.train import (act_search, blocks, eps_bias, init as qinit, par, recon, recon_gate, tcr_select,
                            unit_order)
from tcaq_jax.train.calib_state import (CalibState, Progress, Saver, jsonable, new_report, restore_state,
                                         save_state)
from tcaq_jax.train.config import CalibrationError, Config
from tcaq_jax.train.precompile import Precompiler

__all__ = ['CalibrationError', 'Hooks', 'Progress', 'CalibState', 'Setup', 'capture', 'initialise', 'search_acts',
           'reconstruct_unit', 'fit_eps_bias', 'save_state', 'run']


@dataclasses.dataclass(frozen=True)
class Hooks:
  """Test and tooling hooks (None: off). after_save(state): called after every checkpoint (raise to simulate a
  kill); loss_hook(rnd, unit_index) -> None or fn(loss, iteration) -> loss applied inside that unit's loss;
  after_run(setup, qstate) -> dict merged into the report (end-of-run evaluations that reuse the run's compiled
  samplers: `Setup.sampler(setup.fp_eps)`, `Setup.sampler(setup.q_eps(qstate))`); after_capture(setup, rnd):
  called after every calibration capture this process makes or loads (round 0's compiles the FP sampler);
  grid_images(n) -> None or n uint8 images [n, H, W, C] of the quantized model that out_dir/samples.png shows
  instead of sampling its own (called after after_run: e.g. the images an end-of-run check sampled already)."""
  after_save: Callable[['CalibState'], None] | None = None
  after_capture: Callable[['Setup', int], None] | None = None
  loss_hook: Callable[[int, int], Callable | None] | None = None
  after_run: Callable[['Setup', QState], dict] | None = None
  grid_images: Callable[[int], Any] | None = None


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
    # --recon_step_weight: per sampler step weights of the reconstruction loss (None: uniform)
    w = recon.step_weights(self.coeffs.alphas, self.coeffs.alphas_prev, cfg.recon.step_weight)
    self.step_weights = None if w is None else jnp.asarray(w)
    self.shape = family.sample_shape(self.mconfig)
    args, kwargs = family.example_inputs(self.mconfig, 1)
    self.policy = build_policy(self.model, {'params': self.params}, args, cfg.preset, cfg.w_bits, cfg.a_bits,
                               cfg.softmax_bits, cfg.policy_override, example_kwargs=kwargs)
    self.units = unit_order.in_order(blocks.find_units(self.model, {'params': self.params}, args, kwargs,
                                                       self.policy, family.block_class_regex(self.mconfig)),
                                     cfg.recon_order)
    # --schedule=two_pass: the AdaRound pass quantizes weights only (inputs from the weight-quantized model), the
    # activation pass takes its unit inputs from the FP model (Q-Diffusion's asym=False).
    self.w_policy = dataclasses.replace(self.policy, layers={
        p: dataclasses.replace(s, a_bits=None, split=s.split if s.weights else None)
        for p, s in self.policy.layers.items()})
    self.capture_group_of = {p: g for g in blocks.capture_groups(self.units, CAPTURE_GROUP) for p in g}
    self.fp_fwd = family.forward(self.model, self.mconfig)
    self.q_fwd = quant_forward(self.model, self.policy, self.mconfig)
    self.qw_fwd = quant_forward(self.model, self.w_policy, self.mconfig)
    self.fp_in_fwd = lambda consts, *d: self.fp_fwd(consts[0], *d)
    self.fp_eps = family.eps_fn(self.model, self.params, self.mconfig)
    self.guidance = cfg.guidance_scale != 1.0
    self.fingerprint = params_fingerprint(self.params)
    self._compiled: dict = {}
    self._compiled_lock = threading.Lock()
    self._q_eps = None
    self.gate_fp = None                 # --recon_gate: FP's final samples from the gate's noises (sampled once)
    self.eps_fit_cache: dict = {}       # --eps_bias: FP trajectories and eps of the fits (`eps_bias.fit`)
    self.par_dropped: dict = {}         # --par_x_range: round -> recaptured inputs dropped (report.json)
    self.fp_absmax: dict | None = None  # --par_x_range: sampler step -> the FP capture's max |x_t|
    self.gate_best: tuple | None = None  # --recon_gate: (qstate, entry) of the best stage scored in this process
    self.gate_last: tuple | None = None  # --recon_gate: (round, qstate with its fitted correction) scored last
    self.precompiler = Precompiler(cfg.precompile, workers=cfg.precompile_workers or
                                   (1 if (os.cpu_count() or 1) <= 4 else 2))
    self.precompile_owner: dict = {}    # (weight pass, act pass) -> the round that precompiles their programs
    self.trained: set = set()           # (signature, set size) of the units reconstructed in this process

  def compiled(self, signature: tuple, build: Callable[[], Any]) -> Any:
    """build() once per signature (a tuple naming what is compiled and its static inputs)."""
    with self._compiled_lock:            # the precompile thread builds them too
      if signature not in self._compiled:
        self._compiled[signature] = build()
      return self._compiled[signature]

  @property
  def built(self):
    """The signatures built so far."""
    return self._compiled.keys()

  @property
  def sample_batch(self) -> int:
    """The batch of every sampler this run uses (the round-0 capture's, compiled there for FP and by the PAR
    recaptures for the quantized model): the grid and end-of-run checks sample at it (padded) and compile
    nothing new."""
    return min(self.cfg.capture_batch, self.cfg.calib_samples)

  def sampler(self, eps_fn, decode: bool = False):
    dec = family.decode_fn(self.model, self.params, self.mconfig) if decode else None
    return make_sampler(eps_fn, self.coeffs, self.shape, dec, self.cfg.guidance_scale, self.cfg.sampler_loop)

  def q_eps(self, qstate: QState):
    """The quantized eps_fn with this qstate (one function object per run: samplers reuse their compile)."""
    eps = quant_eps_fn(self.model, self.params, qstate, self.policy, self.mconfig, like=self._q_eps)
    self._q_eps = eps
    return eps


# ------------------------------------------------------------------------------------------------- stages

def _arrays(data: dict) -> tuple:
  return (data['x'], data['t'], data['step'], data['cond'])


def calib_dir(setup: Setup, rnd: int) -> str:
  """Where round `rnd`'s calibration set lives (--calib_dir for round 0 when given)."""
  if rnd == 0 and setup.cfg.calib_dir:
    return setup.cfg.calib_dir
  return par.round_dir(setup.cfg.out_dir, rnd)


def capture(setup: Setup, rnd: int, qstate: QState | None = None) -> tuple[dict, float]:
  """Round 0: the FP calibration set; round r > 0: recaptured with the quantized model (PAR, same seeds).
  Reuses a complete capture on disk. Returns (flat data dict, seconds); `par_x_filter` applies --par_x_range."""
  cfg = setup.cfg
  if cfg.schedule == 'two_pass':
    rnd, qstate = 0, None              # the activation pass reuses the FP calibration set
  d = calib_dir(setup, rnd)
  if rnd == 0 and cfg.calib_dir and not os.path.isfile(os.path.join(d, 'index.json')):
    raise CalibrationError(f'--calib_dir={d!r} is not a complete capture (index.json missing)')
  eps = setup.fp_eps if rnd == 0 else setup.q_eps(qstate)
  cond, uncond = family.cond_arrays(setup.mconfig, cfg.calib_samples, cfg.seed)
  t0 = time.time()
  interval = cfg.calib_step_rule == 'interval'
  cd = par.recapture(setup.sampler, eps, d, cfg.calib_samples, setup.n_steps if interval else cfg.calib_steps,
                     cfg.seed, cfg.capture_batch,
                     cond, uncond, meta={'round': rnd, 'model': setup.mconfig.get('name'), 'quantized': rnd > 0})
  seconds = time.time() - t0
  if cd.index['num_steps'] != setup.n_steps:
    raise CalibrationError(f'capture {d!r} was made with a {cd.index["num_steps"]}-step sampler, but '
                           f'--num_steps={cfg.num_steps} gives {setup.n_steps}')
  data = par.flat_data(cd, setup.guidance)
  if interval:                         # Q-Diffusion's get_train_samples: range(0, n, n // cali_st)
    keep = np.isin(data['step'], np.arange(0, setup.n_steps, max(setup.n_steps // cfg.calib_steps, 1)))
    data = {key: v[keep] for key, v in data.items()}
  return data, seconds


def par_x_filter(setup: Setup, rnd: int, data: dict) -> tuple[dict, dict]:
  """--par_x_range: (the round's reconstruction inputs, the activation re-search's inputs) from a capture. Round
  0 records FP's per-step input range and keeps everything; a PAR round drops the recaptured inputs beyond
  --par_x_range times that range from both (--par_x_scope=all) or from the activation re-search only (act).
  Without --par_x_range: (data, data)."""
  cfg = setup.cfg
  if cfg.par_x_range <= 0:
    return data, data
  if rnd == 0:
    setup.fp_absmax = par.step_absmax(data)
    return data, data
  if setup.fp_absmax is None:          # a run resumed after round 0: read the FP capture once
    setup.fp_absmax = par.step_absmax(par.flat_data(CalibData(calib_dir(setup, 0)), setup.guidance))
  keep = par.in_range(data, setup.fp_absmax, cfg.par_x_range)
  setup.par_dropped[rnd] = int(keep.size - keep.sum())
  logging.info('round %d: --par_x_range=%g drops %d of %d recaptured inputs from %s', rnd, cfg.par_x_range,
               setup.par_dropped[rnd], keep.size,
               'the activation re-search' if cfg.par_x_scope == 'act' else 'the round')
  kept = {key: v[keep] for key, v in data.items()}
  return (data, kept) if cfg.par_x_scope == 'act' else (kept, kept)


def _slots(setup: Setup, data: dict, per_step: bool):
  step_slot, k = qinit.step_slots(setup.n_steps, np.unique(data['step']), per_step)
  return step_slot, k, qinit.calib_slot_ids(step_slot, data['step'])


def initialise(setup: Setup, data: dict) -> tuple[QState, dict, dict]:
  """TCR ratios (chosen per layer with --tcr_select=error), weight quantizers (and AdaRound alphas), then
  `search_acts`. Returns (qstate, timings, report entries: `tcr_choices`)."""
  cfg = setup.cfg
  step_slot, _, _ = _slots(setup, data, cfg.act_per_step)
  timings, info = {}, {}
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
  select = cfg.tcr_select != 'all' and ratios and len(cfg.tcr_exponents) > 1
  if not select and cfg.schedule != 'two_pass' and cfg.act_init == 'search':
    # the ratios are final: the activation search compiles on the precompile thread while the weights initialise
    setup.precompiler.submit([_act_search_job(setup, data, ratios)])
  t0 = time.time()
  init_w = lambda policy, r: qinit.init_weights(setup.params, policy, r, cfg.weight_init,  # noqa: E731
                                                adaround=cfg.reconstruct, split=cfg.w_split)
  layers = init_w(setup.policy, {} if select else ratios)
  timings['weight_init_s'] = time.time() - t0
  if select:
    layers, info['tcr_choices'], timings['tcr_select_s'] = _select_tcr(setup, data, ratios, layers, init_w)
  # --eps_bias: a zero bias until `fit_eps_bias` (the quantized samplers compile once for the final structure)
  qstate = QState(step_slot=jnp.asarray(step_slot), layers=layers, out_bias=_zero_bias(setup),
                  out_scale=_unit_scale(setup))
  secs = 0.0
  if cfg.schedule != 'two_pass':      # two_pass: activation ranges after the AdaRound pass (round 1)
    qstate, secs = search_acts(setup, qstate, data)
  timings['act_search_s'] = secs
  return qstate, timings, info


def _select_tcr(setup: Setup, data: dict, ratios: dict, base: dict, init_w: Callable) -> tuple[dict, dict, float]:
  """--tcr_select=error|act_error: per TCR layer the exponent of r with the lowest quantized output error
  (`tcr_select`; act_error: weights FP in the measure). base: the weight states without TCR. Returns (layers, {path: choice record}, seconds)."""
  cfg = setup.cfg
  t0 = time.time()
  paths = tuple(sorted(ratios))
  sub = dataclasses.replace(setup.policy, layers={p: setup.policy.layers[p] for p in paths})
  cands = [base if e == 0 else init_w(sub, tcr_select.tempered(ratios, e)) for e in cfg.tcr_exponents]
  cands = [{p: c.get(p, LayerQState()) for p in paths} for c in cands]
  _, k, sid = _slots(setup, data, cfg.act_per_step)
  fn = setup.compiled(('tcr_select', paths), lambda: tcr_select.make_select(setup.fp_fwd, setup.policy, paths,
                                                                            cfg.act_pcts, cfg.act_criterion,
                                                                            cfg.act_ends))
  # 'act_error': weights FP in the measure (reconstruction learns the weight rounding, not the activation ranges)
  measured = [{p: LayerQState() for p in paths}] * len(cands) if cfg.tcr_select == 'act_error' else cands
  errors = tcr_select.layer_errors(fn, ratios, measured, cfg.tcr_exponents, _arrays(data), sid, k,
                                   cfg.act_batch, cfg.seed, setup.params, relative=cfg.tcr_select == 'rel_error')
  chosen = tcr_select.choose(errors, cfg.tcr_exponents)
  layers = dict(base)
  for p, e in chosen.items():
    if e != 0:
      layers[p] = cands[list(cfg.tcr_exponents).index(e)][p]
  choices = {p: {'exponent': chosen[p], 'errors': [float(v) for v in errors[p]],
                 'r_max': float(jnp.max(ratios[p]))} for p in paths}
  logging.info('TCR selection: %d of %d layers keep TCR (exponents %s)', sum(e != 0 for e in chosen.values()),
               len(chosen), sorted(set(chosen.values())))
  return layers, choices, time.time() - t0


def search_acts(setup: Setup, qstate: QState, data: dict) -> tuple[QState, float]:
  """Per-slot activation ranges (and DAQ choices) on `data`, merged into qstate. Returns (qstate, seconds)."""
  cfg = setup.cfg
  step_slot, k, sid = _slots(setup, data, cfg.act_per_step)
  if cfg.act_init == 'minmax_sym':
    fn = setup.compiled(('act_init_minmax_sym',), lambda: act_search.make_minmax_sym(setup.fp_fwd, setup.policy))
    t0 = time.time()
    acts = act_search.init_minmax_sym(fn, setup.policy, setup.params, qstate, _arrays(data), sid, k,
                                      cfg.act_init_samples, cfg.seed)
    return qstate.replace(step_slot=jnp.asarray(step_slot), layers=merge_layers(qstate.layers, acts)), time.time() - t0
  ratio_paths = _ratio_paths(setup, {p: st.r for p, st in qstate.layers.items() if st.r is not None})
  search_fn = _search_fn(setup, ratio_paths)
  t0 = time.time()
  setup.precompiler.wait(('act_search', ratio_paths))
  acts = act_search.search_act_scales(setup.fp_fwd, setup.policy, qstate.layers, _arrays(data), sid, k,
                                      cfg.act_batch, cfg.act_pcts, cfg.daq, cfg.daq_log_kind, seed=cfg.seed,
                                      consts=setup.params, search_fn=search_fn, daq_rule=cfg.daq_rule,
                                      criterion=cfg.act_criterion, ends=cfg.act_ends)
  return qstate.replace(step_slot=jnp.asarray(step_slot), layers=merge_layers(qstate.layers, acts)), time.time() - t0


def _ratio_paths(setup: Setup, ratios: dict) -> tuple:
  """The layers whose activations the search scales by TCR ratios (sorted; part of its program's signature)."""
  return tuple(sorted(p for p in ratios if p in setup.policy.layers and setup.policy.layers[p].acts))


def _search_fn(setup: Setup, ratio_paths: tuple) -> Callable:
  cfg = setup.cfg
  return setup.compiled(('act_search', ratio_paths), lambda: act_search.make_search(
      setup.fp_fwd, setup.policy, ratio_paths, cfg.act_pcts, cfg.daq, cfg.daq_log_kind, daq_rule=cfg.daq_rule,
      criterion=cfg.act_criterion, ends=cfg.act_ends))


def _abstract(a, m: int | None = None) -> jax.ShapeDtypeStruct:
  """a's shape and (canonical) dtype as an abstract argument for `.lower`, with leading dim m when given."""
  return jax.ShapeDtypeStruct(a.shape if m is None else (m,) + tuple(a.shape[1:]),
                              jax.dtypes.canonicalize_dtype(a.dtype))


def _act_search_job(setup: Setup, data: dict, ratios: dict) -> tuple:
  """(key, job) for `Precompiler`: compiles the activation search for abstract arguments of the shapes
  `search_acts` will call it with (one program per distinct slot batch size)."""
  cfg = setup.cfg
  paths = _ratio_paths(setup, ratios)

  def job():
    fn = _search_fn(setup, paths)
    _, k, sid = _slots(setup, data, cfg.act_per_step)
    sizes = {idx.size for _, idx in act_search.slot_batches(sid, k, cfg.act_batch, cfg.seed, 'activation search')}
    r = {p: _abstract(jnp.asarray(ratios[p])) for p in paths}
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    for m in sorted(sizes):
      fn.lower(setup.params, r, key, *[_abstract(a, m) for a in _arrays(data)]).compile()

  return ('act_search', paths), job


def _trainable(qstate: QState, unit: blocks.Unit, learn: bool, alpha: bool = True, policy=None,
               lsq_kinds: tuple | None = None) -> dict:
  """{layer path: LayerQState with the fields reconstruction trains (alpha unless alpha=False; a_scale when
  learned, and with a policy only for layers whose kind is in lsq_kinds)}."""
  theta = {}
  for p in unit.layers:
    st = qstate.layers.get(p, LayerQState())
    kind_ok = policy is None or lsq_kinds is None or policy.layers[p].kind in lsq_kinds
    th = LayerQState(alpha=st.alpha if alpha else None, a_scale=st.a_scale if learn and kind_ok else None)
    if th.set_fields():
      theta[p] = th
  return theta


# Units whose inputs / outputs one compiled capture program records (consecutive in call order): a model's
# units need len(units) / CAPTURE_GROUP capture compiles instead of one each; each capture runs the forward on to
# its group's last unit.
CAPTURE_GROUP = 8


def _capture_group(setup: Setup, k: int) -> tuple[str, ...]:
  return setup.capture_group_of[setup.units[k].path]


def _alpha_stats(theta: dict) -> float:
  """Share of AdaRound alphas whose rectified sigmoid is clipped at 0 or 1 (zero gradient)."""
  alphas = [th.alpha for th in theta.values() if th.alpha is not None]
  if not alphas:
    return float('nan')
  return float(sum(adaround.saturated(np.asarray(a), xp=np).sum() for a in alphas) / sum(a.size for a in alphas))


def _reinit_alpha(theta: dict) -> dict:
  """Alphas re-initialised from their hard rounding (`adaround.reinit_from_hard`)."""
  return {path: th.replace(alpha=adaround.reinit_from_hard(th.alpha)) if th.alpha is not None else th
          for path, th in theta.items()}


class RoundTargets:
  """The FP outputs of every selected unit (the reconstruction targets) for one round's reconstruction set and
  held-out set, each computed in one FP pass on first use, when they fit in --target_cache_mb; else `of` gives
  None and each unit's capture computes its own (running the FP forward to its capture group's last unit)."""

  def __init__(self, setup: Setup, data: dict, holdout: dict | None):
    self.setup, self.sets, self.cache = setup, (data, holdout), None

  def of(self, path: str) -> tuple | None:
    """(targets on the reconstruction set, on the held-out set or None), or None when not cached."""
    if self.cache is None:
      self.cache = self._compute()
    return None if not self.cache else tuple(None if c is None else c[path] for c in self.cache)

  def _compute(self) -> tuple:
    """(targets of the reconstruction set, of the held-out set or None); () when they do not fit."""
    setup, cfg = self.setup, self.setup.cfg
    paths = tuple(u.path for u in setup.units if _selected(cfg, u))   # XLA drops the forward after the last
    fn = setup.compiled(('targets', paths), lambda: blocks.make_group_capture(paths, None, setup.fp_fwd))
    sets = [None if d is None else _arrays(d) for d in self.sets]
    need = sum(blocks.output_bytes(fn, a, cfg.forward_batch, setup.params) for a in sets if a is not None)
    if need > cfg.target_cache_mb * 2 ** 20:
      if cfg.target_cache_mb:
        logging.info('FP targets need %.0f MB > --target_cache_mb=%d: each unit computes its own',
                     need / 2 ** 20, cfg.target_cache_mb)
      return ()
    return tuple(None if a is None else blocks.capture_outputs(fn, a, cfg.forward_batch, setup.params)
                 for a in sets)


@dataclasses.dataclass(frozen=True)
class UnitFns:
  """A unit's reconstruction functions for one round (shared by units with the same `sig`)."""
  sig: tuple
  soft: Callable
  hard: Callable
  eval_fn: Callable
  chunk_fn: Callable
  rcfg: Any


def _passes(cfg: Config, rnd: int) -> tuple[bool, bool]:
  """(weight-only AdaRound pass, activation pass) of round rnd."""
  return cfg.schedule == 'two_pass' and rnd == 0, cfg.act_pass(rnd)


def _io_fn(setup: Setup, k: int, rnd: int, with_targets: bool):
  """Unit k's capture-group recorder in round rnd: inputs (from the model its pass uses) and, with_targets, the
  FP outputs in the same program."""
  w_pass, act_pass = _passes(setup.cfg, rnd)
  in_fwd = setup.qw_fwd if w_pass else setup.fp_in_fwd if act_pass else setup.q_fwd
  group = _capture_group(setup, k)
  if with_targets:
    return setup.compiled(('io', group, w_pass, act_pass), lambda: blocks.make_group_capture(group, in_fwd,
                                                                                             setup.fp_fwd))
  return setup.compiled(('in', group, w_pass, act_pass), lambda: blocks.make_group_capture(group, in_fwd))


def _unit_fns(setup: Setup, rnd: int, k: int, io: blocks.CapturedIO, n: int) -> UnitFns:
  """The compiled-function objects for unit k in round rnd (built once per signature: units alike share them)."""
  cfg, unit = setup.cfg, setup.units[k]
  w_pass, act_pass = _passes(cfg, rnd)
  learn = cfg.learn_act_scale and not w_pass
  program = setup.compiled(('program', unit.path, w_pass), lambda: blocks.unit_program(
      setup.model, setup.params, setup.w_policy if w_pass else setup.policy, unit))
  rcfg = cfg.recon_for_round(rnd)
  sig = program.signature + blocks.io_signature(io) + (learn, act_pass)
  mode = 'hard' if act_pass else 'soft'          # the activation pass keeps the learned rounding fixed
  soft = setup.compiled(('apply', sig, mode), lambda: blocks.unit_apply_fn(program, io, mode, learn))
  hard = setup.compiled(('apply', sig, 'hard'), lambda: blocks.unit_apply_fn(program, io, 'hard', learn))
  eval_fn = setup.compiled(('eval', sig), lambda: recon.make_eval(hard, setup.step_weights))
  chunk_fn = setup.compiled(('chunk', sig, n), lambda: recon.make_chunk(soft, n, rcfg,
                                                                       step_weights=setup.step_weights))
  return UnitFns(sig, soft, hard, eval_fn, chunk_fn, rcfg)


def _unit_theta(setup: Setup, rnd: int, k: int, qstate: QState) -> tuple[dict, dict]:
  """(theta: the unit's trained fields relative to it, aux: its frozen params and quantizer state)."""
  cfg, unit = setup.cfg, setup.units[k]
  w_pass, act_pass = _passes(cfg, rnd)
  theta = blocks.to_relative(_trainable(qstate, unit, cfg.learn_act_scale and not w_pass, alpha=not act_pass,
                                        policy=setup.policy, lsq_kinds=tuple(cfg.lsq_kinds)), unit)
  return theta, blocks.unit_aux(setup.params, qstate, unit)


def _precompile_jobs(setup: Setup, rnd: int, first: int, qstate: QState, data: dict, holdout: dict | None,
                     targets: RoundTargets | None) -> list:
  """Compile jobs for units first.. of round rnd (`precompile.Precompiler`): each capture recorder, and for each
  new signature the evaluator and the reconstruction step, all for abstract arguments of the shapes the units
  will see (a unit's inputs from `jax.eval_shape` of its recorder). Empty for a round whose passes an earlier
  round already compiled (PAR rounds reuse round 0's programs)."""
  cfg = setup.cfg
  if setup.precompile_owner.setdefault(_passes(cfg, rnd), rnd) != rnd:
    return []
  grow = lambda tree, m: jax.tree.map(lambda a: _abstract(a, m), tree)  # noqa: E731
  arrays = _arrays(data)
  d = [_abstract(a, cfg.forward_batch) for a in arrays]
  n = int(arrays[0].shape[0])
  steps = jnp.asarray(data['step'])
  n_hold = 0 if holdout is None else int(holdout['step'].shape[0])
  consts = ((setup.params, qstate), setup.params)
  pre = setup.precompiler

  def unit_job(k):
    unit = setup.units[k]
    tg = targets.of(unit.path) if targets is not None else None      # computed already by the main thread
    fn, meta = _io_fn(setup, k, rnd, tg is None)
    pre.run_once(('recorder', id(fn)), lambda: fn.lower(*consts, *d).compile())
    ins, outs = jax.eval_shape(fn, *consts, *d)
    out = grow(outs[unit.path], n) if tg is None else tg[0]
    io = blocks.CapturedIO(list(grow(ins[unit.path], n)), meta[unit.path]['statics'], meta[unit.path]['treedef'],
                           out)
    fns = _unit_fns(setup, rnd, k, io, n)
    theta, aux = _unit_theta(setup, rnd, k, qstate)
    if not theta:
      return
    # the evaluator on the reconstruction set (--eval_units) and the held-out set (--keep_best), in one program
    sets = _eval_sets(cfg, io.leaves, io.output, _abstract(steps),
                      None if n_hold == 0 else (grow(io.leaves, n_hold), grow(io.output, n_hold),
                                                _abstract(steps, n_hold)))
    if sets:
      pre.run_once(('eval', fns.sig, n, n_hold), lambda: fns.eval_fn.lower(theta, aux, sets).compile())
    pre.run_once(('chunk', fns.sig, n), lambda: recon.precompile_chunk(fns.chunk_fn, theta, aux, io.leaves,
                                                                        io.output, steps, cfg.seed))

  return [(('unit', rnd, k), functools.partial(unit_job, k))
          for k in range(first, len(setup.units)) if _selected(cfg, setup.units[k])]


def _eval_sets(cfg: Config, leaves, output, steps, holdout: tuple | None) -> dict:
  """The sets a unit's error is measured on, before and after its reconstruction (`recon.eval_set`): 'recon',
  the reconstruction set (--eval_units: up to 256 samples) and 'holdout', the held-out set (--keep_best: all of
  it); each only when it is asked for and not empty."""
  sets = {'recon': recon.eval_set(leaves, output, steps) if cfg.eval_units else None}
  if holdout is not None:
    sets['holdout'] = recon.eval_set(*holdout, max_samples=int(holdout[2].shape[0]))
  return {k: st for k, st in sets.items() if st is not None}


def reconstruct_unit(setup: Setup, rnd: int, k: int, qstate: QState, data: dict,
                     loss_hook: Callable | None = None, holdout: dict | None = None,
                     targets: RoundTargets | None = None) -> tuple[QState, dict]:
  """BRECQ/AdaRound on unit k in round rnd. Returns (qstate with the unit's trained fields, stats).

  holdout: held-out calibration samples (--keep_best): the unit's result is kept only if its output error on them
  (hard rounding) is lower than the starting point's; else the start is kept. stats records both errors.
  targets: the round's FP unit outputs (`RoundTargets`; None: captured with the unit's inputs)."""
  cfg = setup.cfg
  unit = setup.units[k]
  t0 = time.time()
  w_pass, act_pass = _passes(cfg, rnd)
  tg = targets.of(unit.path) if targets is not None else None
  if setup.precompiler.enabled and loss_hook is None:    # the round's next units compile while this one runs
    setup.precompiler.submit(_precompile_jobs(setup, rnd, k + 1, qstate, data, holdout, targets))
    setup.precompiler.wait(('unit', rnd, k))
  io_fn = _io_fn(setup, k, rnd, tg is None)
  if tg is None:                     # inputs and FP targets in one program
    tg = (None, None)
  io = blocks.capture_unit_io(io_fn, _arrays(data), cfg.forward_batch, in_consts=(setup.params, qstate),
                              out_consts=setup.params, path=unit.path, output=tg[0])
  steps = jnp.asarray(data['step'])
  hio = None
  if holdout is not None:
    hio = blocks.capture_unit_io(io_fn, _arrays(holdout), cfg.forward_batch, in_consts=(setup.params, qstate),
                                 out_consts=setup.params, path=unit.path, output=tg[1])
  t_cap = time.time() - t0
  theta, aux = _unit_theta(setup, rnd, k, qstate)
  theta_start = theta
  if rnd > 0 and cfg.par_alpha == 'reinit' and not act_pass:
    theta = _reinit_alpha(theta)
  n = int(steps.shape[0])
  fns = _unit_fns(setup, rnd, k, io, n)        # units with equal signatures share them (and rounds reuse them)
  rcfg = fns.rcfg
  new = (fns.sig, n) not in setup.trained
  setup.trained.add((fns.sig, n))
  stats = {'unit': unit.path, 'cls': unit.cls, 'round': rnd, 'index': k, 'layers': len(unit.layers),
           'iters': rcfg.iters, 'capture_s': t_cap, 'new_signature': new}
  t_eval = time.time()
  sets = _eval_sets(cfg, io.leaves, io.output, steps, None if hio is None else
                    (hio.leaves, hio.output, jnp.asarray(holdout['step']))) if theta else {}
  before = recon.eval_losses(fns.eval_fn, theta_start, aux, sets)
  t_eval = time.time() - t_eval
  chunk_fn = (fns.chunk_fn if loss_hook is None else
              recon.make_chunk(fns.soft, n, rcfg, loss_hook, step_weights=setup.step_weights))
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), rnd), k)
  try:
    theta, rstats = recon.reconstruct(fns.soft, theta, aux, io.leaves, io.output, steps, rcfg, key,
                                      block=unit.path, chunk_fn=chunk_fn)
  except recon.NonFiniteLossError as e:
    raise CalibrationError(f'{e} (round {rnd}, unit {k}); {cfg.out_dir} keeps the state saved before '
                           f'this unit: fix the cause and re-run to resume') from e
  stats.update({k2: v for k2, v in rstats.items() if k2 != 'iters'})
  t1 = time.time()
  stats['alpha_saturated'] = _alpha_stats(theta)
  after = recon.eval_losses(fns.eval_fn, theta, aux, sets)
  if 'recon' in sets:
    stats['mse_before'], stats['mse_after'] = before['recon'], after['recon']
  if 'holdout' in sets:
    e0, e1 = before['holdout'], after['holdout']
    stats.update(holdout_before=e0, holdout_after=e1, holdout_samples=int(holdout['step'].shape[0]),
                 kept='reconstructed' if e1 < e0 else 'start')
    if not e1 < e0:
      theta = theta_start
  stats['eval_s'] = t_eval + time.time() - t1
  stats['seconds_total'] = time.time() - t0
  return qstate.merge(blocks.to_absolute(theta, unit)), stats


def _zero_bias(setup: Setup):
  """A zero `QState.out_bias` of the shape --eps_bias stores, or None when it is off."""
  mode = setup.cfg.eps_bias
  return None if mode == 'off' else jnp.zeros(eps_bias.bias_shape(setup.n_steps, setup.shape, mode), jnp.float32)


def _unit_scale(setup: Setup):
  """A `QState.out_scale` of ones [n_steps] under --eps_scale, else None."""
  return jnp.ones((setup.n_steps,), jnp.float32) if setup.cfg.eps_scale else None


def fit_eps_bias(setup: Setup, qstate: QState) -> tuple[QState, dict]:
  """--eps_bias: qstate with `out_bias`, the quantized model's (without a bias) mean eps error against FP per
  sampler step on --eps_bias_samples FP trajectories (seed --seed + 2), refitted on the corrected model's own
  trajectories with --eps_bias_rounds > 1 (`eps_bias.fit_rounds`); with --eps_scale also `out_scale`, PTQD's
  1 / (1 + k) per step. Returns (qstate, report entry)."""
  cfg = setup.cfg
  fn = setup.compiled(('eps_bias',), lambda: eps_bias.make_error_sum(setup.q_fwd, setup.fp_fwd))
  seed = cfg.seed + eps_bias.SEED_OFFSET

  def cond_fn(n):
    cond, uncond = family.cond_arrays(setup.mconfig, n, seed)
    return cond, uncond if setup.guidance else None

  def with_bias(bias, scale):        # the quantized model corrected by them (None: uncorrected), and its sampler
    qs = qstate.replace(out_bias=None if bias is None else jnp.asarray(bias),
                        out_scale=None if scale is None else jnp.asarray(scale))
    return (None if bias is None else setup.sampler(setup.q_eps(qs))), (setup.params, qs)

  try:
    bias, scale, info = eps_bias.fit_rounds(setup.sampler(setup.fp_eps), fn, with_bias, setup.params,
                                            cfg.eps_bias_rounds, cfg.eps_bias_samples, setup.sample_batch, seed,
                                            cfg.eps_bias, cond_fn, scale=cfg.eps_scale, cache=setup.eps_fit_cache)
  except FloatingPointError as e:
    raise CalibrationError(f'--eps_bias={cfg.eps_bias}: {e}; {cfg.out_dir} keeps the reconstructed state: re-run '
                           'with --eps_bias=off to finish without the correction') from e
  logging.info('eps bias (%s, %d trajectories): mean %.2e, rms %.2e over the steps (%.1f s)', info['mode'],
               info['samples'], float(np.mean(info['mean_per_step'])), float(np.mean(info['rms_per_step'])),
               info['seconds'])
  return qstate.replace(out_bias=jnp.asarray(bias), out_scale=None if scale is None else jnp.asarray(scale)), info


def gate_stage(setup: Setup, qstate: QState, rnd: int | None) -> tuple[QState, dict]:
  """--recon_gate: scores the model state before reconstruction (rnd None) or after round rnd: its eps bias
  correction fitted first (--eps_bias), then the paired MSE of its final images (decoded, clipped to [-1, 1])
  against FP's from the same --gate_samples noises (`recon_gate`). Unclipped samples would rank a model by its
  out-of-range pixels, which the images never show (measured: a 142-FID state scored best that way).
  Returns (qstate with the fitted correction, gate entry)."""
  cfg = setup.cfg
  t0 = time.time()
  info = None
  if cfg.eps_bias != 'off':
    try:
      qstate, info = fit_eps_bias(setup, qstate)
    except CalibrationError as e:      # a diverged stage (k <= -1, NaN): scored inf, so it is never kept
      logging.warning('recon gate: %s cannot be corrected (%s): scored inf', recon_gate.stage_name(rnd), e)
      return qstate, {'stage': recon_gate.stage_name(rnd), 'score': float('inf'), 'samples': 0,
                      'seconds': round(time.time() - t0, 3), 'eps_bias': None, 'error': str(e)}
  n, seed = cfg.gate_samples, cfg.seed + recon_gate.SEED_OFFSET
  cond, uncond = family.cond_arrays(setup.mconfig, n, seed)

  def final(eps_fn):                 # the images a user gets: decoded (LDM), clipped to the data range [-1, 1]
    images = sample_all(setup.sampler(eps_fn, decode=True), n, setup.sample_batch, seed, cond, uncond, pad=True)
    return np.clip(images[:n], -1.0, 1.0)

  if setup.gate_fp is None:
    setup.gate_fp = final(setup.fp_eps)
  per = recon_gate.per_sample_errors(final(setup.q_eps(qstate)), setup.gate_fp)
  entry = {'stage': recon_gate.stage_name(rnd), 'score': recon_gate.score(per), 'samples': n,
           'seconds': round(time.time() - t0, 3), 'eps_bias': info}
  if np.isfinite(entry['score']):      # what --gate_margin compares stages by
    entry['per_sample'] = [float(v) for v in per]
  logging.info('recon gate: %s scores %.4e (paired MSE of %d final images against FP)', entry['stage'],
               entry['score'], n)
  return qstate, entry


def _gate(setup: Setup, state: CalibState, rnd: int | None) -> CalibState:
  """Scores a stage (`gate_stage`) unless report.json's 'gate' has it (a resumed run); keeps the best so far in
  out_dir/gate_best (and in memory)."""
  entries = state.report.get('gate', [])
  name = recon_gate.stage_name(rnd)
  if any(e['stage'] == name for e in entries):
    return state
  fitted, entry = gate_stage(setup, state.qstate, rnd)
  setup.gate_last = (rnd, fitted) if 'error' not in entry else None
  if not entries or recon_gate.beats(entry, recon_gate.best(entries, setup.cfg.gate_margin), setup.cfg.gate_margin):
    recon_gate.save_best(setup.cfg.out_dir, to_tree(jax.device_get(fitted)), entry)
    setup.gate_best = (fitted, entry)
  return state.replace(report=dict(state.report, gate=entries + [entry]))


def _gate_result(setup: Setup, state: CalibState) -> tuple[QState, dict]:
  """The run's final state under --recon_gate: the best-scoring stage's (its correction fitted), and the report
  entries ('gate_kept', and 'eps_bias' of that stage)."""
  entry = recon_gate.best(state.report['gate'], setup.cfg.gate_margin)
  if 'error' in entry:                 # every stage failed its correction
    raise CalibrationError(f"--recon_gate: no stage could be corrected ({entry['error']})")
  if setup.gate_best is not None and setup.gate_best[1]['stage'] == entry['stage']:
    qstate = setup.gate_best[0]
  else:
    tree, stored = recon_gate.load_best(setup.cfg.out_dir)
    if stored['stage'] != entry['stage']:
      raise CalibrationError(f"{setup.cfg.out_dir}/{recon_gate.BEST_DIR} holds stage {stored['stage']!r}, but "
                             f"report.json's gate kept {entry['stage']!r}: delete the run dir and calibrate again")
    qstate = from_tree(tree)
  logging.info('recon gate: keeping %s (scores %s, margin %g standard errors)', entry['stage'],
               {e['stage']: round(e['score'], 6) for e in state.report['gate']}, setup.cfg.gate_margin)
  info = {'gate_kept': entry['stage']}
  if entry.get('eps_bias') is not None:
    info['eps_bias'] = entry['eps_bias']
  return qstate, info


def sample_grid(setup: Setup, qstate: QState, path: str, images=None) -> None:
  """--png_samples images of the quantized model (seed + 1) as one PNG grid; images: uint8 images to show
  instead (at least --png_samples of them: `Hooks.grid_images`)."""
  cfg = setup.cfg
  n = cfg.png_samples
  if n <= 0:
    return
  if images is None or len(images) < n:
    cond, uncond = family.cond_arrays(setup.mconfig, n, cfg.seed)
    images = to_uint8(sample_all(setup.sampler(setup.q_eps(qstate), decode=True), n, setup.sample_batch,
                                 cfg.seed + 1, cond, uncond, pad=True))
  images = np.asarray(images[:n])
  save_grid(path, images, scale=grid_scale(images.shape[2]))


# ------------------------------------------------------------------------------------------------- run

def run(cfg: Config | dict, hooks: Hooks = Hooks()) -> dict:
  """Runs (or resumes) a calibration; returns the report dict (also written to out_dir/report.json)."""
  cfg = (Config.from_flat(cfg) if isinstance(cfg, dict) else cfg).resolve()
  t_start = time.time()
  compile_stats = CompileStats.start()
  _check_writable(cfg.out_dir)
  setup = Setup(cfg)
  timings: dict = {}
  phases = dict.fromkeys(PHASES, 0.0)
  phases['setup_s'] = time.time() - t_start

  # Checkpoints are written in the background while the next stage runs (synchronously when a hook watches them).
  saver = Saver(setup, background=cfg.background_save and hooks.after_save is None)

  def save(state: CalibState) -> None:
    t0 = time.time()
    saver.save(state)
    phases['checkpoint_s'] += time.time() - t0
    if hooks.after_save is not None:
      hooks.after_save(state)

  def commit(state: CalibState, **progress) -> CalibState:
    state = state.replace(progress=Progress(**progress), ckpt_step=state.ckpt_step + 1)
    save(state)
    return state

  try:
    state = restore_state(setup)
    data = None                      # round 0's calibration set, when this process captured it already
    if state is not None:
      if state.progress.done:
        logging.info('%s holds a finished calibration: nothing to resume', cfg.out_dir)
      else:
        logging.info('resuming %s at round %d, unit %d', cfg.out_dir, state.progress.round, state.progress.next_unit)
        report = dict(state.report)
        report['resumed'] = report.get('resumed', []) + [{'round': state.progress.round,
                                                           'unit': state.progress.next_unit}]
        state = state.replace(report=report)
    else:
      data, timings['capture_round0_s'] = capture(setup, 0)
      phases['capture_s'] += timings['capture_round0_s']
      if hooks.after_capture is not None:
        hooks.after_capture(setup, 0)
      data, _ = par_x_filter(setup, 0, data)
      qstate, init_t, init_info = initialise(setup, data)
      timings.update(init_t)
      for name, key in (('statistics_s', 'tcr_s'), ('weight_init_s', 'weight_init_s'),
                        ('act_search_s', 'act_search_s'), ('tcr_select_s', 'tcr_select_s')):
        phases[name] += init_t.get(key, 0.0)
      state = CalibState(qstate, Progress(), dict(new_report(setup, timings), **init_info), ckpt_step=0)
      save(state)
    gate = cfg.recon_gate and cfg.rounds > 0
    if gate and not state.progress.done and state.progress.round == 0 and state.progress.next_unit == 0:
      t0 = time.time()
      state = _gate(setup, state, None)
      phases['gate_s'] += time.time() - t0
    if not state.progress.done:
      bar = _progress_bar(cfg, setup, state.progress)
      for rnd in range(state.progress.round, cfg.rounds):
        if rnd > 0 and cfg.eps_bias_par and not state.progress.act_done and not cfg.act_pass(rnd):
          t0 = time.time()           # PAR recaptures with the corrected model (the trajectories it will sample)
          if setup.gate_last is not None and setup.gate_last[0] == rnd - 1:      # the gate just fitted it
            fitted = setup.gate_last[1]
            qstate = state.qstate.replace(out_bias=fitted.out_bias, out_scale=fitted.out_scale)
          else:
            qstate, _ = fit_eps_bias(setup, state.qstate)
          phases['eps_bias_s'] += time.time() - t0
          state = state.replace(qstate=qstate)
        if rnd > 0 or data is None:
          data, timings[f'capture_round{rnd}_s'] = capture(setup, rnd, state.qstate)
          phases['capture_s' if rnd == 0 else 'par_capture_s'] += timings[f'capture_round{rnd}_s']
          if hooks.after_capture is not None:
            hooks.after_capture(setup, rnd)
          data, act_data = par_x_filter(setup, rnd, data)
        if rnd > 0 and not state.progress.act_done:
          if cfg.par_research_act or cfg.act_pass(rnd):
            qstate, secs = search_acts(setup, state.qstate, act_data)
            timings['act_search_s'] = timings.get('act_search_s', 0.) + secs
            phases['act_search_s'] += secs
            state = state.replace(qstate=qstate)
          state = commit(state, round=rnd, next_unit=0, act_done=True, done=False)
        data, holdout = par.split_holdout(data, cfg.recon_samples, cfg.holdout_samples if cfg.keep_best else 0,
                                          cfg.seed)
        first = state.progress.next_unit if state.progress.round == rnd else 0
        targets = RoundTargets(setup, data, holdout)
        for k in range(first, len(setup.units)):
          if not _selected(cfg, setup.units[k]):
            continue
          hook = hooks.loss_hook(rnd, k) if hooks.loss_hook is not None else None
          qstate, stats = reconstruct_unit(setup, rnd, k, state.qstate, data, hook, holdout, targets)
          for name, key in (('unit_capture_s', 'capture_s'), ('reconstruction_s', 'seconds'),
                            ('unit_eval_s', 'eval_s')):
            phases[name] += stats.get(key, 0.0)
          report = dict(state.report, units=state.report['units'] + [stats])
          logging.info('round %d unit %d/%d %s: %s', rnd, k + 1, len(setup.units), setup.units[k].path,
                       {a: stats.get(a) for a in ('mse_before', 'mse_after', 'it_per_s')})
          state = commit(state.replace(qstate=qstate, report=report), round=rnd, next_unit=k + 1, act_done=True,
                         done=False)
          if bar is not None:
            bar.set_postfix_str(f'round {rnd} {setup.units[k].path}', refresh=False)
            bar.update(1)
        if gate:
          t0 = time.time()
          state = commit(_gate(setup, state, rnd), round=rnd + 1, next_unit=0, act_done=False, done=False)
          phases['gate_s'] += time.time() - t0
        state = state.replace(progress=Progress(rnd + 1, 0, False, False))
      if bar is not None:
        bar.close()
      if gate:                       # the best-scoring stage, with the correction it was scored with
        qstate, info = _gate_result(setup, state)
        state = state.replace(qstate=qstate, report=dict(state.report, **info))
      elif cfg.eps_bias != 'off':
        t0 = time.time()
        qstate, info = fit_eps_bias(setup, state.qstate)
        phases['eps_bias_s'] += time.time() - t0
        state = state.replace(qstate=qstate, report=dict(state.report, eps_bias=info))
      report = dict(state.report, timings={**state.report.get('timings', {}), **timings},
                    wall_s_this_process=time.time() - t_start)
      if cfg.par_x_range > 0:        # --par_x_range: inputs dropped per PAR round (str keys: JSON)
        report['par_dropped'] = {**state.report.get('par_dropped', {}),
                                 **{str(r): n for r, n in setup.par_dropped.items()}}
      state = commit(state.replace(report=report), round=cfg.rounds, next_unit=0, act_done=True, done=True)
  finally:
    t0 = time.time()
    saver.wait()                     # the last write in flight (also when a stage failed)
    phases['checkpoint_s'] += time.time() - t0
  t0 = time.time()
  extra = hooks.after_run(setup, state.qstate) if hooks.after_run is not None else {}
  phases['after_run_s'] = time.time() - t0
  png = os.path.join(cfg.out_dir, 'samples.png')
  if not os.path.exists(png):
    t0 = time.time()
    given = hooks.grid_images(cfg.png_samples) if hooks.grid_images is not None else None
    sample_grid(setup, state.qstate, png, given)
    phases['sample_grid_s'] = time.time() - t0
    logging.info('sample grid %s (%.1f s%s)', png, phases['sample_grid_s'],
                 '' if given is None else ': images from the end-of-run check')
  phases['total_s'] = time.time() - t_start
  report = dict(state.report, **extra, policy=setup.policy.to_dict(),
                daq_choices=act_search.daq_choices(state.qstate.layers, setup.policy),
                phases_this_process={k: round(v, 3) for k, v in phases.items()},
                compile_this_process=compile_stats.delta(), precompile_this_process=setup.precompiler.stats())
  atomic_io.write_json(os.path.join(cfg.out_dir, 'report.json'), jsonable(report), indent=1)
  return report


# What report.json's `phases_this_process` breaks the wall time into (compile time is inside these phases; the
# process-wide XLA compile count and seconds are in `compile_this_process`).
PHASES = ('setup_s', 'capture_s', 'statistics_s', 'tcr_select_s', 'weight_init_s', 'act_search_s', 'par_capture_s',
          'unit_capture_s', 'unit_eval_s', 'reconstruction_s', 'eps_bias_s', 'gate_s', 'checkpoint_s', 'sample_grid_s',
          'after_run_s')


def _check_writable(out_dir: str) -> None:
  """Fail before any work when out_dir cannot be created or written."""
  try:
    os.makedirs(out_dir, exist_ok=True)
    probe = os.path.join(out_dir, f'.write_test_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise CalibrationError(f'--out_dir={out_dir!r} is not writable: {e.strerror or e}') from e


def _selected(cfg: Config, unit: blocks.Unit) -> bool:
  return not cfg.recon_units or re.search(cfg.recon_units, unit.path) is not None


def _progress_bar(cfg: Config, setup: Setup, progress: Progress):
  """One bar over the (round, unit) reconstructions still to do, with the estimated time left."""
  if not cfg.progress:
    return None
  from tqdm import tqdm
  n_sel = sum(_selected(cfg, u) for u in setup.units)
  done_now = sum(_selected(cfg, u) for u in setup.units[:progress.next_unit]) if progress.round < cfg.rounds else 0
  total = n_sel * cfg.rounds
  return tqdm(total=total, initial=min(total, progress.round * n_sel + done_now), desc='calibrate', unit='unit',
              dynamic_ncols=True)
