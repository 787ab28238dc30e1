"""The calibration config (tcaq_jax/train/config.py): one frozen dataclass, flags with help from the field
definitions, method defaults resolved once, the flat flag-name form a run stores, and the flagfiles."""
import dataclasses
import os
import subprocess
import sys

from absl import flags
import pytest

from tcaq_jax.train.config import Config, ConfigError, METHOD_DEFAULTS, define_flags, config_from_flags, flat_fields

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse(argv):
  fv = flags.FlagValues()
  define_flags(fv)
  fv(['calibrate'] + argv)
  return config_from_flags(fv)


def test_every_flag_has_help_text_and_a_unique_name():
  names = [name for name, _, _ in flat_fields()]
  assert len(names) == len(set(names))
  for name, _, f in flat_fields():
    assert len(f.metadata.get('help', '')) > 15, name


def test_help_of_the_cli_explains_every_flag():
  proc = subprocess.run([sys.executable, '-m', 'tcaq_jax.train.calibrate', '--help'], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  out = proc.stdout + proc.stderr
  for name, _, f in flat_fields():
    assert f'--{name}:' in out or f'--[no]{name}:' in out, name
    first_words = ' '.join(f.metadata['help'].split()[:3])
    assert first_words in ' '.join(out.split()), (name, first_words)


def test_resolve_fills_method_defaults_once():
  for method, md in METHOD_DEFAULTS.items():
    cfg = Config(method=method).resolve()
    flat = cfg.to_flat()
    for k, v in md.items():
      assert flat[k] == v, (method, k)
    assert cfg.resolve() == cfg                               # idempotent
  cfg = Config(method='tcaq', tcr=False, w_bits=4, a_bits=8).resolve()
  assert cfg.tcr is False and cfg.daq is True and cfg.r_tru == 3.0      # explicit override kept; paper R_tru
  assert Config(w_bits=6, a_bits=6).resolve().r_tru == 0.0
  assert Config(method='minmax').resolve().learn_act_scale is False
  assert Config(method='minmax').resolve().act_pcts == (100.0,)
  assert Config(method='qdiff', w_bits=4, a_bits=4).resolve().out_dir == os.path.join('runs', 'calib',
                                                                                       'demo_qdiff_w4a4')
  with pytest.raises(ConfigError, match='--w_bits=1'):
    Config(w_bits=1).resolve()
  with pytest.raises(ConfigError, match='--method'):
    Config(method='nope').resolve()
  with pytest.raises(dataclasses.FrozenInstanceError):
    Config().w_bits = 3


def test_rounds_and_iterations():
  cfg = Config(iters_scale=0.01).resolve()
  assert cfg.rounds == 3 and cfg.round_iters(0) == 200 and cfg.round_iters(2) == 100
  assert cfg.recon_for_round(1).iters == 100 and cfg.recon_for_round(0).batch == 16
  assert Config(method='qdiff_plus').resolve().rounds == 1 and Config(method='minmax').resolve().rounds == 0
  q = Config(method='qdiff', iters_scale=0.01).resolve()           # Q-Diffusion: AdaRound pass, activation pass
  assert q.rounds == 2 and q.round_iters(0) == 200 and q.round_iters(1) == 50
  assert not q.recon_for_round(0).act_pass and q.recon_for_round(1).act_pass and q.recon_for_round(1).batch == 32


def test_adaround_lr_follows_the_budget():
  """Below the paper's budget the AdaRound lr is --lr x min(--lr_budget_cap, 1 / iters_scale); at or above it,
  or with the cap at 1, --lr itself; every round's ReconConfig carries it."""
  for scale, cap, factor in ((1.0, 10.0, 1.0), (2.0, 10.0, 1.0), (0.5, 10.0, 2.0), (0.25, 10.0, 4.0),
                             (0.02, 10.0, 10.0), (0.005, 10.0, 10.0), (0.02, 1.0, 1.0), (0.02, 25.0, 25.0)):
    cfg = Config(iters_scale=scale, lr_budget_cap=cap).resolve()
    assert cfg.adaround_lr == pytest.approx(1e-3 * factor), (scale, cap)
    assert {cfg.recon_for_round(r).lr for r in range(cfg.rounds)} == {cfg.adaround_lr}
    assert cfg.recon.lr == 1e-3                                     # --lr itself is kept as given
  assert Config().resolve().adaround_lr == 1e-3                     # off by default (cap 1)
  with pytest.raises(ConfigError, match='--lr_budget_cap'):
    Config(lr_budget_cap=0.5).resolve()


def test_a_config_stored_before_options_existed_reads_as_what_it_did():
  """with_added_later fills the options a stored flat config predates with their reproducing values, in the
  stored (JSON) form (tuples as lists too), so an old config equals today's config with those values, and not
  today's default where a default changed (tcaq's --eps_bias: 'pixel' now, absent = 'off'; --act_minmax_bits)."""
  from tcaq_jax.train.config import ADDED_LATER, with_added_later
  then = Config(eps_bias='off', act_minmax_bits=0, recon_gate=False, eps_scale=False,
                par_x_range=0.0).resolve().to_flat()
  old = {k: v for k, v in then.items() if k not in ADDED_LATER}
  assert with_added_later(old) == then and with_added_later(dict(old, act_ends='independent'))['act_ends'] == 'independent'
  now = Config().resolve().to_flat()
  assert now['eps_bias'] == 'pixel' and with_added_later(old) != now
  assert Config(method='qdiff').resolve().eps_bias == 'off' and Config(method='minmax').resolve().eps_bias == 'off'


def test_eps_scale_follows_the_method_and_needs_the_bias():
  """--eps_scale: tcaq's default with its --eps_bias; off where the bias is off (unless asked for: then an error
  naming both flags); off for the other methods, which may turn it on with a bias."""
  assert Config().resolve().eps_scale is True
  assert Config(eps_bias='off').resolve().eps_scale is False
  assert Config(eps_scale=False).resolve().eps_scale is False
  assert Config(method='qdiff').resolve().eps_scale is False
  assert Config(method='minmax', eps_bias='pixel', eps_scale=True).resolve().eps_scale is True
  with pytest.raises(ConfigError, match='--eps_scale=true.*--eps_bias'):
    Config(eps_bias='off', eps_scale=True).resolve()
  with pytest.raises(ConfigError, match='--eps_scale=true.*--eps_bias'):
    Config(method='qdiff', eps_scale=True).resolve()


def test_par_x_range_is_off_by_default_and_checked():
  assert Config().resolve().par_x_range == 0.0 and Config(method='qdiff_plus').resolve().par_x_range == 0.0
  assert Config(par_x_range=1.5).resolve().par_x_range == 1.5
  with pytest.raises(ConfigError, match='--par_x_range=-0.5'):
    Config(par_x_range=-0.5).resolve()
  assert Config(par_x_range=1.5, par_x_scope='act').resolve().par_x_scope == 'act'
  with pytest.raises(ConfigError, match='--par_x_scope=act has no effect without --par_x_range'):
    Config(par_x_scope='act').resolve()


def test_flat_form_round_trips_and_nests_the_reconstruction_settings():
  cfg = Config.from_flat({'recon_iters': 123, 'recon_batch': 8, 'lr': 0.5, 'w_bits': 6, 'a_bits': 6,
                          'act_pcts': ['100', '99.9'],
                          'policy_override': ['conv_out$:fp']})
  assert cfg.recon.iters == 123 and cfg.recon.batch == 8 and cfg.recon.lr == 0.5 and cfg.w_bits == 6
  assert cfg.act_pcts == (100.0, 99.9) and cfg.policy_override == ('conv_out$:fp',)
  flat = cfg.resolve().to_flat()
  assert flat['recon_iters'] == 123 and flat['act_pcts'] == [100.0, 99.9] and 'recon' not in flat
  assert Config.from_flat(flat).resolve() == cfg.resolve()
  with pytest.raises(ConfigError, match='bogus'):
    Config.from_flat({'bogus': 1})


def test_cifar10_flagfiles_are_the_base_plus_bit_widths(monkeypatch):
  monkeypatch.chdir(ROOT)                                           # flagfile includes are relative to the cwd
  want = {'4a4': (4, 4, 0.0), '4a8': (4, 8, 3.0), '6a6': (6, 6, 0.0), '8a8': (8, 8, 0.0)}
  for tag, (w, a, r) in want.items():
    cfg = _parse([f'--flagfile=configs/cifar10_w{tag}.flags']).resolve()
    assert (cfg.w_bits, cfg.a_bits, cfg.r_tru) == (w, a, r)
    assert cfg.out_dir == f'runs/calib/cifar10_w{tag}' and cfg.model_dir == 'checkpoints/ddim_cifar10'
    assert (cfg.num_steps, cfg.skip_type, cfg.eta, cfg.calib_steps, cfg.calib_samples) == (100, 'quad', 0.0, 20, 256)
    assert (cfg.recon.iters, cfg.par_rounds, cfg.par_iters, cfg.recon.batch, cfg.act_batch) == (20000, 2, 10000,
                                                                                                 16, 64)
    assert (cfg.method, cfg.preset, cfg.softmax_bits) == ('tcaq', 'qdiff', 8)


def test_tri_state_flags_default_to_the_method():
  cfg = _parse(['--method=qdiff_plus', '--tcr']).resolve()
  assert cfg.tcr is True and cfg.learn_act_scale is True and cfg.par is False
  cfg = _parse(['--method=qdiff', '--recon_batch=8']).resolve()
  assert (cfg.recon.batch, cfg.recon.act_lr, cfg.schedule, cfg.weight_init) == (8, 4e-4, 'two_pass', 'minmax')
  assert _parse([]).resolve().recon.batch == 16 and _parse([]).resolve().daq_rule == 'error'


@pytest.mark.parametrize('flat, match', [
    ({'recon_iters': -5}, '--recon_iters=-5'),                       # used to run and report final_rec NaN
    ({'par_iters': -1}, '--par_iters=-1'),
    ({'iters_scale': -0.1}, '--iters_scale'),
    ({'recon_batch': 0}, '--recon_batch=0'),
    ({'act_batch': 0}, '--act_batch=0'),
    ({'calib_steps': 30, 'num_steps': 20}, '--calib_steps=30'),
    ({'lr': 0.0}, '--lr=0.0'),
    ({'warmup': 1.0}, '--warmup'),
    ({'r_tru': 0.5}, '--r_tru=0.5'),
    ({'act_pcts': ('101',)}, '--act_pcts'),
    ({'recon_units': '(unclosed'}, '--recon_units'),                 # used to fail after 14 s of work
    ({'method': 'minmax', 'par': True}, '--par=true has no effect'),  # used to report par: true
    ({'method': 'minmax', 'learn_act_scale': True}, '--learn_act_scale=true'),
    ({'method': 'tcaq', 'reconstruct': False, 'par': True}, '--reconstruct=false'),
    ({'method': 'minmax', 'act_pcts': ('99.9',)}, '--act_pcts=99.9 has no effect'),
    ({'method': 'qdiff', 'par': True}, '--schedule=two_pass with --par=true'),
    ({'method': 'qdiff', 'learn_act_scale': False}, '--learn_act_scale=false contradicts'),
    ({'method': 'qdiff', 'daq': True}, '--act_init=minmax_sym has no DAQ'),
    ({'act_lr': 0.0}, '--act_lr=0.0'),
    ({'tcr_exponents': ('0', '0')}, '--tcr_exponents'),
    ({'tcr_exponents': ('-1',)}, '--tcr_exponents'),
])
def test_bad_values_and_ignored_combinations_are_refused(flat, match):
  with pytest.raises(ConfigError, match=match):
    Config.from_flat(flat).resolve()


def test_tcr_select_auto_resolves_by_bit_widths():
  assert Config(w_bits=6, a_bits=6).resolve().tcr_select == 'error'
  # tcaq learns activation step sizes at 6-bit activations (config.TCAQ_LSQ_A_BITS), at act_lr 4e-4
  w6a6 = Config(w_bits=6, a_bits=6).resolve()
  assert w6a6.learn_act_scale is True and w6a6.recon.act_lr == 4e-4
  assert Config(w_bits=4, a_bits=8).resolve().learn_act_scale is False
  assert Config(w_bits=4, a_bits=4).resolve().learn_act_scale is False                      # measured worse
  assert Config(w_bits=6, a_bits=6, learn_act_scale=False).resolve().learn_act_scale is False   # explicit kept
  assert Config(w_bits=6, a_bits=6, reconstruct=False).resolve().learn_act_scale is False
  assert Config(method='qdiff_plus', w_bits=6, a_bits=6).resolve().recon.act_lr == 4e-5
  assert Config(w_bits=8, a_bits=8).resolve().tcr_select == 'error'
  assert Config(w_bits=4, a_bits=8).resolve().tcr_select == 'error'
  assert Config(w_bits=8, a_bits=4).resolve().tcr_select == 'error'
  assert Config(w_bits=4, a_bits=4).resolve().tcr_select == 'error'
  assert Config(w_bits=3, a_bits=8).resolve().tcr_select == 'all'
  assert Config(w_bits=4, a_bits=4, tcr_select='all').resolve().tcr_select == 'all'         # explicit kept
  assert Config(w_bits=4, a_bits=4).resolve().resolve().tcr_select == 'error'              # idempotent


def test_tcaq_takes_min_max_activation_ranges_at_8_bit_activations():
  """--act_minmax_bits (tcaq: 8): 8-bit activations take min-max ranges (--act_pcts=100), narrower ones the
  percentile search; 0 searches at every width; other methods keep their own; an explicit other --act_pcts at
  8 bits is refused with both flags named."""
  from tcaq_jax.train.act_search import DEFAULT_PCTS
  assert Config(w_bits=4, a_bits=8).resolve().act_pcts == (100.0,)
  assert Config(w_bits=8, a_bits=8).resolve().act_pcts == (100.0,)
  assert Config(w_bits=6, a_bits=6).resolve().act_pcts == DEFAULT_PCTS
  assert Config(w_bits=8, a_bits=8, act_minmax_bits=0).resolve().act_pcts == DEFAULT_PCTS
  assert Config(w_bits=6, a_bits=6, act_minmax_bits=6).resolve().act_pcts == (100.0,)
  assert Config(method='qdiff_plus', w_bits=8, a_bits=8).resolve().act_pcts == DEFAULT_PCTS
  with pytest.raises(ConfigError, match='--act_pcts=99.9 has no effect at --a_bits=8 with --act_minmax_bits=8'):
    Config(w_bits=8, a_bits=8, act_pcts=(99.9,)).resolve()
  with pytest.raises(ConfigError, match='--act_minmax_bits=-1'):
    Config(act_minmax_bits=-1).resolve()


def test_gate_margin_is_checked():
  assert Config(gate_margin=2.0).resolve().gate_margin == 2.0
  with pytest.raises(ConfigError, match='--gate_margin=-1'):
    Config(gate_margin=-1.0).resolve()
