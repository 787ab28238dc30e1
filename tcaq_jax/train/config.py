"""The calibration config: one typed, frozen dataclass, resolved once (method defaults applied), with every
field's help text in its definition (so `python -m tcaq_jax.train.calibrate --help` explains each flag).

  cfg = Config(method='qdiff', w_bits=4, a_bits=4).resolve()        # programmatic
  cfg = Config.from_flat({'recon_iters': 100, 'w_bits': 6})          # flat flag names, as in flagfiles
  define_flags(); cfg = config_from_flags()                          # the CLI (flags defined only there)

The reconstruction optimiser settings are nested (`cfg.recon`, a `recon.ReconConfig`); their flags keep flat
names (`--recon_iters`, `--recon_batch`, `--lr`, ...). `to_flat()` gives the JSON form stored in a run's
checkpoint meta (flag name -> value), which resuming compares against.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterator

from tcaq_jax.train.act_search import DEFAULT_PCTS, ENDS
from tcaq_jax.train.recon import ReconConfig

__all__ = ['CalibrationError', 'ConfigError', 'Config', 'METHOD_DEFAULTS', 'MODEL_DEFAULTS', 'TRI_STATE',
           'RECON_TRI_STATE', 'RESUMABLE', 'ADDED_LATER', 'with_added_later', 'inert_fields', 'flat_fields',
           'define_flags', 'config_from_flags']

# Method defaults (flat flag names). 'qdiff' is Q-Diffusion's released CIFAR-10 recipe point by point
# (docs/METHOD_NOTES.md cites the lines of its code); 'qdiff_plus' is the stronger BRECQ variant this project used
# as 'qdiff' before (Lp weight init, percentile-searched asymmetric activations, LSQ scales learned jointly with
# AdaRound while activations are quantized).
_COMMON = dict(tcr=False, daq=False, par=False, act_per_step=False, schedule='joint', act_init='search',
               w_split=False, recon_order='call', daq_rule='error', recon_batch=16, act_lr=4e-5,
               calib_step_rule='linspace', keep_best=False, act_criterion='input', eps_bias='off', act_minmax_bits=0,
               recon_gate=False, eps_scale=False)
METHOD_DEFAULTS = {
    # tcaq's learn_act_scale: by bit width in resolve() (TCAQ_LSQ_A_BITS); False is what other widths get
    'tcaq': dict(_COMMON, tcr=True, daq=True, par=True, act_per_step=True, learn_act_scale=False, weight_init='lp',
                 reconstruct=True, keep_best=True, act_lr=4e-4, eps_bias='pixel', act_minmax_bits=8,
                 recon_gate=True, eps_scale=True),
    'qdiff': dict(_COMMON, learn_act_scale=True, weight_init='minmax', reconstruct=True, schedule='two_pass',
                  act_init='minmax_sym', w_split=True, recon_order='registration', recon_batch=32, act_lr=4e-4,
                  calib_step_rule='interval'),
    'qdiff_plus': dict(_COMMON, learn_act_scale=True, weight_init='lp', reconstruct=True),
    'minmax': dict(_COMMON, learn_act_scale=False, weight_init='minmax', reconstruct=False),
}
# tcaq learns its activation step sizes (LSQ, per calibration slot, jointly with AdaRound, --act_lr 4e-4) at these
# activation bit widths (--learn_act_scale unset). Measured on the demo (docs/results/fidelity.md): W6A6 at
# iters_scale 0.005, 2,000 samples: digits-FID 3.85 -> 3.48 (FP 2.45), MSE vs FP's samples 3.76e-3 -> 3.48e-3;
# W4A4, 500 samples: FID 35.6 -> 45.6, MSE 53.8e-3 -> 69.9e-3, speckle 2.1x -> 4.5x FP (worse: off at 4 bits);
# 8-bit activations have little error to gain from it and it costs reconstruction time; other widths unmeasured.
TCAQ_LSQ_A_BITS = (6,)

# Fields whose None means "the model's default": the paper's sizes for real models, CPU-sized ones for the
# shipped demo (no --model_dir and no --model_config), so `python -m tcaq_jax.train.calibrate` is a quick first run.
MODEL_DEFAULTS = {
    'paper': dict(num_steps=100, calib_samples=256, recon_samples=0, iters_scale=1.0),
    'demo': dict(num_steps=50, calib_samples=32, recon_samples=320, iters_scale=0.005),
}
# Fields whose None means "the method's default" (METHOD_DEFAULTS).
TRI_STATE = ('tcr', 'daq', 'par', 'act_per_step', 'learn_act_scale', 'weight_init', 'reconstruct', 'schedule',
             'act_init', 'w_split', 'recon_order', 'daq_rule', 'calib_step_rule', 'keep_best', 'act_criterion',
             'eps_bias', 'act_minmax_bits', 'recon_gate', 'eps_scale')
# Nested reconstruction fields whose None means "the method's default" (flag name -> ReconConfig field).
RECON_TRI_STATE = {'recon_batch': 'batch', 'act_lr': 'act_lr'}
# Flags that may change between a run and its resumption (they do not change the result).
# Fields added after runs were stored, with the value that reproduces what those runs did: a stored config
# without one of them reads as this value (`with_added_later`: bench/demo_table.py reuses its rows, resuming
# compares against it).
ADDED_LATER = {'act_ends': 'paired', 'lsq_kinds': ('conv', 'dense', 'matmul', 'softmax'), 'lr_budget_cap': 1.0,
               'eps_bias': 'off', 'eps_bias_samples': 64, 'eps_bias_rounds': 1,
               'eps_bias_par': False, 'act_minmax_bits': 0, 'recon_gate': False, 'gate_samples': 256,
               'recon_step_weight': 0.0, 'eps_scale': False, 'par_x_range': 0.0, 'par_x_scope': 'all',
               'gate_margin': 0.0}


def with_added_later(flat: dict) -> dict:
  """A stored flat config with the fields it predates filled in from ADDED_LATER (in its JSON form: lists)."""
  return {**json.loads(json.dumps(ADDED_LATER)), **flat}


def inert_fields(flat: dict) -> set:
  """The fields of a resolved flat config (`Config.to_flat`) that cannot change its run, given the others: the
  gate's without a gate (no --recon_gate, or nothing reconstructed), the eps correction's with --eps_bias=off,
  PAR's without PAR rounds (the two-pass schedule keeps them: its second pass is a round 1). bench/demo_table.py
  compares stored rows without them, so a default change of one re-runs only the rows that use it."""
  out = set()
  rebuilds = flat['reconstruct']
  if not (flat['recon_gate'] and rebuilds):
    out |= {'gate_samples', 'gate_margin'}
  if flat['eps_bias'] == 'off':
    out |= {'eps_bias_samples', 'eps_bias_rounds', 'eps_bias_par', 'eps_scale'}
  if not rebuilds or (not flat['par'] and flat['schedule'] != 'two_pass'):
    out |= {'par_rounds', 'par_alpha', 'par_research_act', 'par_x_range', 'par_x_scope', 'eps_bias_par'}
  return out


# Quantization-point kinds (tcaq_jax.quant.policy) whose step sizes --learn_act_scale learns by default.
LSQ_KINDS = ('conv', 'dense', 'matmul', 'softmax')

RESUMABLE = ('out_dir', 'png_samples', 'progress', 'chunk', 'forward_batch', 'capture_batch', 'sampler_loop', 'recon_loop',
             'eval_units', 'target_cache_mb', 'background_save', 'precompile', 'precompile_workers')


# --tcr_select=auto: the per-layer TCR choice when weights and activations both have at least this many bits, TCR
# on every layer (the paper) otherwise. Session 5 (no eps bias correction, no --recon_gate) measured the choice
# worse below 6 bits (W6A6 5.33 vs 6.81, W4A8 19.62 vs 12.83, W4A4 85.4 vs 35.6); with both, session 12's W4A4
# (2,000-sample demo table) is 14.35 / paired MSE 26.0e-3 with the choice against 25.19 / 57.0e-3 with TCR on every
# layer and 15.42 / 36.8e-3 without TCR (docs/results/fidelity.md).
TCR_SELECT_MIN_BITS = 4


class CalibrationError(RuntimeError):
  """The calibration cannot proceed (bad flag combination, incompatible out_dir, non-finite loss, ...)."""


class ConfigError(CalibrationError, ValueError):
  """A flag value or combination the calibration cannot run with (the message names the flag)."""


def _f(default, help_: str, **meta):
  if isinstance(default, (list, dict)):
    raise TypeError('use tuples for sequence defaults')
  return dataclasses.field(default=default, metadata={'help': help_, **meta})


@dataclasses.dataclass(frozen=True)
class Config:
  """Every option of the calibration pipeline. Each field is a flag of the same name (nested ones: see
  `flat_fields`). None = the method's default (filled by `resolve`)."""
  # model
  model_dir: str = _f('', "converted model dir (tcaq_jax.models.convert --out); '' with no --model_config: the "
                          'shipped digits demo UNet')
  model_config: str = _f('', 'named model config with random weights instead of a model dir (tests, benchmarks), '
                             'e.g. ddim_cifar10, ddim_tiny')
  out_dir: str = _f('', 'run directory (checkpoints, report.json, samples.png); re-running with the same dir '
                        "resumes; '' -> runs/calib/<model>_<method>_w<w>a<a>")
  seed: int = _f(0, 'seed of the calibration capture, subsets, minibatches and the sample grid')
  # sampler (calibration capture, PAR recapture, the sample grid)
  num_steps: int | None = _f(None, 'DDIM steps of the sampler the model is calibrated for (and samples with); '
                                     'default 100 (the paper), the shipped demo 50', kind=int)
  skip_type: str = _f('quad', "DDIM step sequence: 'uniform' or 'quad'", enum=('uniform', 'quad'))
  eta: float = _f(0.0, 'DDIM eta (0: deterministic; 1: DDPM posterior variance)')
  guidance_scale: float = _f(1.0, 'classifier-free guidance scale for class-conditional LDMs (1: none)')
  sampler_loop: str = _f('auto', "'device': the trajectory is one lax.scan; 'host': a Python loop over one "
                                  "jitted step (XLA:CPU runs scan bodies ~20x slower); 'auto': host on CPU",
                         enum=('auto', 'device', 'host'))
  # calibration data
  calib_dir: str = _f('', "an existing capture (tcaq_jax.diffusion.capture) to calibrate on; '' -> capture one "
                          'into out_dir/calib_round0')
  calib_steps: int = _f(20, 'sampler steps recorded for calibration (evenly spaced, first and last included)')
  calib_step_rule: str | None = _f(None, "which sampler steps are calibrated: 'linspace' (--calib_steps evenly "
                                         "spaced, first and last included) or 'interval' (Q-Diffusion's "
                                         "range(0, num_steps, num_steps // calib_steps): the last steps are left "
                                         "out; all steps are captured, then subset) (default: the method's)",
                                   enum=('linspace', 'interval'))
  calib_samples: int | None = _f(None, 'calibration samples per recorded step; default 256 (the paper), the '
                                         'shipped demo 32', kind=int)
  capture_batch: int = _f(64, 'batch size of the capture / recapture / grid sampler')
  forward_batch: int = _f(64, 'batch size of the forwards that collect statistics and unit inputs / outputs')
  recon_samples: int | None = _f(None, 'reconstruction set size (a random subset of the calibration set); 0 = '
                                         'all; default all, the shipped demo 320', kind=int)
  recon_units: str = _f('', "regex: reconstruct only the units whose module path matches ('' = all)")
  # policy and bits
  method: str = _f('tcaq', "tcaq: TCR + DAQ + BRECQ/AdaRound + PAR; qdiff: Q-Diffusion's released CIFAR-10 "
                           'recipe (min-max init, AdaRound pass with FP activations, then an activation-scale '
                           'pass); qdiff_plus: a stronger BRECQ variant (Lp init, searched ranges, AdaRound and '
                           'LSQ scales jointly); minmax: min-max PTQ without reconstruction',
                   enum=tuple(METHOD_DEFAULTS))
  preset: str = _f('qdiff', "quantization policy preset: 'qdiff' (every conv/linear, attention matmuls, "
                            "post-Softmax) or 'tfmq' (TFMQ-DM's FP layers)", enum=('qdiff', 'tfmq'))
  policy_override: tuple = _f((), "policy rules REGEX:SPEC applied after the preset, e.g. 'conv_out$:w8a8', "
                                  "'temb:fp' (repeat the flag for several)", multi=True)
  w_bits: int = _f(4, 'weight bit width (2..16)')
  a_bits: int = _f(8, 'activation bit width (2..16)')
  softmax_bits: int = _f(8, 'post-Softmax bit width (2..16)')
  # TCAQ components (None = the method's default)
  tcr: bool | None = _f(None, "timestep-channel joint reparameterization (default: the method's)")
  daq: bool | None = _f(None, "dynamically adaptive post-Softmax quantizer, log2 or uniform per step (default: "
                              "the method's)")
  par: bool | None = _f(None, "progressively aligned reconstruction rounds on recaptured data (default: the "
                              "method's)")
  act_per_step: bool | None = _f(None, "one activation scale per calibration step instead of one for all steps "
                                       "(default: the method's)")
  learn_act_scale: bool | None = _f(None, "learn activation scales (LSQ) during reconstruction (default: the "
                                          f"method's; tcaq: on at --a_bits in {list(TCAQ_LSQ_A_BITS)})")
  lsq_kinds: tuple = _f(LSQ_KINDS, 'kinds of quantization points whose activation step sizes LSQ learns (with '
                                   '--learn_act_scale; the others keep their searched steps): conv / dense (layer '
                                   'inputs), matmul (attention operands), softmax (post-Softmax)')
  weight_init: str | None = _f(None, "weight scale init: 'lp' (BRECQ Lp search, p=2.4) or 'minmax' (default: "
                                     "the method's)", enum=('lp', 'minmax'))
  reconstruct: bool | None = _f(None, "run BRECQ/AdaRound block reconstruction (default: the method's)")
  schedule: str | None = _f(None, "'joint': AdaRound (and learned activation scales) with activations quantized; "
                                  "'two_pass' (Q-Diffusion): AdaRound with activations FP, then only the "
                                  "activation scales (--act_iters, --act_lr with cosine decay, loss --act_p) "
                                  "(default: the method's)", enum=('joint', 'two_pass'))
  act_init: str | None = _f(None, "activation range init: 'search' (percentile search, asymmetric) or "
                                  "'minmax_sym' (Q-Diffusion --a_sym: symmetric signed min-max on "
                                  "--act_init_samples random calibration samples through the weight-quantized "
                                  "model) (default: the method's)", enum=('search', 'minmax_sym'))
  act_init_samples: int = _f(64, "random calibration samples (per slot) of --act_init=minmax_sym")
  w_split: bool | None = _f(None, "the weight quantizer of a shortcut conv fed by a concatenation is split at the "
                                  "boundary too (one per-channel scale per segment) (default: the method's)")
  recon_order: str | None = _f(None, "reconstruction unit order: 'call' (forward order) or 'registration' "
                                     "(PyTorch module registration order, Q-Diffusion) (default: the method's)",
                               enum=('call', 'registration'))
  r_tru: float = _f(-1.0, 'TCR truncation R_tru; 0 = none; -1 = the paper default (3 at W4A8, else none)')
  tcr_target: str = _f('min', "TCR target range over channels per step: 'min' or 'mean'", enum=('min', 'mean'))
  tcr_dense: bool = _f(True, 'TCR also on linear layers (false: conv only)')
  tcr_select: str = _f('auto', "which layers take TCR: 'error' (per layer the ratio r^e, e in --tcr_exponents, "
                               "with the lowest quantized output error of the layer on calibration data; e = 0 "
                               "is no TCR; weights and activations quantized), 'act_error' (the same with only "
                               "the activations quantized in the measure), 'rel_error' (each calibration step's "
                               "error relative to its FP output power, so every step counts alike), 'all' (the "
                               "paper: every layer takes r) or 'auto' ('error' when --w_bits and --a_bits are "
                               f">= {TCR_SELECT_MIN_BITS}, else 'all': measured on the demo, "
                               "docs/METHOD_NOTES.md)",
                      enum=('auto', 'error', 'act_error', 'rel_error', 'all'))
  tcr_exponents: tuple = _f((0.0, 0.5, 1.0), 'exponents e of the tempered TCR ratios r^e that --tcr_select=error '
                                             'chooses among (0 = no TCR, 1 = the paper\'s r)', item=float)
  daq_log_kind: str = _f('log2', "DAQ's log quantizer for --daq_rule=llr: 'log2' or 'logsqrt2'",
                         enum=('log2', 'logsqrt2'))
  daq_rule: str | None = _f(None, "DAQ choice per layer and step: 'error' (uniform / log2 / log-sqrt2, the one "
                                  "with the lowest error of probabilities @ V on calibration data) or 'llr' (the "
                                  "paper's power-law likelihood-ratio test, log kind --daq_log_kind) (default: "
                                  "the method's)", enum=('error', 'llr'))
  act_criterion: str | None = _f(None, "what scores a conv / linear input's clipping candidates in the activation "
                                       "search: 'input' (MSE of the quantized input) or 'output' (MSE of the "
                                       "layer's output, FP weights W diag(r), against its FP output) (default: the "
                                       "method's)", enum=('input', 'output'))
  act_ends: str = _f('paired', "how the activation search pairs a conv / linear input's two tails: 'paired' "
                              "(candidate p clips both at percentile p) or 'independent' (every low x high "
                              "candidate, len(--act_pcts)^2 of them)", enum=ENDS)
  act_minmax_bits: int | None = _f(None, 'activations of at least this many bits (--a_bits) take min-max ranges per '
                                         'calibration slot (--act_pcts=100: no clipping) instead of the percentile '
                                         "search; 0 = always search (default: the method's; tcaq: 8, measured on the "
                                         'demo with the eps bias correction: W8A8 paired MSE 0.58e-3 -> 0.35e-3, '
                                         'W4A8 digits-FID 3.84 -> 2.74; docs/results/fidelity.md, session 11)',
                                   kind=int)
  act_batch: int = _f(64, 'calibration samples per step for the activation range search')
  act_pcts: tuple = _f(DEFAULT_PCTS, 'percentile candidates of the activation range search (100 = min-max)',
                       item=float)
  # reconstruction
  recon: ReconConfig = dataclasses.field(default_factory=ReconConfig, metadata={'nested': True})
  par_iters: int = _f(10000, 'iterations per unit in each PAR round (scaled by --iters_scale)')
  par_rounds: int = _f(2, 'PAR rounds after the first reconstruction')
  keep_best: bool | None = _f(None, "keep a unit's reconstruction (each round) only if it lowers the unit's output "
                                    "error on --holdout_samples held-out calibration samples against its starting "
                                    "point, else keep the start (default: the method's; tcaq: true)")
  holdout_samples: int = _f(64, 'calibration samples held out of reconstruction for --keep_best: drawn from those '
                                'outside the reconstruction subset, and when too few are left, from it (at most '
                                'a quarter of it)')
  par_alpha: str = _f('carry', "AdaRound alphas at the start of a PAR round: 'carry' (as the previous round left "
                                "them) or 'reinit' (re-initialised from its hard rounding, h(alpha) = 0.25 / 0.75, "
                                "so that saturated alphas get gradients again)", enum=('carry', 'reinit'))
  par_research_act: bool = _f(True, 're-search activation scales on the recaptured data of each PAR round')
  par_x_range: float = _f(0.0, "PAR rounds drop recaptured calibration inputs x_t whose max |x_t| exceeds this "
                               "times the FP capture's max at the same sampler step (diverging pixels of the "
                               "quantized trajectories); 0 = keep all (default; 1.5 measured better at W6A6 and "
                               'worse at W4A8 on the demo: METHOD_NOTES). A step that would lose every input keeps '
                               'them all', kind=float)
  par_x_scope: str = _f('all', "what --par_x_range drops the out-of-range inputs from: 'all' (the PAR round's "
                               "activation re-search and its reconstruction) or 'act' (the activation re-search "
                               "only; reconstruction still fits every recaptured input)", enum=('all', 'act'))
  iters_scale: float | None = _f(None, 'multiplies --recon_iters and --par_iters; default 1 (the paper\'s '
                                       '20k / 10k), the shipped demo 0.005 (a CPU-sized run)', kind=float)
  lr_budget_cap: float = _f(1.0, "below the paper's budget (--iters_scale < 1) multiply the AdaRound lr (--lr) by "
                                 'min(this, 1 / iters_scale); 1 = --lr as given (default). Measured on the demo at '
                                 'W4A8 with 10: at iters_scale 0.02 digits-FID 20.1 -> 11.8 (2,000 samples), but at '
                                 'the demo default 0.005 16.3 -> 79.0 (256 samples): not a default '
                                 '(docs/results/fidelity.md, session 10)', kind=float)
  # output bias correction (train/eps_bias.py)
  eps_bias: str | None = _f(None, "after reconstruction, subtract the quantized model's mean eps error (against the "
                                  'FP model, on --eps_bias_samples FP sampling trajectories, per sampler step) '
                                  "from its eps at every step: 'pixel' (a map per step), 'channel' (per step and "
                                  "channel) or 'off' (default: the method's; tcaq: pixel)",
                          enum=('off', 'channel', 'pixel'))
  eps_bias_samples: int = _f(64, 'FP sampling trajectories (seed --seed + 2, whole --capture_batch batches) the '
                                 '--eps_bias correction is measured on')
  eps_bias_par: bool = _f(False, 'with --eps_bias: also fit the correction before each PAR recapture, so that the '
                                 "recaptured calibration set comes from the corrected quantized model's trajectories")
  eps_bias_rounds: int = _f(1, '--eps_bias fits: the first on FP trajectories, each further one on the corrected '
                               "quantized model's own trajectories (same noise), adding the mean error still left")
  eps_scale: bool | None = _f(None, "with --eps_bias: also divide each step's corrected eps by 1 + k, k the slope of "
                                     "the eps error on FP's eps over the same trajectories (PTQD's correlated-noise "
                                     "correction; one scalar per step). Default: the method's (tcaq: true) when "
                                     '--eps_bias is on, else false')
  # the whole-model gate over the reconstruction stages (train/recon_gate.py)
  recon_gate: bool | None = _f(None, 'score the model before reconstruction and after each round by the paired MSE '
                                     "of its final images (clipped to [-1, 1]) against FP's (--gate_samples "
                                     'noises, seed --seed + 3; each with its own --eps_bias correction) and end with '
                                     "the best (default: the method's; tcaq: true)")
  gate_samples: int = _f(256, 'noises (paired FP and quantized samples) each --recon_gate score is measured on '
                              '(64 measured too noisy on the demo at W6A6: it ranked round 0 over round 2, 2.65 vs '
                              '2.68e-3, where 2,000 samples give 4.04 vs 3.28e-3)')
  gate_margin: float = _f(0.0, 'with --recon_gate: a later stage replaces the one kept before it only if its '
                               'paired per-sample errors are lower by more than this many standard errors of the '
                               'difference (0: any lower score)')
  eval_units: bool = _f(True, "record each unit's block MSE before and after reconstruction (report.json)")
  precompile: bool = _f(True, "compile the round's next units' programs (capture, evaluator, reconstruction "
                              'step) on background threads while a unit runs (same results)')
  precompile_workers: int = _f(0, 'threads that compile ahead with --precompile; 0: 1 on a machine with up to 4 '
                                  'CPU cores (a 2-core run measured no faster with 2: the compiles only slowed '
                                  'each other), else 2', kind=int)
  background_save: bool = _f(True, 'write each checkpoint on a background thread while the next unit runs (a kill '
                                   'mid-write keeps the previous step)')
  target_cache_mb: int = _f(1024, "FP outputs (reconstruction targets) of every unit computed in one FP pass per "
                                  "round and kept when they fit in this many MB (else each unit's capture runs the "
                                  "FP forward again); 0: off")
  # outputs
  png_samples: int = _f(16, 'images in out_dir/samples.png (0: no grid)')
  progress: bool = _f(True, 'show a progress bar over the unit reconstructions with the estimated time left')

  # ------------------------------------------------------------------ resolution
  def resolve(self) -> 'Config':
    """Method defaults filled in, derived values set, values checked. Idempotent."""
    if self.method not in METHOD_DEFAULTS:
      raise ConfigError(f'--method={self.method!r}: expected one of {sorted(METHOD_DEFAULTS)}')
    sizes = MODEL_DEFAULTS['demo' if self.is_demo else 'paper']
    self = dataclasses.replace(self, **{k: v for k, v in sizes.items() if getattr(self, k) is None})
    md = METHOD_DEFAULTS[self.method]
    recon_new = {field: md[flag] for flag, field in RECON_TRI_STATE.items() if getattr(self.recon, field) is None}
    if recon_new:
      self = dataclasses.replace(self, recon=dataclasses.replace(self.recon, **recon_new))
    self._check_ranges()
    if not (md['reconstruct'] if self.reconstruct is None else self.reconstruct):
      for name in ('par', 'learn_act_scale'):
        if getattr(self, name):
          raise ConfigError(f'--{name}=true has no effect without reconstruction (--method={self.method}'
                            f'{", --reconstruct=false" if self.reconstruct is False else ""}): drop it')
    new: dict[str, Any] = {k: md[k] for k in TRI_STATE if getattr(self, k) is None}
    for name in ('w_bits', 'a_bits', 'softmax_bits'):
      if not 2 <= getattr(self, name) <= 16:
        raise ConfigError(f'--{name}={getattr(self, name)}: expected 2..16')
    if self.r_tru < 0:
      new['r_tru'] = 3.0 if (self.w_bits, self.a_bits) == (4, 8) else 0.0
    if self.eps_scale is None and new.get('eps_bias', self.eps_bias) == 'off':
      new['eps_scale'] = False                                          # the scale is fitted with the bias
    if self.method == 'tcaq' and self.learn_act_scale is None:        # off again below without reconstruction
      new['learn_act_scale'] = self.a_bits in TCAQ_LSQ_A_BITS
    if self.par_x_scope != 'all' and not self.par_x_range:
      raise ConfigError(f'--par_x_scope={self.par_x_scope} has no effect without --par_x_range (> 0)')
    minmax_bits = new.get('act_minmax_bits', self.act_minmax_bits)
    if minmax_bits < 0:
      raise ConfigError(f'--act_minmax_bits={minmax_bits}: must be >= 0')
    # min-max activation ranges (no search): --method=minmax, or tcaq's --act_minmax_bits at these --a_bits
    forced = ('with --method=minmax (min-max ranges): drop it' if self.method == 'minmax' else
              f'at --a_bits={self.a_bits} with --act_minmax_bits={minmax_bits} (min-max ranges): pass '
              '--act_minmax_bits=0 to search them' if minmax_bits and self.a_bits >= minmax_bits else None)
    if forced:
      if tuple(float(p) for p in self.act_pcts) not in ((100.0,), tuple(DEFAULT_PCTS)):
        raise ConfigError(f'--act_pcts={",".join(map(str, self.act_pcts))} has no effect {forced}')
      new['act_pcts'] = (100.0,)
    new['act_pcts'] = tuple(float(p) for p in new.get('act_pcts', self.act_pcts))
    new['tcr_exponents'] = tuple(float(e) for e in self.tcr_exponents)
    if self.tcr_select == 'auto':
      new['tcr_select'] = 'error' if min(self.w_bits, self.a_bits) >= TCR_SELECT_MIN_BITS else 'all'
    new['policy_override'] = tuple(self.policy_override)
    cfg = dataclasses.replace(self, **new)
    if cfg.learn_act_scale and not cfg.reconstruct:
      cfg = dataclasses.replace(cfg, learn_act_scale=False)
    cfg._check_combinations()
    if not cfg.out_dir:
      model = (os.path.basename(os.path.normpath(cfg.model_dir)) if cfg.model_dir
               else (cfg.model_config or 'demo'))
      cfg = dataclasses.replace(cfg, out_dir=os.path.join('runs', 'calib',
                                                          f'{model}_{cfg.method}_w{cfg.w_bits}a{cfg.a_bits}'))
    return cfg

  def _check_combinations(self) -> None:
    """Refuses resolved option combinations that cannot run (ConfigError names the flags)."""
    if self.schedule == 'two_pass':
      if not self.reconstruct:
        raise ConfigError('--schedule=two_pass needs reconstruction (--reconstruct=false given)')
      if self.par:
        raise ConfigError('--schedule=two_pass with --par=true is not supported (PAR rounds reconstruct jointly)')
      if not self.learn_act_scale:
        raise ConfigError('--schedule=two_pass learns the activation scales in its second pass: '
                          '--learn_act_scale=false contradicts it')
    if self.eps_bias_par and self.eps_bias == 'off':
      raise ConfigError('--eps_bias_par=true fits the --eps_bias correction before each PAR recapture: it needs '
                        '--eps_bias=pixel or channel (it is off)')
    if self.eps_scale and self.eps_bias == 'off':
      raise ConfigError('--eps_scale=true is fitted with the --eps_bias correction: it needs --eps_bias=pixel or '
                        'channel (it is off)')
    if self.act_init == 'minmax_sym' and self.daq:
      raise ConfigError('--act_init=minmax_sym has no DAQ (post-Softmax min-max like Q-Diffusion): use '
                        '--daq=false or --act_init=search')

  @property
  def is_demo(self) -> bool:
    """True when calibrating the shipped demo UNet (no --model_dir, no --model_config)."""
    return not self.model_dir and not self.model_config

  def _check_ranges(self) -> None:
    """Every numeric flag in its meaningful range, every enum flag one of its values, the regex compiles
    (ConfigError names the flag)."""
    at_least = {'num_steps': 1, 'calib_steps': 1, 'calib_samples': 1, 'capture_batch': 1, 'forward_batch': 1,
                'recon_samples': 0, 'act_batch': 1, 'par_iters': 0, 'par_rounds': 0, 'iters_scale': 0.0,
                'png_samples': 0, 'eta': 0.0, 'recon_iters': 0, 'recon_batch': 1, 'chunk': 1, 'lam': 0.0, 'act_iters': 0, 'act_init_samples': 1,
                'precompile_workers': 0, 'lr_budget_cap': 1.0, 'eps_bias_samples': 1, 'eps_bias_rounds': 1,
                'gate_samples': 1, 'recon_step_weight': 0.0, 'par_x_range': 0.0, 'gate_margin': 0.0}
    flat = {name: _get(self, path) for name, path, _ in flat_fields()}
    for name, _, f in flat_fields():              # the flags parser checks these; a dict config must too
      allowed = f.metadata.get('enum')
      if allowed and flat[name] is not None and flat[name] not in allowed:
        raise ConfigError(f'--{name}={flat[name]!r}: expected one of {list(allowed)}')
    for name, low in at_least.items():
      if flat[name] < low:
        raise ConfigError(f'--{name}={flat[name]}: must be >= {low}')
    for name in ('lr', 'act_lr', 'guidance_scale', 'act_p'):
      if not flat[name] > 0:
        raise ConfigError(f'--{name}={flat[name]}: must be > 0')
    if self.calib_steps > self.num_steps:
      raise ConfigError(f'--calib_steps={self.calib_steps} exceeds --num_steps={self.num_steps}')
    if not 0.0 <= self.recon.warmup < 1.0:
      raise ConfigError(f'--warmup={self.recon.warmup}: must be in [0, 1)')
    if not (self.r_tru in (-1.0, 0.0) or self.r_tru >= 1.0):
      raise ConfigError(f'--r_tru={self.r_tru}: must be -1 (paper default), 0 (none) or >= 1')
    bad = [p for p in self.act_pcts if not 0.0 < float(p) <= 100.0]
    if bad or not self.act_pcts:
      raise ConfigError(f'--act_pcts: percentiles must be in (0, 100], got {list(self.act_pcts)}')
    bad = [k for k in self.lsq_kinds if k not in LSQ_KINDS]
    if bad:
      raise ConfigError(f'--lsq_kinds: expected kinds among {list(LSQ_KINDS)}, got {list(self.lsq_kinds)}')
    exps = [float(e) for e in self.tcr_exponents]
    if not exps or any(not 0.0 <= e <= 4.0 for e in exps) or len(set(exps)) != len(exps):
      raise ConfigError(f'--tcr_exponents: distinct exponents in [0, 4] expected, got {list(self.tcr_exponents)}')
    if self.recon_units:
      try:
        re.compile(self.recon_units)
      except re.error as e:
        raise ConfigError(f'--recon_units={self.recon_units!r} is not a valid regex: {e}') from e

  @property
  def rounds(self) -> int:
    """Reconstruction rounds: 1 + PAR rounds (0 when the method does not reconstruct)."""
    if not self.reconstruct:
      return 0
    if self.schedule == 'two_pass':
      return 2
    return 1 + (self.par_rounds if self.par else 0)

  def act_pass(self, rnd: int) -> bool:
    """True for the activation-scale pass (round 1 of --schedule=two_pass)."""
    return self.schedule == 'two_pass' and rnd == 1

  def round_iters(self, rnd: int) -> int:
    """Iterations per unit in round `rnd` (0: the first reconstruction, > 0: PAR or the activation pass)."""
    base = self.recon.act_iters if self.act_pass(rnd) else (self.recon.iters if rnd == 0 else self.par_iters)
    return int(round(base * self.iters_scale))

  @property
  def adaround_lr(self) -> float:
    """The AdaRound lr the reconstruction uses: --lr x min(--lr_budget_cap, 1 / --iters_scale) below the paper's
    budget, --lr at or above it."""
    scale = self.iters_scale if self.iters_scale is not None else 1.0
    return float(self.recon.lr) * (min(float(self.lr_budget_cap), 1.0 / scale) if 0.0 < scale < 1.0 else 1.0)

  def recon_for_round(self, rnd: int) -> ReconConfig:
    return dataclasses.replace(self.recon, iters=self.round_iters(rnd), act_pass=self.act_pass(rnd),
                               lr=self.adaround_lr)

  # ------------------------------------------------------------------ flat (flag-name) form
  def to_flat(self) -> dict:
    """{flag name: JSON value} (tuples as lists): what a run stores and resuming compares."""
    out = {name: _get(self, path) for name, path, _ in flat_fields()}
    return json.loads(json.dumps(out, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))

  @classmethod
  def from_flat(cls, flat: dict) -> 'Config':
    """A Config from {flag name: value} (unknown names raise ConfigError listing them)."""
    specs = {name: (path, f) for name, path, f in flat_fields()}
    unknown = sorted(set(flat) - set(specs))
    if unknown:
      raise ConfigError(f'unknown calibration option(s) {unknown}')
    top: dict[str, Any] = {}
    nested: dict[str, dict] = {}
    for name, value in flat.items():
      path, f = specs[name]
      if isinstance(f.default, tuple) and value is not None:
        value = tuple(f.metadata.get('item', str)(v) for v in value)
      if len(path) == 1:
        top[path[0]] = value
      else:
        nested.setdefault(path[0], {})[path[1]] = value
    for group, values in nested.items():
      top[group] = dataclasses.replace(getattr(cls(), group), **values)
    return cls(**top)


def _get(cfg, path):
  for p in path:
    cfg = getattr(cfg, p)
  return cfg


def flat_fields(cls=Config) -> Iterator[tuple[str, tuple, dataclasses.Field]]:
  """(flag name, attribute path, field) of every leaf option; nested fields use their 'flag' metadata name
  (default: the field name)."""
  for f in dataclasses.fields(cls):
    if f.metadata.get('nested'):
      for g in dataclasses.fields(f.default_factory()):
        if 'help' in g.metadata:
          yield g.metadata.get('flag', g.name), (f.name, g.name), g
    else:
      yield f.name, (f.name,), f


def define_flags(flag_values=None) -> None:
  """absl flags for every option, with each field's help text (called only by the entry point)."""
  from absl import flags
  fv = flag_values if flag_values is not None else flags.FLAGS
  for name, _, f in flat_fields():
    d, help_ = f.default, f.metadata['help']
    if 'enum' in f.metadata:
      flags.DEFINE_enum(name, d, list(f.metadata['enum']), help_, flag_values=fv)
    elif f.metadata.get('multi'):
      flags.DEFINE_multi_string(name, list(d), help_, flag_values=fv)
    elif isinstance(d, tuple):
      flags.DEFINE_list(name, [str(v) for v in d], help_ + ' (comma-separated)', flag_values=fv)
    elif isinstance(d, bool) or (d is None and f.type in ('bool | None', bool)):
      flags.DEFINE_bool(name, d, help_, flag_values=fv)
    elif isinstance(d, int) or f.metadata.get('kind') is int:
      flags.DEFINE_integer(name, d, help_, flag_values=fv)
    elif isinstance(d, float) or f.metadata.get('kind') is float:
      flags.DEFINE_float(name, d, help_, flag_values=fv)
    else:
      flags.DEFINE_string(name, d, help_, flag_values=fv)


def config_from_flags(flag_values=None) -> Config:
  """The (unresolved) Config given by the parsed flags."""
  from absl import flags
  fv = flag_values if flag_values is not None else flags.FLAGS
  flat = {name: getattr(fv, name) for name, _, _ in flat_fields()}
  try:
    return Config.from_flat(flat)
  except ValueError as e:
    raise ConfigError(f'bad flag value: {e}') from e
