"""--par_x_range: PAR rounds drop recaptured inputs whose max |x_t| exceeds a factor times the FP capture's max at
the same step. `par.in_range` against hand-made data, and a pipeline run whose report's dropped count is
recomputed here from the captures on disk."""
import json

import numpy as np

from tcaq_jax.diffusion.capture import CalibData
from tcaq_jax.train import par
from tcaq_jax.train.pipeline import run

from calib_settings import BASE


def _flat(xmax_per_entry, steps):
  x = np.zeros((len(steps), 2, 2, 1), np.float32)
  x[:, 0, 0, 0] = xmax_per_entry
  return {'x': x, 'step': np.asarray(steps)}


def test_in_range_by_step_with_the_fallbacks():
  fp = par.step_absmax(_flat([1.0, -2.0, 3.0, 0.5], [0, 0, 5, 5]))
  assert fp == {0: 2.0, 5: 3.0}
  data = _flat([2.9, -3.1, 4.4, 4.6, 9.0, 9.0, 7.0], [0, 0, 5, 5, 7, 7, 0])
  # factor 1.5: step 0 allows 3.0, step 5 allows 4.5; step 7 is not in the FP capture (kept)
  np.testing.assert_array_equal(par.in_range(data, fp, 1.5), [True, False, True, False, True, True, False])
  # factor 1: every input of step 5 is out of range: the step keeps them all
  np.testing.assert_array_equal(par.in_range(data, fp, 1.0)[2:4], [True, True])


def test_pipeline_reports_the_inputs_it_dropped(tmp_path):
  out = str(tmp_path / 'run')
  run(dict(BASE, out_dir=out, par_x_range=0.9, recon_units='^mid/', recon_gate=False))
  report = json.load(open(f'{out}/report.json'))
  fp, rec = (par.flat_data(CalibData(par.round_dir(out, r)), False) for r in (0, 1))
  fmax = {s: np.abs(fp['x'][fp['step'] == s]).max() for s in np.unique(fp['step'])}
  over = np.asarray([np.abs(x).max() > 0.9 * fmax[s] for x, s in zip(rec['x'], rec['step'])])
  steps_all_over = [s for s in np.unique(rec['step']) if over[rec['step'] == s].all()]
  want = int(sum(over[rec['step'] == s].sum() for s in np.unique(rec['step']) if s not in steps_all_over))
  assert want > 0 and report['par_dropped'] == {'1': want}


def test_scope_act_drops_from_the_activation_search_only(tmp_path, monkeypatch):
  """--par_x_scope=act: round 1's activation re-search gets the in-range inputs, its reconstruction all of them."""
  from tcaq_jax.train import pipeline
  seen = {'search': [], 'recon': []}
  real_search, real_unit = pipeline.search_acts, pipeline.reconstruct_unit

  def search(setup, qstate, data):
    seen['search'].append(len(data['x']))
    return real_search(setup, qstate, data)

  def unit(setup, rnd, k, qstate, data, hook, holdout, targets):
    seen['recon'].append((rnd, len(data['x']) + (0 if holdout is None else len(holdout['x']))))
    return real_unit(setup, rnd, k, qstate, data, hook, holdout, targets)

  monkeypatch.setattr(pipeline, 'search_acts', search)
  monkeypatch.setattr(pipeline, 'reconstruct_unit', unit)
  out = str(tmp_path / 'run')
  run(dict(BASE, out_dir=out, par_x_range=0.9, par_x_scope='act', recon_units='^mid/', recon_gate=False))
  report = json.load(open(f'{out}/report.json'))
  rec = par.flat_data(CalibData(par.round_dir(out, 1)), False)
  fp = par.flat_data(CalibData(par.round_dir(out, 0)), False)
  keep = par.in_range(rec, par.step_absmax(fp), 0.9)
  dropped = int((~keep).sum())
  assert dropped > 0 and report['par_dropped'] == {'1': dropped}
  # round 0's search sees the FP set, round 1's the recaptured set less the dropped inputs
  assert seen['search'] == [len(fp['x']), len(rec['x']) - dropped]
  # reconstruction (every calibration input: BASE's recon_samples is 0 = all) keeps the dropped inputs
  assert sorted(set(seen['recon'])) == [(0, len(fp['x'])), (1, len(rec['x']))]
