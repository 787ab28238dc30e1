"""DAQ's choice per post-Softmax layer and calibration slot on the shipped demo: the paper's likelihood-ratio rule
against the output-error rule (uniform / log2 / log-sqrt2 by the error of probs @ V), with the errors of each
quantizer. Prints one table (issue 14, part 3).

  PYTHONPATH=. python bench/daq_choice.py --out /tmp/daq            # captures the demo calibration set once
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from tcaq_jax.quant.daq import CHOICES  # noqa: E402
from tcaq_jax.train import act_search, pipeline  # noqa: E402
from tcaq_jax.train.config import Config  # noqa: E402

flags.DEFINE_string('out', '/tmp/daq_choice', 'run dir (its calib_round0 capture is reused)')
flags.DEFINE_integer('softmax_bits', 8, 'post-Softmax bit width')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cfg = Config(method='tcaq', w_bits=6, a_bits=6, softmax_bits=FLAGS.softmax_bits, out_dir=FLAGS.out,
               progress=False).resolve()
  setup = pipeline.Setup(cfg)
  data, _ = pipeline.capture(setup, 0)
  _, k, sid = pipeline._slots(setup, data, True)
  arrays = pipeline._arrays(data)
  err_fn = act_search.make_search(setup.fp_fwd, setup.policy, (), cfg.act_pcts, True, daq_rule='error')
  errors = {}
  for slot, idx in act_search._slot_batches(sid, k, cfg.act_batch, cfg.seed, 'daq'):
    res = jax.device_get(err_fn(setup.params, {}, jax.random.PRNGKey(cfg.seed * 7919 + slot),
                                *[np.asarray(a)[idx] for a in arrays]))
    for p, r in res.items():
      if 'errors' in r:
        errors.setdefault(p, []).append(np.asarray(r['errors']))
  llr = act_search.search_act_scales(setup.fp_fwd, setup.policy, {}, arrays, sid, k, cfg.act_batch, cfg.act_pcts,
                                     True, 'log2', seed=cfg.seed, consts=setup.params, daq_rule='llr')
  print(f'demo, {k} calibration slots, post-Softmax {FLAGS.softmax_bits} bits; error = MSE of probs @ V')
  print('| layer | LLR choice per slot (u = uniform, 2 = log2) | error-rule choice (u / 2 / s = log-sqrt2) | '
        'sum of errors, LLR choice | sum, error choice | sum, log2 forced |')
  print('|---|---|---|---|---|---|')
  tot = np.zeros(3)
  for p, errs in errors.items():
    e = np.stack(errs)                                             # [K, 3]
    use_llr = np.asarray(llr[p].use_log2).astype(int)              # 0 / 1 (log2)
    best = e.argmin(1)
    sums = (e[np.arange(k), use_llr].sum(), e[np.arange(k), best].sum(), e[:, 1].sum())
    tot += sums
    sym = {0: 'u', 1: '2', 2: 's'}
    print(f"| {p} | {''.join(sym[u] for u in use_llr)} | {''.join(sym[b] for b in best)} | {sums[0]:.3g} | "
          f'{sums[1]:.3g} | {sums[2]:.3g} |')
    worst = int(np.argmax(e[np.arange(k), use_llr] / e[np.arange(k), best]))
    print(f'|  worst slot {worst} | {CHOICES[use_llr[worst]]} {e[worst, use_llr[worst]]:.3g} | '
          f'{CHOICES[best[worst]]} {e[worst, best[worst]]:.3g} | | | |')
  print(f'| all layers | | | {tot[0]:.3g} | {tot[1]:.3g} | {tot[2]:.3g} |')


if __name__ == '__main__':
  app.run(main)
