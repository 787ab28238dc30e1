"""Real calibration runs exported and executed on the integer path (tcaq_jax/export/, tcaq_jax/quant/intexec.py):
a `--method=qdiff` run of ddim_tiny (Q-Diffusion's recipe: kernel-shaped split weight scales at the concat
shortcut, symmetric activation quantizers with zero point 2^(b-1), LSQ-learned activation scales, no TCR / DAQ)
and a `--method=tcaq` run of the class-conditional tiny LDM (ldm_tiny_cin: SpatialTransformer with self- and
cross-attention, GEGLU, split skip connection; TCR, per-step scales, the output-error DAQ's state).

Each run is the calibration pipeline itself on random weights (saved once as a model dir: no compiled init),
sized for CI's 2 CPUs: 6 sampler steps, 2 calibrated steps x 4 samples, three units quantized and the rest FP
(two in the LDM), one unit (the mid attention block) reconstructed for 10 + 2 iterations (qdiff) or none (tcaq,
with TCR on every quantized layer and min-max activation ranges: the cheapest tcaq settings that set every state
field). Checked: the exported state is the run's, bit for bit; every integer layer and attention matmul equals
the fake-quant one within the float32 summation bound (tests/export/int_check.py); and the whole forward of the
'int' backend is close to the
'fake' one. The whole forward is discontinuous (a rounding-level difference that moves one activation across a
rounding tie changes it by one code step), so its tolerance is measured, not derived: WHOLE_FORWARD_TOL, against
the spread of the fake path itself under one-ulp input perturbations (both are reported in
docs/results/export.md)."""
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcaq_jax import checkpoint
from tcaq_jax.export import export_run, load_exported
from tcaq_jax.export.synthetic import random_params
from tcaq_jax.models import configs, family
from tcaq_jax.quant.intexec import IntMatmul, IntWeights
from tcaq_jax.quantized import load_quantized

from int_check import assert_same_state, inputs, layer_pairs, rel_l2, worst_excess  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'train'))
from calib_settings import BASE  # noqa: E402  (tests/train/calib_settings.py)

STEP = 3                   # a calibrated step of the 6-step sampler
WHOLE_FORWARD_TOL = 5e-2   # relative L2 of eps, int vs fake (measured: docs/results/export.md)

_LDM = 'diffusion_model/'
RUNS = {
    # the reconstructed unit is the mid attention block (its LSQ-learned operand scales reach the integer
    # matmuls; a capture up to the middle compiles faster than one up to the last up block)
    'qdiff_ddim': ('ddim_tiny', dict(method='qdiff', recon_units='^mid/attn_1$', iters_scale=0.0005)),
    'tcaq_ldm': ('ldm_tiny_cin', dict(
        method='tcaq', recon_units='^$', par_rounds=0, tcr_select='all', act_pcts=(100.0,), eps_scale=None,
        policy_override=('.*:fp', f'^{_LDM}middle_block_1/:w8a8', f'^{_LDM}output_blocks_0_0/:w4a8'))),
}


@pytest.fixture(scope='module')
def exported_run(tmp_path_factory):
  """exported_run(name) -> (QuantizedModel of the run, ExportedModel)."""
  cache = {}

  def get(name):
    if name not in cache:
      config_name, settings = RUNS[name]
      root = tmp_path_factory.mktemp(name)
      config = configs.get_config(config_name)
      checkpoint.save_model_dir(str(root / 'model'), random_params(config, seed=3), config)
      from tcaq_jax.train.pipeline import run
      run(dict(BASE, model_config='', model_dir=str(root / 'model'), out_dir=str(root / 'run'), png_samples=0,
               **settings))
      export_run(str(root / 'run'), str(root / 'export'))
      cache[name] = (load_quantized(str(root / 'run')), load_exported(str(root / 'export')))
    return cache[name]
  return get


def _check_int_vs_fake(m, copies=3):
  """Per-layer bound and whole-forward closeness on one batch holding x and copies - 1 one-ulp perturbations of
  it (x (1 +- 2^-23)): the fake path's spread over those copies shows how far rounding-level differences alone
  move its whole forward. Returns the worst per-layer excess per weight bit width."""
  ints = {p for p, r in m.routes.items() if r == 'int'}
  quantized = m.policy.quantized()
  points = {s.path for s in quantized if s.kind in ('matmul', 'softmax')}
  assert ints == {s.path for s in quantized if s.kind in ('conv', 'dense') and s.weights} | points
  assert not m.fallback() and points                   # the attention matmuls run on integers too
  assert {q for op in m.int_layers.values() if isinstance(op, IntMatmul) for q in (op.a, op.b)} == points
  x, t, cond = inputs(m.config)
  signs = [jax.random.rademacher(jax.random.PRNGKey(100 + i), x.shape).astype(jnp.float32)
           for i in range(copies - 1)]
  xs = jnp.concatenate([x] + [x * (1 + s * 2.0 ** -23) for s in signs])
  ts = jnp.tile(t, copies)
  conds = None if cond is None else jnp.tile(cond, copies)
  found, fake_eps, int_eps = layer_pairs(m, xs, ts, conds, STEP)
  assert set(found) == set(m.int_layers)
  worst = worst_excess(m, found)
  n = x.shape[0]
  rel = rel_l2(int_eps[:n], fake_eps[:n])
  spread = max(rel_l2(fake_eps[i * n:(i + 1) * n], fake_eps[:n]) for i in range(1, copies))
  print(f'{m.manifest["source"]["method"]} {m.config["name"]}: worst |int - fake| / bound per w_bits {worst}; '
        f'whole forward rel L2 int vs fake {rel:.3g}, fake vs fake(x + 1 ulp) up to {spread:.3g}')
  assert rel < WHOLE_FORWARD_TOL, (rel, spread)
  return worst


def test_qdiff_run_exports_its_recipe_state_and_runs_on_integers(exported_run):
  q, m = exported_run('qdiff_ddim')
  assert m.manifest['source']['method'] == 'qdiff'
  assert_same_state(q, m)
  for spec in m.policy.quantized():
    path, st = spec.path, m.qstate.layers.get(spec.path)
    if spec.acts:
      assert np.all(np.asarray(st.a_zero) == 2 ** (spec.a_bits - 1)), path       # symmetric codes
      assert st.r is None and np.asarray(st.a_scale).shape[0] == 1, path         # no TCR, one slot
  # the split shortcut: kernel-shaped weight scales, one value per input segment, kept as two integer rows
  path = 'up_0/block_1/nin_shortcut'
  spec, w_scale = m.policy.layers[path], np.asarray(q.qstate.layers[path].w_scale)
  assert w_scale.shape[-2] == spec.in_features and spec.split
  segments = (w_scale[..., :spec.split, :], w_scale[..., spec.split:, :])
  assert all(np.all(s == s[..., :1, :]) for s in segments) and not np.array_equal(segments[0][..., 0, :],
                                                                                  segments[1][..., 0, :])
  np.testing.assert_array_equal(np.asarray(m.int_layers[path].w_scale),
                                np.stack([s[..., 0, :].reshape(-1) for s in segments]))
  _check_int_vs_fake(m)


def test_tcaq_ldm_run_exports_and_runs_on_integers(exported_run):
  q, m = exported_run('tcaq_ldm')
  assert m.manifest['source']['method'] == 'tcaq' and m.config['name'] == 'ldm_tiny_cin'
  assert_same_state(q, m)
  layers = {s.path: s for s in m.policy.quantized()}
  convs = [p for p, op in m.int_layers.items() if isinstance(op, IntWeights)]
  assert any(layers[p].split for p in convs)                                              # skip connection
  assert all(m.qstate.layers[p].r is not None for p in convs)                               # TCR
  assert all(np.asarray(m.qstate.layers[p].a_scale).shape[0] == 2 for p in layers)        # per-step scales
  softmax = [p for p, s in layers.items() if s.kind == 'softmax']
  # the output-error DAQ state (both log deltas only where both log kinds are chosen: random weights rarely do;
  # the three-way state is the synthetic tiny model's, tests/export/conftest.py)
  assert len(softmax) == 2 and all(m.qstate.layers[p].use_log2 is not None for p in softmax)
  assert {p.rsplit('/', 2)[-2] for p in softmax} == {'attn1', 'attn2'}                  # self- and cross-attention
  assert {4, 8, 'matmul'} <= set(_check_int_vs_fake(m))
  # tcaq's default eps correction (bias and scale) travels with the export (format version 3) and both backends
  # apply it
  assert q.meta['config']['eps_bias'] == 'pixel' and q.meta['config']['eps_scale'] is True
  assert m.qstate.out_bias.shape == (6,) + tuple(family.sample_shape(m.config))
  assert m.qstate.out_scale.shape == (6,)
  np.testing.assert_array_equal(np.asarray(m.qstate.out_scale), np.asarray(q.qstate.out_scale))
  assert m.manifest['version'] == 3
  x, t, cond = inputs(m.config)
  plain = dataclasses.replace(m, qstate=m.qstate.replace(out_bias=None, out_scale=None))
  for backend in ('fake', 'int'):
    corrected = np.asarray(m.eps_fn(backend)(x, t, jnp.int32(STEP), cond))
    without = np.asarray(plain.eps_fn(backend)(x, t, jnp.int32(STEP), cond))
    np.testing.assert_allclose(corrected, (without - np.asarray(m.qstate.out_bias)[STEP][None])
                               * float(m.qstate.out_scale[STEP]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(m.eps_fn('fake')(x, t, jnp.int32(STEP), cond)),
                             np.asarray(q.eps_fn(x, t, jnp.int32(STEP), cond)), rtol=1e-4, atol=1e-5)
