"""A quantized model with calibration-shaped state but no calibration (tests and benchmarks of the export).

  q = synthetic_quantized(model, params, config, w_bits=8, a_bits=8, num_steps=4)   # a QuantizedModel
  save_as_run(q, run_dir, done=True)          # a run dir that `load_quantized` / `export_run` read

Every field a tcaq run sets is set: qdiff policy (every conv / linear, attention operands, post-Softmax;
the concat shortcut split in two activation quantizers), TCR ratios r in [1, 2), min-max weight scales of
W diag(r) (optionally split at the concat boundary as Q-Diffusion's), AdaRound alphas drawn at random (so hard
rounding goes up or down), per-slot asymmetric activation ranges of x / r measured on one FP forward per slot
(each slot its own timestep), and a DAQ choice alternating log2 / uniform over the slots (or the three-way
log2 / log-sqrt2 / uniform state of the output-error rule). Seconds, not minutes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.models import family
from tcaq_jax.quant.intercept import collect_calls
from tcaq_jax.quant.policy import build_policy
from tcaq_jax.quant.ranges import params_from_range
from tcaq_jax.quant.state import LayerQState, QState, to_tree
from tcaq_jax.quantized import QuantizedModel, params_fingerprint, quant_eps_fn

__all__ = ['random_params', 'synthetic_quantized', 'save_as_run']


def random_params(config: dict, seed: int = 0, model=None) -> dict:
  """Random params of a named config without compiling its init (seconds instead of a minute on CPU):
  normal kernels scaled by 1/sqrt(fan_in), biases 0.02 * normal, norm scales 1."""
  from flax import traverse_util
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(family.abstract_params(config, model)).items():
    shape = tuple(leaf.shape)
    if path[-1] == 'kernel':
      v = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    else:
      v = np.ones(shape) if path[-1] == 'scale' else 0.02 * rng.normal(size=shape)
    out[path] = jnp.asarray(v, jnp.float32)
  return traverse_util.unflatten_dict(out)


def _act_ranges(model, params, config, policy, ratios, timesteps, seed) -> dict:
  """{path: [K, S, 2] (lo, hi) of x / r per slot and input segment} from one FP forward per timestep."""
  specs = {p: s for p, s in policy.layers.items() if s.acts}
  (x, _), kw = family.example_inputs(config, 2)
  x = jax.random.normal(jax.random.PRNGKey(seed), x.shape)

  def record(call):
    a = call.args[0]
    if call.path in ratios:
      a = a / ratios[call.path]
    s = specs[call.path].split
    segs = [a[..., :s], a[..., s:]] if s else [a]
    return jnp.stack([jnp.stack([jnp.min(g), jnp.max(g)]) for g in segs])

  @jax.jit
  def ranges(t):
    return collect_calls(lambda: model.apply({'params': params}, x, jnp.full((2,), t, jnp.int32), **kw),
                         select=lambda p, m: p in specs, record=record, need_args=True)[1]

  per_slot = [jax.device_get(ranges(t)) for t in timesteps]
  return {p: np.stack([r[p] for r in per_slot]) for p in specs}


def _weight_state(params, policy, ratios, w_split, rng) -> dict:
  """{path: LayerQState(r, w_scale, w_zero, alpha)}: min-max per output channel of W diag(r) (NumPy: no
  per-shape compiles), kernel-shaped scales split at the concat boundary when w_split, random AdaRound alphas."""
  layers = {}
  for spec in policy.quantized():
    st = {'r': ratios[spec.path]} if spec.path in ratios else {}
    if spec.weights:
      w = np.asarray(params_at(params, spec.path)['kernel'], np.float32)
      if 'r' in st:
        w = w * np.asarray(st['r'])[:, None]
      rows = w.reshape(-1, w.shape[-2], w.shape[-1])
      cuts = [0, spec.split, w.shape[-2]] if (w_split and spec.split) else [0, w.shape[-2]]
      segs = [params_from_range(rows[:, a:b].min(axis=(0, 1)), rows[:, a:b].max(axis=(0, 1)), spec.w_bits)
              for a, b in zip(cuts[:-1], cuts[1:])]
      keep = (1,) * (w.ndim - 2) + ((w.shape[-2],) if len(segs) > 1 else (1,)) + (w.shape[-1],)
      reps = np.diff(cuts)[:, None] if len(segs) > 1 else np.ones((1, 1), int)
      for name, j in (('w_scale', 0), ('w_zero', 1)):
        st[name] = jnp.asarray(np.repeat(np.stack([np.asarray(sz[j]) for sz in segs]), reps[:, 0], axis=0)
                               .reshape(keep), jnp.float32)
      st['alpha'] = jnp.asarray(rng.normal(size=w.shape), jnp.float32)
    layers[spec.path] = LayerQState(**st)
  return layers


def params_at(params, path: str):
  for k in path.split('/'):
    params = params[k]
  return params


def synthetic_quantized(model, params, config: dict, w_bits: int = 8, a_bits: int = 8, softmax_bits: int = 8,
                        num_steps: int = 4, num_slots: int = 2, seed: int = 0, w_split: bool = False,
                        preset: str = 'qdiff', overrides: tuple = (), daq: str = 'log2') -> QuantizedModel:
  """A QuantizedModel of (model, params) with synthetic but realistic quantizer state (module docstring).
  overrides: policy override strings ('REGEX:SPEC', e.g. '^up_:w4a8' for mixed bit widths); daq: 'log2' (slots
  alternate log2 / uniform, only log2_delta set) or 'three_way' (both log deltas set, slot k uses
  (k + 1) % 3: 1 log2, 2 log-sqrt2, 0 uniform: the output-error DAQ rule's state)."""
  args, kw = family.example_inputs(config, 1)
  policy = build_policy(model, {'params': params}, args, preset, w_bits, a_bits, softmax_bits, overrides,
                        example_kwargs=kw)
  rng = np.random.default_rng(seed)
  ratios = {s.path: jnp.asarray(rng.uniform(1.0, 2.0, s.in_features), jnp.float32)
            for s in policy.quantized() if s.acts and s.kind in ('conv', 'dense')}
  layers = _weight_state(params, policy, ratios, w_split, rng)
  timesteps = np.linspace(config.get('num_timesteps', 1000) - 1, 0, num_slots).astype(np.int32)
  ranges = _act_ranges(model, params, config, policy, ratios, timesteps, seed)
  for p, rg in ranges.items():
    spec = policy.layers[p]
    bits = spec.a_bits
    scale, zero = params_from_range(rg[..., 0], rg[..., 1], bits)                      # [K, S]
    st = layers.get(p, LayerQState()).replace(a_scale=scale, a_zero=zero)
    if spec.kind == 'softmax':
      delta = jnp.asarray(np.maximum(rg[:, 0, 1], 1e-6), jnp.float32)
      if daq == 'three_way':
        st = st.replace(use_log2=jnp.asarray((np.arange(num_slots) + 1) % 3, jnp.float32), log2_delta=delta,
                        logsqrt2_delta=delta)
      else:
        st = st.replace(use_log2=jnp.asarray(np.arange(num_slots) % 2 == 0, jnp.float32), log2_delta=delta)
    layers[p] = st
  step_slot = jnp.asarray(np.minimum(np.arange(num_steps) * num_slots // num_steps, num_slots - 1), jnp.int32)
  qstate = QState(step_slot, layers)
  meta = {'model_config': config, 'policy': policy.to_dict(), 'progress': {'done': True},
          'model_fingerprint': params_fingerprint(params),
          'config': {'num_steps': num_steps, 'skip_type': 'quad', 'eta': 0.0, 'guidance_scale': 1.0,
                     'method': 'synthetic', 'w_bits': w_bits, 'a_bits': a_bits, 'softmax_bits': softmax_bits}}
  return QuantizedModel(model, params, qstate, policy, quant_eps_fn(model, params, qstate, policy, config), config,
                        meta)


def save_as_run(q: QuantizedModel, run_dir: str, done: bool = True) -> None:
  """Writes q as the latest checkpoint of a calibration run dir (progress.done = done)."""
  from tcaq_jax import checkpoint
  meta = dict(q.meta, progress={'done': bool(done)})
  checkpoint.save(run_dir, 0, params=q.params, qstate=to_tree(q.qstate), meta=meta)
