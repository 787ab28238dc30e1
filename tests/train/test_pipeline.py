"""The calibration pipeline end to end (tcaq_jax/train/pipeline.py, and the calibrate CLI) on ddim_tiny with random weights.

To stay fast, the policy quantizes three reconstruction units (a ResBlock, the mid attention block with DAQ, an
up-path ResBlock with the split concat shortcut) and keeps the rest FP; the sampler has 6 steps.
A persistent JAX compilation cache (module fixture) lets the repeated runs reuse compiled programs.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax import checkpoint
from tcaq_jax.diffusion.capture import CalibData
from tcaq_jax.diffusion.ddim import DDIMSampler, sampler_coefficients
from tcaq_jax.quant.apply import quantized_apply
from tcaq_jax.diffusion.host_sampler import make_sampler
from tcaq_jax.models import family
from tcaq_jax.quantized import load_quantized, params_fingerprint, quant_eps_fn
from tcaq_jax.train import par
from tcaq_jax.train.pipeline import CalibrationError, Hooks, run

from calib_settings import UNITS  # noqa: E402
from calib_settings import BASE  # noqa: E402  (tests/train/calib_settings.py)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The full run takes the per-layer TCR choice (tcaq's --tcr_select=auto at W4A8 too; explicit here).
FULL = dict(BASE, tcr_select='error')


@pytest.fixture(scope='module', autouse=True)
def compile_cache(tmp_path_factory):
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
         jax.config.jax_persistent_cache_min_entry_size_bytes)
  jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  yield
  jax.config.update('jax_compilation_cache_dir', old[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old[1])
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', old[2])


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('calib') / 'full')
  report = run(dict(FULL, out_dir=out))
  return out, report


def _qstate_arrays(out_dir):
  qs = load_quantized(out_dir).qstate
  flat = {'step_slot': np.asarray(qs.step_slot)}
  for p, st in qs.layers.items():
    for n, v in st.set_fields().items():
      flat[f'{p}:{n}'] = np.asarray(v)
  return flat


def test_full_run_report_checkpoint_and_outputs(full_run):
  out, report = full_run
  assert [u['unit'] for u in report['units']] == UNITS * 2            # round 0 + one PAR round
  assert [u['round'] for u in report['units']] == [0] * 3 + [1] * 3
  assert report['bits'] == {'w': 4, 'a': 8, 'softmax': 8} and report['method'] == 'tcaq'
  assert report['components'] == {'tcr': True, 'daq': True, 'par': True, 'act_per_step': True,
                                   'learn_act_scale': False}
  assert all(np.isfinite(u['final_rec']) for u in report['units'])
  assert os.path.isfile(os.path.join(out, 'report.json')) and os.path.isfile(os.path.join(out, 'samples.png'))
  meta = checkpoint.restore(out)['meta']
  assert meta['progress']['done'] and meta['config']['w_bits'] == 4
  q = load_quantized(out)
  model, params, qstate, policy, eps_fn = q
  # TCR ratios (>= 1 for the min target), per-step activation scales [K=2 slots, S], DAQ choice per slot.
  st = qstate.layers['down_0/block_0/conv1']
  assert st.a_scale.shape == (2, 1)
  # --tcr_select=error: every TCR layer reports its candidates' errors and the chosen exponent; a layer
  # keeps a ratio (>= 1, min target) exactly when its exponent is not 0, and the choice has the lowest error.
  choices = report['tcr_choices']
  assert 'down_0/block_0/conv1' in choices and 'conv_out' not in choices
  for p, c in choices.items():
    assert c['exponent'] in (0.0, 0.5, 1.0) and len(c['errors']) == 3
    assert c['errors'][[0.0, 0.5, 1.0].index(c['exponent'])] == min(c['errors'])
    r = qstate.layers[p].r
    assert (r is None) == (c['exponent'] == 0.0)
    assert r is None or (np.all(np.asarray(r) >= 1.0) and float(np.max(r)) <= c['r_max'] * (1 + 1e-6))
  assert qstate.layers['up_0/block_1/nin_shortcut'].a_scale.shape == (2, 2)
  assert qstate.layers['mid/attn_1/attn_probs'].use_log2.shape == (2,)
  assert 'conv_out' not in qstate.layers and policy.layers['conv_out'].w_bits is None
  # eps_fn == quantized_apply with hard rounding (independently assembled call), less the eps bias of step 3
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  t = jnp.asarray([500, 500], jnp.int32)
  want = quantized_apply(model, {'params': params}, qstate, policy, x, t, step_index=3, weight_mode='hard')
  want = want - qstate.out_bias[3][None]
  np.testing.assert_allclose(np.asarray(eps_fn(x, t, jnp.int32(3), None)), np.asarray(want), rtol=1e-6)
  fp = model.apply({'params': params}, x, t)
  assert float(jnp.mean((want - fp) ** 2)) > 0


def test_resume_after_interrupt_gives_the_same_result(full_run, tmp_path):
  ref_dir, _ = full_run
  out = str(tmp_path / 'resumed')
  class Killed(Exception):
    pass

  def kill_after_unit_1(state):        # as if the process died right after unit 1's checkpoint
    if (state.progress.round, state.progress.next_unit) == (0, 2):
      raise Killed()

  # The first part computes each unit's FP targets in its own capture (--target_cache_mb=0) and saves
  # synchronously (a hook watches the saves); the resumed part and full_run take the round's one FP pass and save
  # in the background: all three ways must give the same result.
  with pytest.raises(Killed):
    run(dict(FULL, out_dir=out, target_cache_mb=0), hooks=Hooks(after_save=kill_after_unit_1))
  prog = checkpoint.restore(out)['meta']['progress']
  assert (prog['round'], prog['next_unit'], prog['done']) == (0, 2, False)
  report = run(dict(FULL, out_dir=out))
  assert report['resumed'] == [{'round': 0, 'unit': 2}]
  assert [u['unit'] for u in report['units']] == UNITS * 2
  a, b = _qstate_arrays(ref_dir), _qstate_arrays(out)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)


def test_incompatible_flags_on_resume_are_refused(full_run):
  out, _ = full_run
  with pytest.raises(CalibrationError, match='--w_bits=4'):
    run(dict(FULL, out_dir=out, w_bits=8))


def test_nan_in_a_block_loss_stops_with_a_named_error_and_keeps_state(tmp_path):
  out = str(tmp_path / 'nan')
  cfg = dict(BASE, out_dir=out, par_rounds=0)
  nan_hook = lambda loss, it: jnp.where(it == 3, jnp.nan, loss)
  with pytest.raises(CalibrationError, match=r"'mid/attn_1' at iteration 3.*unit 1"):
    run(cfg, hooks=Hooks(loss_hook=lambda rnd, k: nan_hook if (rnd, k) == (0, 1) else None))
  ck = checkpoint.restore(out)
  assert ck['meta']['progress']['next_unit'] == 1 and not ck['meta']['progress']['done']
  leaves = jax.tree.leaves(ck['qstate'])
  assert leaves and all(np.all(np.isfinite(np.asarray(v))) for v in leaves)
  # intermediate steps hold no params; the unfinished run still loads, with the FP params of out/fp_model
  assert ck['params'] is None and ck['meta']['params_in'] == 'fp_model'
  q = load_quantized(out)
  assert params_fingerprint(q.params) == ck['meta']['model_fingerprint']
  _, fp_params, _ = family.random_model('ddim_tiny', BASE['seed'])
  assert params_fingerprint(q.params) == params_fingerprint(fp_params)
  # fixing the cause (no hook) and re-running resumes at that block and finishes
  report = run(cfg)
  assert report['resumed'] == [{'round': 0, 'unit': 1}]
  final = checkpoint.restore(out)
  assert final['meta']['progress']['done'] and final['params'] is not None     # the finished run is self-contained


def test_par_recapture_differs_from_fp_and_comes_from_the_quantized_model(full_run, tmp_path):
  out, _ = full_run
  d0, d1 = CalibData(par.round_dir(out, 0)), CalibData(par.round_dir(out, 1))
  assert d1.index['meta']['quantized'] and not d0.index['meta']['quantized']
  assert d0.index['steps'] == d1.index['steps'] == [0, 5]
  np.testing.assert_array_equal(d1.x[0], d0.x[0])                   # same x_T (same seeds)
  assert float(np.mean((np.asarray(d1.x[1]) - np.asarray(d0.x[1])) ** 2)) > 1e-8
  # recapture with a quantized model == that model's own DDIM trajectory (sampled independently, all steps)
  q = load_quantized(out)
  coeffs = sampler_coefficients(q.config, 6, 'quad', 0.0)
  # host-loop sampler (CPU default) here, the lax.scan DDIMSampler for the reference trajectory
  factory = lambda eps: make_sampler(eps, coeffs, (16, 16, 3), loop='host')
  rec = par.recapture(factory, q.eps_fn, str(tmp_path / 'rc'), num_samples=4, num_select=2, seed=3, batch_size=4)
  traj = np.asarray(DDIMSampler(q.eps_fn, coeffs, (16, 16, 3)).sample(3, 0, 4, record='all')['recorded'])
  np.testing.assert_allclose(np.asarray(rec.x), traj[[0, 5]], rtol=1e-5, atol=1e-5)
  fp_traj = np.asarray(d0.x)
  assert float(np.mean((np.asarray(rec.x[1]) - fp_traj[1]) ** 2)) > 1e-8


def test_minmax_method_has_no_reconstruction(tmp_path):
  report = run(dict(BASE, out_dir=str(tmp_path / 'mm'), method='minmax', w_bits=8, a_bits=8))
  assert report['units'] == [] and report['components']['tcr'] is False
  q = load_quantized(str(tmp_path / 'mm'))
  assert all(st.alpha is None for st in q.qstate.layers.values())
  assert q.qstate.layers['down_0/block_0/conv1'].a_scale.shape == (1, 1)       # one scale for all steps


# ------------------------------------------------------------------ reliability (issue 13)

def test_sampling_a_run_refuses_other_sampler_settings(full_run, tmp_path):
  """Its per-step activation scales fit the calibrated steps only (other --steps used to reuse step 5's)."""
  from tcaq_jax.quantized import RunDirError, check_sampler_settings
  out, _ = full_run
  meta = load_quantized(out).meta
  assert check_sampler_settings(meta, None, None, None, out) == (6, 'quad', 0.0)
  for bad in ((15, None, None), (None, 'uniform', None), (None, None, 1.0)):
    with pytest.raises(RunDirError, match='calibrated for --steps=6 --skip_type=quad --eta=0.0'):
      check_sampler_settings(meta, *bad, out)
  proc = subprocess.run([sys.executable, '-m', 'tcaq_jax.eval.sample', f'--quant_dir={out}', '--steps=15',
                         f'--out_dir={tmp_path / "s"}', '--num_samples=2', '--compile_cache='], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'calibrated for --steps=6' in last and 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 's')


def test_sample_cli_defaults_out_dir_per_source_and_never_overwrites(full_run, tmp_path):
  from tcaq_jax.eval.sample import SampleError, generate
  out, _ = full_run
  q = load_quantized(out)
  kw = dict(num_samples=2, batch_size=2, steps=6, skip_type='quad', eta=0.0, seed=0, progress=False,
            loaded=(q.model, q.params, q.config), eps_fn_builder=lambda m, p, c: q.eps_fn)
  d = str(tmp_path / 'samples')
  generate(None, out_dir=d, overwrite=False, **kw)
  with pytest.raises(SampleError, match='--overwrite'):
    generate(None, out_dir=d, overwrite=False, **kw)
  generate(None, out_dir=d, overwrite=True, **kw)


def test_non_finite_samples_stop_with_an_error(full_run, tmp_path):
  """NaN weights used to sample all-black images with exit 0."""
  from tcaq_jax.eval.sample import SampleError, generate
  out, _ = full_run
  q = load_quantized(out)
  nan_params = jax.tree.map(lambda a: a * jnp.nan, q.params)
  with pytest.raises(SampleError, match='not finite'):
    generate(None, 2, 2, 6, 'quad', 0.0, 0, out_dir=str(tmp_path / 'nan'), progress=False,
             loaded=(q.model, nan_params, q.config))
  assert not os.path.exists(tmp_path / 'nan')


def test_a_corrupt_calibration_capture_is_refused_not_reused(full_run, tmp_path):
  """Captures record a SHA-256 per file in index.json; a flipped byte in xt.npy used to be reused on resume."""
  import shutil
  from tcaq_jax.diffusion.capture import CaptureError
  out, _ = full_run
  d = str(tmp_path / 'calib')
  shutil.copytree(par.round_dir(out, 0), d)
  assert CalibData(d).x.shape[:2] == (2, 4)
  with open(os.path.join(d, 'xt.npy'), 'r+b') as f:
    f.seek(-5, os.SEEK_END)
    byte = f.read(1)
    f.seek(-5, os.SEEK_END)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(CaptureError, match='xt.npy.*SHA-256'):
    CalibData(d)


def _trajectories(q, eps, n=8):
  """(x_t at every step [steps, n, ...] of `eps`'s host-loop sampler from seed --seed + 2, timesteps)."""
  cfg = q.meta['config']
  coeffs = sampler_coefficients(q.config, cfg['num_steps'], cfg['skip_type'], cfg['eta'])
  sampler = make_sampler(eps, coeffs, (16, 16, 3), loop='host')
  return np.asarray(sampler.sample(cfg['seed'] + 2, 0, n, record='all')['recorded']), sampler.consts['timesteps']


def _mean_eps_error(q, traj, ts, bias=None):
  """float64 mean over the batch, per step, of (the quantized eps without a correction, less `bias`) - FP eps,
  each eps from its own call (quantized_apply, model.apply)."""
  plain = q.qstate.replace(out_bias=None)
  out = np.zeros((len(ts),) + traj.shape[2:])
  for i, t in enumerate(ts):
    x, tt = jnp.asarray(traj[i]), jnp.full((traj.shape[1],), t, jnp.int32)
    e_q = np.asarray(quantized_apply(q.model, {'params': q.params}, plain, q.policy, x, tt, step_index=i,
                                     weight_mode='hard'), np.float64)
    e_f = np.asarray(q.model.apply({'params': q.params}, x, tt), np.float64)
    out[i] = np.mean(e_q - (0 if bias is None else bias[i]) - e_f, axis=0)
  return out


def test_eps_bias_is_the_mean_eps_error_on_fp_trajectories(full_run):
  """--eps_bias=pixel (tcaq's default): the stored out_bias equals the quantized model's (without it) mean eps
  error against FP, recomputed here in float64 on the 8 FP trajectories of seed --seed + 2 (the host-loop
  sampler's: the scan sampler's differ by float rounding, which flips some activation codes), and the run's
  eps_fn subtracts it at each step."""
  out, report = full_run
  q = load_quantized(out)
  assert q.meta['config']['eps_bias'] == 'pixel' and report['eps_bias']['samples'] == 8
  bias = np.asarray(q.qstate.out_bias)
  assert bias.shape == (6, 16, 16, 3)
  traj, ts = _trajectories(q, family.eps_fn(q.model, q.params, q.config))
  want = _mean_eps_error(q, traj, ts)
  assert np.abs(want).max() > 1e-4                     # a real bias to correct
  # the fit's program (one jitted q - fp, per-sample step indices) rounds some activations to the neighbouring
  # code where the separate calls here do not (float rounding at a quantizer's decision boundary, depending on
  # XLA's fusion); a flipped code moves the pixels downstream of it by a small amount: bounded element-wise and
  # small on average (measured: up to 3e-4, and 9-29% of the elements beyond 2e-6)
  np.testing.assert_allclose(bias, want, atol=1e-3)
  assert np.mean(np.abs(bias - want)) < 0.01 * np.mean(np.abs(want))
  x, tt = jnp.asarray(traj[2]), jnp.full((8,), ts[2], jnp.int32)
  plain = q.qstate.replace(out_bias=None)
  np.testing.assert_allclose(np.asarray(q.eps_fn(x, tt, jnp.int32(2), None)),
                             np.asarray(quantized_apply(q.model, {'params': q.params}, plain, q.policy, x, tt,
                                                        step_index=2, weight_mode='hard')) - bias[2][None],
                             rtol=1e-5, atol=1e-6)


def test_eps_bias_rounds_refit_on_the_corrected_models_trajectories(full_run):
  """--eps_bias_rounds=2 through the pipeline's stage: the second round adds the mean error left by the first
  round's correction on the corrected quantized model's own trajectories, recomputed here in float64 from the
  stored (first-round) bias: trajectories of the run's eps_fn, errors from separate calls."""
  from tcaq_jax.train.config import Config
  from tcaq_jax.train.pipeline import Setup, fit_eps_bias
  out, _ = full_run
  q = load_quantized(out)
  cfg = Config.from_flat(dict(q.meta['config'], eps_bias_rounds=2)).resolve()
  qstate, info = fit_eps_bias(Setup(cfg), q.qstate)
  assert [r['trajectories'] for r in info['rounds']] == ['fp', 'quantized, corrected']
  first = np.asarray(q.qstate.out_bias)
  traj, ts = _trajectories(q, q.eps_fn)                # the model corrected by the first round
  left = _mean_eps_error(q, traj, ts, first)
  got = np.asarray(qstate.out_bias) - first
  # round 0 of this fit equals the stored bias up to code flips (previous test); measured: mean |got - left|
  # 5e-6 against a mean |left| of 4.7e-3 (and 4.3e-2 for the first round: the correction removed 89% of it)
  np.testing.assert_allclose(got, left, atol=2e-3)
  assert np.mean(np.abs(got - left)) < 0.1 * np.mean(np.abs(left)) < 0.1 * np.mean(np.abs(first))


def test_eps_scale_is_the_least_squares_fit_on_fp_trajectories(full_run):
  """--eps_scale through the pipeline's stage (`fit_eps_bias` on the finished run's state): per step, (k, bias)
  solve min sum (d - k eps_fp - bias_pixel)^2 with d = eps_q - eps_fp over the 8 FP trajectories, recomputed
  here in float64 from separate calls (normal equations with the per-pixel means centred out); the eps_fn of
  the corrected state returns (eps_q - bias) / (1 + k)."""
  from tcaq_jax.train.config import Config
  from tcaq_jax.train.pipeline import Setup, fit_eps_bias
  out, _ = full_run
  q = load_quantized(out)
  cfg = Config.from_flat(dict(q.meta['config'], eps_scale=True)).resolve()
  qstate, info = fit_eps_bias(Setup(cfg), q.qstate.replace(out_bias=None))
  scale, bias = np.asarray(qstate.out_scale), np.asarray(qstate.out_bias)
  assert scale.shape == (6,) and bias.shape == (6, 16, 16, 3) and info['scale_per_step'] == scale.tolist()
  traj, ts = _trajectories(q, family.eps_fn(q.model, q.params, q.config))
  plain = q.qstate.replace(out_bias=None)
  for i, t in enumerate(ts):
    x, tt = jnp.asarray(traj[i]), jnp.full((8,), t, jnp.int32)
    e_q = np.asarray(quantized_apply(q.model, {'params': q.params}, plain, q.policy, x, tt, step_index=i,
                                     weight_mode='hard'), np.float64)
    e_f = np.asarray(q.model.apply({'params': q.params}, x, tt), np.float64)
    d, fc = e_q - e_f, e_f - e_f.mean(axis=0)
    k = np.sum((d - d.mean(axis=0)) * fc) / np.sum(fc * fc)
    # the fit's program flips a few activation codes against these separate calls (test above): small tolerances
    np.testing.assert_allclose(1.0 / scale[i] - 1.0, k, rtol=0.02, atol=1e-4)
    np.testing.assert_allclose(bias[i], d.mean(axis=0) - k * e_f.mean(axis=0), atol=2e-3)
  assert np.abs(scale - 1.0).max() > 1e-4                      # a real scale to correct
  eps = quant_eps_fn(q.model, q.params, qstate, q.policy, q.config)
  x, tt = jnp.asarray(traj[2]), jnp.full((8,), ts[2], jnp.int32)
  raw = np.asarray(quantized_apply(q.model, {'params': q.params}, plain, q.policy, x, tt, step_index=2,
                                   weight_mode='hard'))
  np.testing.assert_allclose(np.asarray(eps(x, tt, jnp.int32(2), None)), (raw - bias[2][None]) * scale[2],
                             rtol=1e-5, atol=1e-6)


def test_eps_bias_par_recaptures_with_the_corrected_model(tmp_path):
  """--eps_bias_par: the PAR round's recapture is the trajectory of the round-0 result corrected by the bias fitted
  just before it (the state saved after round 0's last unit, with the out_bias of the round-1 checkpoint), sampled
  independently here; the final out_bias is refitted after the last round."""
  from tcaq_jax.train.config import ConfigError
  with pytest.raises(ConfigError, match='--eps_bias_par'):
    run(dict(BASE, out_dir=str(tmp_path / 'bad'), eps_bias='off', eps_bias_par=True))
  out = str(tmp_path / 'par')
  saved = []
  run(dict(BASE, out_dir=out, eps_bias_par=True, recon_units='^mid/'),
      hooks=Hooks(after_save=lambda st: saved.append((st.progress, st.qstate))))
  end_r0 = [qs for p, qs in saved if p.round == 0 and p.next_unit > 0][-1]
  start_r1 = [qs for p, qs in saved if p.round == 1 and p.next_unit == 0 and p.act_done][0]
  assert np.abs(np.asarray(start_r1.out_bias)).max() > 1e-4
  corrected = end_r0.replace(out_bias=start_r1.out_bias)
  q = load_quantized(out)
  coeffs = sampler_coefficients(q.config, 6, 'quad', 0.0)
  eps = quant_eps_fn(q.model, q.params, corrected, q.policy, q.config)
  traj = np.asarray(make_sampler(eps, coeffs, (16, 16, 3), loop='host').sample(3, 0, 4, record='all')['recorded'])
  d1 = CalibData(par.round_dir(out, 1))
  np.testing.assert_allclose(np.asarray(d1.x), traj[d1.index['steps']], rtol=1e-5, atol=1e-5)
  plain = make_sampler(quant_eps_fn(q.model, q.params, end_r0.replace(out_bias=None), q.policy, q.config), coeffs,
                       (16, 16, 3), loop='host').sample(3, 0, 4, record='all')['recorded']
  assert float(np.mean((np.asarray(plain)[d1.index['steps']] - np.asarray(d1.x)) ** 2)) > 1e-10
  assert not np.array_equal(np.asarray(q.qstate.out_bias), np.asarray(start_r1.out_bias))   # refitted at the end
  # with the gate on (BASE) the recapture takes the correction the gate fitted for round 0 (same state, same fit)
  r0 = [e for e in json.load(open(f'{out}/report.json'))['gate'] if e['stage'] == 'round0'][0]
  np.testing.assert_allclose(np.asarray(start_r1.out_bias).reshape(6, -1).mean(1), r0['eps_bias']['mean_per_step'],
                             rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ the reconstruction gate (issue 14)

def _gate_errors(q, n, seed):
  """Per-image paired MSE (float64, computed here) of n final images (clipped to [-1, 1]) of the run's eps_fn
  against FP's, same noises."""
  cfg = q.meta['config']
  coeffs = sampler_coefficients(q.config, cfg['num_steps'], cfg['skip_type'], cfg['eta'])
  final = lambda eps: np.clip(np.asarray(make_sampler(eps, coeffs, (16, 16, 3), loop='host').sample(seed, 0, n)[
      'x_final'], np.float64), -1.0, 1.0)          # a pixel model's images: its final samples, clipped
  d = final(q.eps_fn) - final(family.eps_fn(q.model, q.params, q.config))
  return np.mean(d.reshape(n, -1) ** 2, axis=1)


def _gate_score(q, n, seed):
  return float(np.mean(_gate_errors(q, n, seed)))


def test_recon_gate_scores_every_stage_and_ends_with_the_best(full_run):
  """tcaq's --recon_gate: the state before reconstruction and after each round are scored; the run ends with the
  lowest score's state, whose score recomputed here from the finished run's own eps_fn (with its correction)
  and FP's, on the gate's 8 noises (seed --seed + 3), matches the report."""
  out, report = full_run
  stages = [e['stage'] for e in report['gate']]
  assert stages == ['init', 'round0', 'round1']
  scores = {e['stage']: e['score'] for e in report['gate']}
  assert all(np.isfinite(s) and s > 0 for s in scores.values())
  assert report['gate_kept'] == min(scores, key=scores.get)
  q = load_quantized(out)
  got = _gate_score(q, 8, BASE['seed'] + 3)
  np.testing.assert_allclose(got, scores[report['gate_kept']], rtol=1e-3)
  # the kept stage's correction is the final one (the run does not fit another)
  kept = next(e for e in report['gate'] if e['stage'] == report['gate_kept'])
  assert report['eps_bias'] == kept['eps_bias']


def test_recon_gate_keeping_init_equals_a_run_without_reconstruction(tmp_path, monkeypatch):
  """When the state before reconstruction scores best, the run's model is that state: its eps equals a
  --reconstruct=false run's (same init, same correction), though a round was reconstructed."""
  from tcaq_jax.train import recon_gate
  real = recon_gate.score
  calls = []

  def init_wins(per):                   # the real score, then 'init' made the best
    calls.append(real(per))
    return 0.0 if len(calls) == 1 else calls[-1] + 1.0
  monkeypatch.setattr(recon_gate, 'score', init_wins)
  cfg = dict(BASE, par_rounds=0)
  report = run(dict(cfg, out_dir=str(tmp_path / 'gated')))
  monkeypatch.setattr(recon_gate, 'score', real)
  assert [e['stage'] for e in report['gate']] == ['init', 'round0'] and report['gate_kept'] == 'init'
  assert len(report['units']) == 3                  # round 0 did run
  plain = run(dict(cfg, out_dir=str(tmp_path / 'plain'), reconstruct=False))
  assert 'gate' not in plain and plain['units'] == []
  a, b = load_quantized(str(tmp_path / 'gated')), load_quantized(str(tmp_path / 'plain'))
  np.testing.assert_allclose(np.asarray(a.qstate.out_bias), np.asarray(b.qstate.out_bias), atol=1e-6)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  t = jnp.asarray([700, 700], jnp.int32)
  for s in (0, 3):
    np.testing.assert_allclose(np.asarray(a.eps_fn(x, t, jnp.int32(s), None)),
                               np.asarray(b.eps_fn(x, t, jnp.int32(s), None)), atol=1e-5)


def test_gate_margin_keeps_the_earlier_stage_unless_the_later_one_leads_by_it(tmp_path):
  """--gate_margin: every scored stage stores its per-sample paired errors; with a margin no stage can clear, the
  run keeps 'init' and ends with init's correction, where the same scores with margin 0 keep round 0 (the lower
  score). The kept stage's per-sample errors match a recomputation here from the finished model and FP, sampled
  on the gate's 8 noises (seed --seed + 3)."""
  from tcaq_jax.train import recon_gate
  out = str(tmp_path / 'margin')
  report = run(dict(BASE, par_rounds=0, gate_margin=1e9, out_dir=out))
  entries = report['gate']
  assert [e['stage'] for e in entries] == ['init', 'round0']
  assert all(len(e['per_sample']) == 8 for e in entries)
  np.testing.assert_allclose(entries[0]['per_sample'], _gate_errors(load_quantized(out), 8, BASE['seed'] + 3),
                             rtol=1e-3)
  assert entries[1]['score'] < entries[0]['score']          # so margin 0 would have kept round 0
  assert recon_gate.best(entries, 0.0)['stage'] == 'round0'
  assert report['gate_kept'] == 'init' and report['eps_bias'] == entries[0]['eps_bias']


def test_resume_after_a_gate_keeps_the_stored_best(full_run, tmp_path):
  """Killed right after round 0's gate score was saved: the resumed run scores only round 1, and ends with the
  same model as the uninterrupted run (reading the best state from out_dir/gate_best when it is not round 1)."""
  ref_dir, ref = full_run
  out = str(tmp_path / 'gate_resumed')

  class Killed(Exception):
    pass

  def kill_after_gate(state):
    if (state.progress.round, state.progress.next_unit, state.progress.act_done) == (1, 0, False):
      raise Killed()
  with pytest.raises(Killed):
    run(dict(FULL, out_dir=out), hooks=Hooks(after_save=kill_after_gate))
  report = run(dict(FULL, out_dir=out))
  assert [e['stage'] for e in report['gate']] == ['init', 'round0', 'round1']
  assert report['gate_kept'] == ref['gate_kept']
  for e, r in zip(report['gate'], ref['gate']):
    np.testing.assert_allclose(e['score'], r['score'], rtol=1e-5)
  a, b = _qstate_arrays(ref_dir), _qstate_arrays(out)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)


def test_recon_gate_scores_a_stage_whose_correction_fails_as_inf(tmp_path, monkeypatch):
  """A stage whose eps correction cannot be fitted (here round 0's fit made to fail as a diverged model's does:
  FloatingPointError from the scale fit) is scored inf and never kept; the run finishes with another stage. When
  every stage fails, the run stops with a CalibrationError."""
  from tcaq_jax.train import eps_bias
  real = eps_bias.fit_rounds
  calls = []

  def fail_second(*a, **k):            # the real fit, except the second call (round 0's gate stage)
    calls.append(1)
    if len(calls) == 2:
      raise FloatingPointError('the eps scale fit gave k <= -1 or non-finite at steps [4]')
    return real(*a, **k)
  monkeypatch.setattr(eps_bias, 'fit_rounds', fail_second)
  report = run(dict(BASE, out_dir=str(tmp_path / 'one'), par_rounds=0))
  scores = {e['stage']: e['score'] for e in report['gate']}
  assert scores['round0'] == float('inf') and np.isfinite(scores['init'])
  assert 'k <= -1' in report['gate'][1]['error'] and report['gate_kept'] == 'init'

  def always_fail(*a, **k):
    raise FloatingPointError('the eps scale fit gave k <= -1 or non-finite at steps [4]')
  monkeypatch.setattr(eps_bias, 'fit_rounds', always_fail)
  with pytest.raises(CalibrationError, match='no stage could be corrected'):
    run(dict(BASE, out_dir=str(tmp_path / 'all'), par_rounds=0))
