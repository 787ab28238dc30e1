"""Loads an exported model dir (needs only tcaq_jax: no calibration state, no torch) and gives its eps_fn on
the integer or the fake-quant backend.

  m = load_exported('exports/demo_w8a8')
  eps = m.eps_fn('int')          # eps_fn(x, t, step_index, cond) for the DDIM sampler (a jax Partial)
  m.routes                       # {layer path: 'int' | why it keeps fake quant}
  m.fallback()                   # the quantized points that are not on the integer path
  m.sampler                      # {'num_steps', 'skip_type', 'eta', 'guidance_scale'} the scales were made for
'fake' runs the float model with the exported weights dequantized ((codes - zero) * scale, the same values the
calibration's fake-quant path uses) and the activation quantizers applied by `apply.act_interceptor`.
'int' runs the layers whose route is 'int' with `quant.intexec` (int8 x int8 -> int32 convs, dense layers and
attention matmuls) and the rest as 'fake'.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.tree_util import Partial

from tcaq_jax.export.format import ExportError, decode_codes, read_arrays, read_manifest
from tcaq_jax.models import configs, family
from tcaq_jax.quant.apply import act_interceptor, correct_output
from tcaq_jax.quant.intexec import IntWeights, int_apply, int_plan
from tcaq_jax.quant.policy import Policy
from tcaq_jax.quant.state import LayerQState, QState

__all__ = ['BACKENDS', 'ExportedModel', 'load_exported']

BACKENDS = ('int', 'fake')


def _fake_eps(model, policy, cond_kw, params, qstate, x, t, step_index, cond):
  import flax.linen as nn
  with nn.intercept_methods(act_interceptor(qstate, policy, step_index)):
    out = model.apply({'params': params}, x, t, **({'y': cond} if cond_kw else {}))
  return correct_output(out, qstate, step_index)


def _int_eps(model, policy, cond_kw, params, qstate, int_layers, x, t, step_index, cond):
  return correct_output(int_apply(model, {'params': params}, qstate, policy, int_layers, x, t,
                                  step_index=step_index, **({'y': cond} if cond_kw else {})), qstate, step_index)


@dataclasses.dataclass
class ExportedModel:
  model: Any
  config: dict
  policy: Policy
  qstate: QState                 # activation quantizers only (r, a_scale / a_zero, log deltas, DAQ choice)
  params: dict                   # float params with every quantized kernel dequantized ('fake')
  int_params: dict               # float params without the kernels of the 'int' layers
  int_layers: dict               # {conv / dense path: IntWeights, QuantMatmul path: IntMatmul}
  routes: dict
  sampler: dict
  manifest: dict

  def fallback(self) -> dict:
    """{path: reason} of the quantized points that keep fake quant on the 'int' backend."""
    return {p: r for p, r in self.routes.items() if r != 'int'}

  def eps_fn(self, backend: str = 'int') -> Partial:
    cond_kw = family.has_cond(self.config)
    if backend == 'fake':
      return Partial(functools.partial(_fake_eps, self.model, self.policy, cond_kw), self.params, self.qstate)
    if backend == 'int':
      return Partial(functools.partial(_int_eps, self.model, self.policy, cond_kw), self.int_params, self.qstate,
                     self.int_layers)
    raise ExportError(f'backend {backend!r} not in {BACKENDS}')


def _nest(flat: dict) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split('/')): jnp.asarray(v) for k, v in flat.items()})


def load_exported(directory: str) -> ExportedModel:
  """Reads and checks an exported dir (ExportError names a missing, truncated or other-version file)."""
  manifest = read_manifest(directory)
  arrays = read_arrays(directory, manifest)
  try:
    policy = Policy.from_dict(manifest['policy'])
    config, table, sampler = manifest['model_config'], manifest['layers'], manifest['sampler']
    params_flat = {k[len('param:'):]: v for k, v in arrays.items() if k.startswith('param:')}
    acts: dict = {}
    for k, v in arrays.items():
      if k.startswith('act:'):
        _, path, field = k.split(':')
        acts.setdefault(path, {})[field] = jnp.asarray(v)
    qstate = QState(jnp.asarray(arrays['step_slot'], jnp.int32),
                    {p: LayerQState(**f) for p, f in acts.items()},
                    jnp.asarray(arrays['out_bias']) if 'out_bias' in arrays else None,
                    jnp.asarray(arrays['out_scale']) if 'out_scale' in arrays else None)
    codes = {p: (decode_codes(arrays[f'w:{p}'], row['w_bits'], row['shape']), arrays[f'w_scale:{p}'],
                 arrays[f'w_zero:{p}']) for p, row in table.items() if row.get('storage')}
  except (KeyError, ValueError, TypeError) as e:
    raise ExportError(f'{directory!r}: manifest and arrays do not fit together ({type(e).__name__}: {e})') from e
  deq = {f'{p}/kernel': ((c - z) * s).astype(np.float32)
         for p, (c, s, z) in codes.items()}
  model = configs.build_model(config)
  params = _nest({**params_flat, **deq})
  (x, t), kw = family.example_inputs(config, 1)
  routes, matmuls = int_plan(model, {'params': params}, policy, x, t, **kw)
  int_paths = [p for p, r in routes.items() if r == 'int' and policy.layers[p].kind in ('conv', 'dense')]
  int_layers = {p: IntWeights.from_storage(arrays[f'w:{p}'], arrays[f'w_scale:{p}'], arrays[f'w_zero:{p}'],
                                           table[p]['w_bits'], table[p]['shape'], policy.layers[p].split,
                                           params_flat.get(f'{p}/bias'))
                for p in int_paths}
  int_layers.update(matmuls)
  int_params = _nest({**params_flat, **{k: v for k, v in deq.items() if k[:-len('/kernel')] not in int_layers}})
  return ExportedModel(model, config, policy, qstate, params, int_params, int_layers, routes, sampler, manifest)
