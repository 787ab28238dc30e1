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

import os
import sys
import time

from absl import flags, logging

from tcaq_jax import checkpoint, cli
from tcaq_jax.train import config as config_lib
from tcaq_jax.train.config import Config, config_from_flags, define_flags
from tcaq_jax.train.pipeline import Hooks, run

__all__ = ['demo_quality_check', 'summary_lines']


def demo_quality_check(setup, qstate, n: int) -> dict:
  """Digit-classifier FID / confident share of n FP and n quantized samples of the shipped demo model (same
  seeds, the calibrated sampler settings), sampled with the run's own compiled samplers and batch size (no new
  compiles). The demo's classifier is a plug-in: imported only here."""
  from tcaq_jax.demo.classifier import demo_quality
  from tcaq_jax.diffusion.batched import sample_all
  from tcaq_jax.images import to_uint8

  out = {}
  for name, eps in (('fp', setup.fp_eps), ('quantized', setup.q_eps(qstate))):
    t0 = time.time()
    images = sample_all(setup.sampler(eps), n, min(n, setup.cfg.capture_batch), seed=1234, convert=to_uint8)
    res = demo_quality(images)
    out[name] = {k: res[k] for k in ('n', 'fid', 'confident_fraction')} | {'seconds': time.time() - t0}
  return out


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
  dq = report.get('demo_quality')
  if dq:
    lines.append(f"demo quality, {dq['fp']['n']} samples (digit-classifier FID, lower is better; share of samples "
                 'classified with confidence >= 0.9):')
    for name in ('fp', 'quantized'):
      lines.append(f"  {name:9s} FID {dq[name]['fid']:7.2f}   confident {100 * dq[name]['confident_fraction']:5.1f}%")
  return lines


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  cfg = config_from_flags().resolve()
  n = flags.FLAGS.demo_eval_samples
  after = None
  if n > 0 and not cfg.model_dir and not cfg.model_config:
    after = lambda setup, qstate: {'demo_quality': demo_quality_check(setup, qstate, n)}  # noqa: E731
  report = run(cfg, Hooks(after_run=after))
  print('\n'.join(summary_lines(report)), file=sys.stderr)
  logging.info('report in %s', os.path.join(cfg.out_dir, 'report.json'))


if __name__ == '__main__':
  define_flags()
  flags.DEFINE_integer('demo_eval_samples', 256, 'shipped demo only: FP and quantized samples scored by the demo '
                       "digit classifier at the end (0: skip)")
  flags.adopt_module_key_flags(config_lib)        # --help lists (and explains) every calibration flag
  cli.run(main)
