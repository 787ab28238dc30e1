"""Post-training quantization of a diffusion UNet: TCAQ-DM (TCR + DAQ + BRECQ/AdaRound + PAR) and baselines.

  python -m tcaq_jax.train.calibrate                                   # the shipped digits demo at W4A8
  python -m tcaq_jax.train.calibrate --flagfile configs/cifar10_w4a8.flags
  python -m tcaq_jax.train.calibrate --help                            # every flag, explained

Writes out_dir/report.json (per-unit losses, per-phase times, compile counts, policy, bits), out_dir/samples.png
and an orbax checkpoint after every stage; re-running with the same --out_dir resumes. At the end it prints the
time per phase and, for the shipped demo model, the demo's digit-classifier FID and confident share of FP vs
quantized samples (--demo_eval_samples). The pipeline is `tcaq_jax.train.pipeline` (`run(Config(...))` from
Python), its options `tcaq_jax.train.config.Config`; a finished run loads with
`tcaq_jax.quantized.load_quantized(out_dir)`.

Methods: tcaq (default), qdiff (BRECQ + LSQ-learned activation scales; no TCR / DAQ / PAR / per-step scales),
minmax (min-max PTQ, no reconstruction). --tcr/--daq/--par/--act_per_step/--learn_act_scale override a
method's defaults (ablations).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
import threading
import time

from absl import flags, logging
import jax

from tcaq_jax import atomic_io, checkpoint, cli
from tcaq_jax.assets import DEMO_FP_REFERENCE
from tcaq_jax.train import config as config_lib
from tcaq_jax.train.config import config_from_flags, define_flags
from tcaq_jax.train.pipeline import Hooks, run

__all__ = ['DemoQuality', 'demo_quality_check', 'fp_half', 'fp_key', 'read_fp_reference', 'write_fp_reference',
           'summary_lines']


QUALITY_SEED = 1234
DEFAULT_FP_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'tcaq_jax', 'demo_fp')


def fp_key(setup, classifier_params, n: int) -> dict:
  """What the FP half's numbers depend on: model and classifier weights, sampler settings, n, seed, batch, and
  the backend (JAX versions differ only at float rounding: the cache keys them too, the shipped reference not)."""
  from tcaq_jax.quantized import params_fingerprint

  cfg = setup.cfg
  return {'model': setup.fingerprint, 'classifier': params_fingerprint(classifier_params), 'n': n,
          'seed': QUALITY_SEED, 'batch': setup.sample_batch, 'num_steps': cfg.num_steps,
          'skip_type': cfg.skip_type, 'eta': cfg.eta, 'backend': jax.default_backend()}


def _fp_cache_file(key: dict, cache_dir: str) -> str:
  """The cache file of the FP half for `fp_key` (plus the JAX version)."""
  digest = hashlib.sha256(json.dumps(dict(key, jax=jax.__version__), sort_keys=True).encode()).hexdigest()[:20]
  return os.path.join(os.path.expanduser(cache_dir), f'{digest}.json')


def read_fp_reference(path: str, key: dict) -> dict | None:
  """The shipped FP half whose key equals `key` (None when the file has none, or is missing or unreadable)."""
  try:
    with open(path) as f:
      entries = json.load(f)['entries']
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning('ignoring the FP quality reference %s: %s', path, e)
    return None
  for e in entries:
    if e.get('key') == key:
      return e
  return None


def write_fp_reference(path: str, key: dict, result: dict, commit: str = '') -> None:
  """Adds (or replaces) the entry for `key` in the reference file `path`."""
  entries = []
  if os.path.isfile(path):
    with open(path) as f:
      entries = [e for e in json.load(f)['entries'] if e.get('key') != key]
  entries.append({'key': key, 'result': {k: result[k] for k in ('n', 'fid', 'confident_fraction', 'seconds')},
                  'jax': jax.__version__, 'commit': commit, 'date': time.strftime('%Y-%m-%d')})
  atomic_io.write_json(path, {'about': 'FP half of the demo quality check (tcaq_jax.train.calibrate); '
                                       'bench/demo_fp_reference.py writes it', 'entries': entries}, indent=1)


def _score(setup, eps, n: int, classifier, params) -> tuple[dict, object]:
  """n samples of eps_fn at the run's sampler batch (its compiled step), scored by the demo classifier: (scores,
  the uint8 samples)."""
  from tcaq_jax.demo.classifier import demo_quality
  from tcaq_jax.diffusion.batched import sample_all
  from tcaq_jax.images import to_uint8

  t0 = time.time()
  images = sample_all(setup.sampler(eps), n, setup.sample_batch, seed=QUALITY_SEED, convert=to_uint8, pad=True)
  res = demo_quality(images, classifier, params)
  return {k: res[k] for k in ('n', 'fid', 'confident_fraction')} | {'seconds': time.time() - t0}, images


def fp_half(setup, n: int, fp_cache: str = '', reference: str = '') -> tuple[dict, tuple]:
  """The FP half of the quality check and the loaded classifier ((classifier, params)). With reference (a file,
  e.g. the shipped DEMO_FP_REFERENCE) it is taken from there when an entry has the same `fp_key` (marked
  'reference'); with fp_cache (a dir) it is read from there when present (marked 'cached') and stored after it
  is computed. The demo's classifier is a plug-in: imported only here."""
  from tcaq_jax.demo.classifier import load_classifier

  classifier, params = load_classifier()          # once: it scores both halves and keys the cache
  key = fp_key(setup, params, n)
  ref = read_fp_reference(reference, key) if reference else None
  if ref is not None:
    return dict(ref['result'], reference=True, reference_jax=ref['jax']), (classifier, params)
  cache_file = _fp_cache_file(key, fp_cache) if fp_cache else None
  if cache_file and os.path.isfile(cache_file):
    try:
      with open(cache_file) as f:
        return dict(json.load(f), cached=True), (classifier, params)
    except (OSError, ValueError) as e:
      logging.warning('ignoring the unreadable FP quality cache %s: %s', cache_file, e)
  fp, _ = _score(setup, setup.fp_eps, n, classifier, params)
  if cache_file:
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    atomic_io.write_json(cache_file, fp)
  return fp, (classifier, params)


def demo_quality_check(setup, qstate, n: int, fp_cache: str = '', fp: tuple | None = None,
                       reference: str = '') -> dict:
  """Digit-classifier FID / confident share of n FP and n quantized samples of the shipped demo model (same
  seeds, the calibrated sampler settings), sampled with the run's own compiled samplers and batch size (no new
  compiles). fp: `fp_half`'s result when it was computed already (e.g. by `DemoQuality` while the run went on)."""
  return _check(setup, qstate, n, fp if fp is not None else fp_half(setup, n, fp_cache, reference))[0]


def _check(setup, qstate, n: int, fp: tuple) -> tuple[dict, object]:
  """(`demo_quality_check`'s result, the quantized uint8 samples) given `fp_half`'s result."""
  fp_res, (classifier, params) = fp
  quantized, images = _score(setup, setup.q_eps(qstate), n, classifier, params)
  return {'fp': fp_res, 'quantized': quantized}, images


class DemoQuality:
  """The calibrate CLI's end-of-run quality check as pipeline hooks: the FP half does not depend on the
  calibration, so `after_capture` starts it on a background thread at the capture of round `start_round` (the
  first PAR round: round 0's unit compiles and weight initialisation are slowed most by a second compute thread);
  it runs on what the calibration leaves idle, and `after_run` waits for it (starting it when no capture did),
  then samples the quantized half; `grid_images` hands its first samples to out_dir/samples.png (seed 1234, not
  the grid's own seed + 1: one batch less to sample)."""

  def __init__(self, n: int, fp_cache: str = '', start_round: int = 1, reference: str = ''):
    self.n, self.fp_cache, self.start_round, self.reference = n, fp_cache, start_round, reference
    self._fp: concurrent.futures.Future | None = None
    self.images = None                     # the quantized samples of after_run's check

  def after_capture(self, setup, rnd: int) -> None:
    if self._fp is not None or 0 <= rnd < self.start_round:
      return
    self._fp = future = concurrent.futures.Future()

    def work():                  # a daemon thread: a failed calibration exits without waiting for it
      try:
        future.set_result(fp_half(setup, self.n, self.fp_cache, self.reference))
      except BaseException as e:  # noqa: BLE001  (re-raised by after_run's result())
        future.set_exception(e)
    threading.Thread(target=work, name='demo_fp_quality', daemon=True).start()

  def after_run(self, setup, qstate) -> dict:
    self.after_capture(setup, -1)          # (-1: now, whatever start_round)
    result, self.images = _check(setup, qstate, self.n, self._fp.result())
    return {'demo_quality': result}

  def grid_images(self, n: int):
    """The check's quantized samples (None before after_run); `pipeline.sample_grid` shows the first n."""
    del n
    return self.images


def summary_lines(report: dict) -> list[str]:
  """The end-of-run table: seconds per phase, compile counts and (demo) FP vs quantized quality."""
  lines = [f"calibration of {report.get('model')} ({report.get('method')}, W{report['bits']['w']}A"
           f"{report['bits']['a']}): {len(report.get('units', []))} unit reconstructions"]
  phases = report.get('phases_this_process', {})
  if phases:
    lines.append('time this process: ' + ', '.join(f'{k[:-2]} {v:.1f} s' for k, v in phases.items() if v >= 0.05))
  comp = report.get('compile_this_process')
  if comp:
    lines.append(f"XLA compiles: {comp['compiles']} ({comp['compile_s']:.1f} s); persistent-cache hits "
                 f"{comp['cache_hits']}")
  pre = report.get('precompile_this_process')
  if pre and pre.get('jobs'):
    lines.append(f"compiled ahead on the precompile thread: {pre['jobs']} jobs ({pre['seconds']:.1f} s); the main "
                 f"thread waited {pre['waited_s']:.1f} s for them")
  dq = report.get('demo_quality')
  if dq:
    lines.append(f"demo quality, {dq['fp']['n']} samples (digit-classifier FID, lower is better; share of samples "
                 'classified with confidence >= 0.9):')
    for name in ('fp', 'quantized'):
      cached = '   (cached from an earlier run: --demo_fp_cache)' if dq[name].get('cached') else ''
      if dq[name].get('reference'):
        cached = '   (the shipped reference for these settings: --demo_fp_reference)'
      lines.append(f"  {name:9s} FID {dq[name]['fid']:7.2f}   confident {100 * dq[name]['confident_fraction']:5.1f}%"
                   + cached)
  return lines


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  cfg = config_from_flags().resolve()
  n = flags.FLAGS.demo_eval_samples
  hooks = Hooks()
  if n > 0 and not cfg.model_dir and not cfg.model_config:     # the shipped demo
    quality = DemoQuality(n, flags.FLAGS.demo_fp_cache, reference=flags.FLAGS.demo_fp_reference)
    hooks = Hooks(after_capture=quality.after_capture, after_run=quality.after_run,
                  grid_images=quality.grid_images)
  report = run(cfg, hooks)
  print('\n'.join(summary_lines(report)), file=sys.stderr)
  logging.info('report in %s', os.path.join(cfg.out_dir, 'report.json'))


if __name__ == '__main__':
  define_flags()
  flags.DEFINE_integer('demo_eval_samples', 256, 'shipped demo only: FP and quantized samples scored by the demo '
                       "digit classifier at the end (0: skip)")
  flags.DEFINE_string('demo_fp_cache', DEFAULT_FP_CACHE, 'shipped demo only: where the FP half of the quality check '
                      "is kept between runs (keyed by model, classifier, sampler settings, samples, JAX version and "
                      "backend); '' = always sample it")
  flags.DEFINE_string('demo_fp_reference', DEMO_FP_REFERENCE, 'shipped demo only: a file of FP halves of the '
                      'quality check computed ahead (the shipped one holds the default settings on CPU); used when '
                      "its model, classifier, sampler settings, samples, batch and backend match; '' = never")
  flags.adopt_module_key_flags(config_lib)        # --help lists (and explains) every calibration flag
  cli.run(main)
