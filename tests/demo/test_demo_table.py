"""bench/demo_table.py's rows and outputs (table.json, table.md, the FID chart and the sample-grid image, resume
under the same settings), on synthetic rows: no calibration runs here."""
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def table(load_bench):
  pytest.importorskip('matplotlib')
  return load_bench('demo_table')


def test_rows_cover_the_baselines_the_paper_rules_and_the_ablations(table):
  rows = {name: (method, w, a, extra) for name, method, w, a, extra in table.row_specs()}
  assert table.PAPER_EXACT['daq_rule'] == 'llr'                  # the paper's likelihood-ratio DAQ
  assert table.PAPER_EXACT['tcr_select'] == 'all' and table.PAPER_EXACT['keep_best'] is False   # TCR everywhere
  for w, a in table.BITS:
    assert rows[f'qdiff_w{w}a{a}'][0] == 'qdiff' and rows[f'qdiff_plus_w{w}a{a}'][0] == 'qdiff_plus'
    assert rows[f'tcaq_paper_w{w}a{a}'] == ('tcaq', w, a, table.PAPER_EXACT)
    assert rows[f'tcaq_w{w}a{a}'] == ('tcaq', w, a, {}) and rows[f'minmax_w{w}a{a}'][0] == 'minmax'
  for w, a in ((6, 6), (4, 4)):
    assert rows[f'tcaq_w{w}a{a}_no_per_step'][3] == {'act_per_step': False}
    assert rows[f'tcaq_w{w}a{a}_no_tcr_no_per_step'][3] == {'tcr': False, 'act_per_step': False}
    assert {f'tcaq_w{w}a{a}_no_{c}' for c in ('tcr', 'daq', 'par')} <= set(rows)


def test_outputs_and_resume(table, tmp_path):
  from PIL import Image
  settings = {'num_samples': 10, 'num_steps': 5, 'calib_samples': 2, 'recon_samples': 4, 'iters_scale': 0.001,
              'real_images': 1797, 'features': 'x'}
  os.makedirs(tmp_path / 'grids')
  results = {}
  for i, (name, method, w, a) in enumerate([('fp', 'fp', None, None), ('minmax_w8a8', 'minmax', 8, 8),
                                            ('qdiff_w4a4', 'qdiff', 4, 4), ('tcaq_w6a6_no_per_step', 'tcaq', 6, 6)]):
    results[name] = {'name': name, 'method': method, 'options': {}, 'w_bits': w, 'a_bits': a, 'fid': 1.5 + i,
                     'conf': 0.9, 'samples': 10, 'sample_seed': 123, 'iters_scale': 0.001, 'calib_s': 3.0}
    Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(tmp_path / 'grids' / f'{name}.png')
  results['qdiff_w4a4']['mse_fp'] = 0.00412            # paired MSE vs FP's samples, shown x1e3
  results['tcaq_w6a6_no_per_step'].update(mse_fp=0.00866, mse_fp_se=0.00025)
  table.write_outputs(str(tmp_path), results, settings)
  doc = json.load(open(tmp_path / 'table.json'))
  assert doc['settings'] == settings and [r['name'] for r in doc['rows']] == list(results)
  for key in ('name', 'method', 'options', 'w_bits', 'a_bits', 'fid', 'conf', 'samples', 'sample_seed',
              'iters_scale', 'calib_s'):
    assert key in doc['rows'][1], key
  md = open(tmp_path / 'table.md').read()
  assert '| qdiff_w4a4 | qdiff | W4A4 | 3.500 | 0.900 | - | - | 4.12 | 3 |' in md
  assert '| minmax_w8a8 | minmax | W8A8 | 2.500 | 0.900 | - | - | - | 3 |' in md
  assert '| qdiff | - | - | - | 3.50 |' in md and '| no_per_step | 4.50 | - |' in md
  assert '| 8.66 +- 0.25 | 3 |' in md                                      # the standard error beside the MSE
  assert '| MSE vs FP x1e3 | W8A8 | W6A6 | W4A8 | W4A4 |' in md and '| qdiff | - | - | - | 4.12 |' in md
  for png in ('fid_chart.png', 'sample_grids.png'):
    assert Image.open(tmp_path / png).size[0] > 300
  assert table.load_table(str(tmp_path / 'table.json'), settings) == results           # resumes these rows
  assert table.load_table(str(tmp_path / 'table.json'), dict(settings, num_samples=11)) == {}
  # a second process running other rows of the same table: its write keeps the first one's rows
  other = {'qdiff_w6a6': dict(results['qdiff_w4a4'], name='qdiff_w6a6', w_bits=6, a_bits=6, fid=2.7)}
  table.write_outputs(str(tmp_path), other, settings)
  assert set(other) == set(results) | {'qdiff_w6a6'}
  assert table.load_table(str(tmp_path / 'table.json'), settings) == other
  # a row re-run by one process is not reverted by another holding the record it read before (the later
  # 'finished' wins; records without one count as finished at 0)
  rerun = dict(other['minmax_w8a8'], fid=9.0, finished=200.0)
  table.write_outputs(str(tmp_path), dict(other, minmax_w8a8=rerun), settings)
  stale = dict(other, minmax_w8a8=dict(other['minmax_w8a8'], finished=100.0))
  table.write_outputs(str(tmp_path), stale, settings)
  assert stale['minmax_w8a8']['fid'] == 9.0
  assert table.load_table(str(tmp_path / 'table.json'), settings)['minmax_w8a8']['fid'] == 9.0


def test_chart_of_diagnostic_rows_only_is_written(table, tmp_path):
  """A table run with only diagnostic rows has no bar and no FP line: the chart must still be written (a log
  axis without positive data used to raise and stop the table after its first row)."""
  path = str(tmp_path / 'chart.png')
  table.plot_chart({'tcaq_w4a8_tcr_all': {'fid': 12.8}}, path)
  assert os.path.getsize(path) > 0


def test_paired_mse_and_its_fill_from_kept_samples(table, tmp_path):
  """paired_mse against a float64 loop; a reused record without it is filled from the row's kept samples
  (samples_path) only when they share FP's noise (same sample seed) and shape."""
  rng = np.random.default_rng(0)
  fp = rng.uniform(-1, 1, (50, 4, 4, 1)).astype(np.float32)
  img = np.clip(fp + rng.normal(0, 0.1, fp.shape), -1, 1).astype(np.float32)
  per = [float(np.mean((img[i].astype(np.float64) - fp[i]) ** 2)) for i in range(50)]
  mean = sum(per) / 50
  se = (sum((v - mean) ** 2 for v in per) / 49) ** 0.5 / 50 ** 0.5
  got = table.paired_mse(img, fp)
  np.testing.assert_allclose([got['mse_fp'], got['mse_fp_se']], [mean, se], rtol=1e-9)
  os.makedirs(tmp_path / 'samples')
  np.save(table.samples_path(str(tmp_path), 'minmax_w6a6'), img)
  rec = {'name': 'minmax_w6a6', 'sample_seed': 123, 'mse_fp': None}
  other_seed = dict(rec, sample_seed=456)
  table.fill_paired_mse(other_seed, str(tmp_path), fp, 123)
  assert other_seed['mse_fp'] is None                      # another noise: no pairing
  table.fill_paired_mse(rec, str(tmp_path), fp[:10], 123)
  assert rec['mse_fp'] is None                             # other shape: not these samples
  table.fill_paired_mse(rec, str(tmp_path), fp, 123)
  assert rec['mse_fp'] == got['mse_fp'] and rec['mse_fp_se'] == got['mse_fp_se']
  missing = {'name': 'qdiff_w8a8', 'sample_seed': 123, 'mse_fp': None}
  table.fill_paired_mse(missing, str(tmp_path), fp, 123)
  assert missing['mse_fp'] is None                         # no kept samples


def test_a_row_is_rerun_only_when_a_field_it_uses_changed(table):
  """Resolved configs (config.Config): min-max (no reconstruction, no gate, no correction) reads the same under
  another gate margin, PAR range or eps-bias sample count; tcaq (gate, PAR, correction all on) does not, and tcaq
  without PAR ignores the PAR fields but not the gate's."""
  base = dict(model_config='ddim_tiny', w_bits=6, a_bits=6)
  changes = [{'gate_margin': 2.0}, {'gate_samples': 64}, {'par_x_range': 1.5}, {'eps_bias_samples': 128}]
  for change in changes:
    assert table.row_config(dict(base, method='minmax')) == table.row_config(dict(base, method='minmax', **change))
    assert table.row_config(dict(base, method='tcaq')) != table.row_config(dict(base, method='tcaq', **change))
  no_par = dict(base, method='tcaq', par=False)
  assert table.row_config(no_par) == table.row_config(dict(no_par, par_x_range=1.5, par_rounds=5))
  assert table.row_config(no_par) != table.row_config(dict(no_par, gate_margin=2.0))
  # a field that changes a min-max run still counts
  assert table.row_config(dict(base, method='minmax')) != table.row_config(dict(base, method='minmax', seed=1))
