"""Calibration runs refuse what they cannot use before any work (issue 13): another model's weights at the same
--model_dir on resume, an unwritable out_dir. A file of its own so that pytest-xdist runs it beside
tests/train/test_pipeline.py."""
import pytest

from tcaq_jax import checkpoint
from tcaq_jax.train.pipeline import CalibrationError, run

from calib_settings import BASE  # noqa: E402  (tests/train/calib_settings.py)


def test_resume_refuses_other_weights_in_the_same_model_dir_and_accepts_an_absolute_path(tmp_path, monkeypatch):
  from tcaq_jax.models import family
  monkeypatch.chdir(tmp_path)
  model, params, config = family.random_model('ddim_tiny', 0)
  checkpoint.save_model_dir('model', params, config)
  cfg = dict(BASE, model_config='', model_dir='model', out_dir='run', method='minmax', w_bits=8, a_bits=8,
             png_samples=0)
  run(cfg)
  report = run(dict(cfg, model_dir=str(tmp_path / 'model')))                    # same dir, written absolute
  assert report['units'] == []
  _, other, _ = family.random_model('ddim_tiny', 1)
  checkpoint.save_model_dir('model', other, config, overwrite=True)
  with pytest.raises(CalibrationError, match='other model weights'):
    run(cfg)


def test_an_unwritable_out_dir_fails_before_any_work(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a dir')
  with pytest.raises(CalibrationError, match='not writable'):
    run(dict(BASE, out_dir=str(blocker / 'run')))


def test_resume_reads_options_added_later_as_the_value_that_reproduces_the_stored_run(tmp_path):
  """A run stored before an option existed resumes under that option's reproducing value (config.ADDED_LATER)
  and is refused, naming the flag, under another value."""
  from tcaq_jax.train.calib_state import _check_compatible
  from tcaq_jax.train.config import ADDED_LATER, Config

  now = Config(lr_budget_cap=1.0, eps_bias='off', act_minmax_bits=0, recon_gate=False,
               par_x_range=0.0).resolve().to_flat()
  old = {k: v for k, v in now.items() if k not in ADDED_LATER}        # as written before those options existed
  _check_compatible(old, now, 'run')                                   # these values reproduce it: resumes
  with pytest.raises(CalibrationError, match="--eps_bias='off', now --eps_bias='pixel'"):
    _check_compatible(old, Config(act_minmax_bits=0, recon_gate=False, par_x_range=0.0).resolve().to_flat(),
                      'run')                                            # tcaq's since
  with pytest.raises(CalibrationError, match="--recon_gate=False, now --recon_gate=True"):
    _check_compatible(old, Config(eps_bias='off', act_minmax_bits=0, par_x_range=0.0).resolve().to_flat(), 'run')
  with pytest.raises(CalibrationError, match="--par_x_range=0.0, now --par_x_range=1.5"):
    _check_compatible(old, Config(eps_bias='off', act_minmax_bits=0, recon_gate=False,
                                  par_x_range=1.5).resolve().to_flat(), 'run')
  with pytest.raises(CalibrationError, match='--lr_budget_cap=1.0, now --lr_budget_cap=10.0'):
    _check_compatible(old, Config(lr_budget_cap=10.0, eps_bias='off', act_minmax_bits=0,
                                  recon_gate=False, par_x_range=0.0).resolve().to_flat(), 'run')
  with pytest.raises(CalibrationError, match='--act_ends'):
    _check_compatible(old, Config(act_ends='independent', eps_bias='off', act_minmax_bits=0,
                                  recon_gate=False, par_x_range=0.0).resolve().to_flat(),
                      'run')
