"""Post-training quantization of a diffusion UNet: TCAQ-DM (TCR + DAQ + BRECQ/AdaRound + PAR) and baselines.

  python -m tcaq_jax.train.calibrate                                   # the shipped digits demo at W4A8
  python -m tcaq_jax.train.calibrate --flagfile configs/cifar10_w4a8.flags
  python -m tcaq_jax.train.calibrate --help                            # every flag, explained

Writes out_dir/report.json (per-unit losses, timings, policy, bits), out_dir/samples.png and an orbax checkpoint
after every stage; re-running with the same --out_dir resumes. The pipeline is `tcaq_jax.train.pipeline`
(`run(Config(...))` from Python), its options `tcaq_jax.train.config.Config`; a finished run loads with
`tcaq_jax.quantized.load_quantized(out_dir)`.

Methods: tcaq (default), qdiff (BRECQ + LSQ-learned activation scales; no TCR / DAQ / PAR / per-step scales),
minmax (min-max PTQ, no reconstruction). --tcr/--daq/--par/--act_per_step/--learn_act_scale override a
method's defaults (ablations).
"""
from __future__ import annotations

import os

from absl import app, flags, logging

from tcaq_jax import checkpoint
from tcaq_jax.train import config as config_lib
from tcaq_jax.train.config import config_from_flags, define_flags
from tcaq_jax.train.pipeline import run


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  cfg = config_from_flags().resolve()
  report = run(cfg)
  logging.info('done: %d units, report in %s', len(report.get('units', [])),
               os.path.join(cfg.out_dir, 'report.json'))


if __name__ == '__main__':
  define_flags()
  flags.adopt_module_key_flags(config_lib)        # --help lists (and explains) every calibration flag
  app.run(main)
