"""Activation scale search (RepQ-ViT-style percentile search, batch 64) per calibration slot, and DAQ.

For every layer whose input the policy quantizes and every slot k, a batch of (up to) `batch` calibration
samples of that slot runs through the model (one jitted forward per slot); for the layer input x (divided by
the TCR ratio r when present) the clipping range is chosen among percentile candidates (100 = min-max) by the
quantization MSE of x. Percentiles are estimated on a random subsample of at most 2^20 values (min / max are
exact); on CPU they are computed by NumPy through a host callback (30x faster than XLA:CPU's sort). Split (concat) inputs get one quantizer per segment. Post-Softmax points get a uniform quantizer with
zero point 0 and, with DAQ, a log2 (or log-sqrt2) delta and the per-slot log2-vs-uniform choice
(`tcaq_jax.quant.daq.choose_log2` on a sample of values).

  layers = search_act_scales(forward, policy, qlayers, data, slot_ids, num_slots, batch=64, daq=True)
  (a compiled `make_search(...)` passed as search_fn is reused across calls, e.g. PAR rounds)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.quant.apply import quantize_weights
from tcaq_jax.quant.daq import CHOICES, choose_by_error, choose_log2, output_errors
from tcaq_jax.quant.intercept import collect_calls
from tcaq_jax.quant.log2 import log2_search_delta
from tcaq_jax.quant.ranges import params_from_range
from tcaq_jax.quant.state import LayerQState
from tcaq_jax.quant.tcr import scale_activation, scale_kernel_inputs
from tcaq_jax.quant.uniform import fake_quant

__all__ = ['ActSearchError', 'DEFAULT_PCTS', 'ENDS', 'make_search', 'search_act_scales', 'make_minmax_sym',
           'init_minmax_sym', 'daq_choices']

DEFAULT_PCTS = (100.0, 99.999, 99.99, 99.9)
ENDS = ('paired', 'independent')      # how clipping candidates pair the two tails (`search_uniform`)
_MAX_SUB = 1 << 20


class ActSearchError(ValueError):
  """A slot without calibration samples, or non-finite statistics (names the layer and slot)."""


def _subsample(x, key, n=_MAX_SUB):
  flat = x.reshape(-1)
  if flat.size <= n:
    return flat
  return flat[jax.random.randint(key, (n,), 0, flat.size)]


def _np_percentiles(values, q):
  """jnp.percentile's linear interpolation on the host: the same float32 position arithmetic, the order
  statistics by np.partition (introselect, O(N)) and the final low * w_low + high * w_high evaluated as XLA:CPU
  does (fused multiply-add on the low term), so the values equal the on-device sort's (tested to 1 ulp)."""
  v = np.asarray(values, np.float32).reshape(-1)
  n = v.shape[0]
  pos = (np.asarray(q, np.float32) / np.float32(100.0)) * np.float32(n - 1)
  floor = np.floor(pos)
  w_high = (pos - floor).astype(np.float32)
  w_low = (np.float32(1.0) - w_high).astype(np.float32)
  lo = np.clip(floor, 0, n - 1).astype(np.int64)
  hi = np.clip(np.ceil(pos), 0, n - 1).astype(np.int64)
  part = np.partition(v, np.unique(np.concatenate([lo, hi])))
  high_term = (part[hi] * w_high).astype(np.float32)
  return (part[lo].astype(np.float64) * w_low + high_term.astype(np.float64)).astype(np.float32)


def _percentiles(values, q: np.ndarray):
  """jnp.percentile(values, q) (linear interpolation). On CPU it runs as NumPy's introselect through a host
  callback (`_np_percentiles`): XLA:CPU sorts 2^20 floats in ~0.5 s, the partition takes ~0.02 s; accelerators
  keep the on-device sort."""
  if jax.default_backend() != 'cpu':
    return jnp.percentile(values, jnp.asarray(q))
  return jax.pure_callback(functools.partial(_np_percentiles, q=q), jax.ShapeDtypeStruct(q.shape, jnp.float32),
                           values)


def layer_output(call, x, kernel=None):
  """The intercepted conv / dense layer of `call` applied to x, with its own params or `kernel` instead of its
  kernel (float32 output)."""
  params = dict(call.module.variables['params'])
  if kernel is not None:
    params['kernel'] = kernel.astype(params['kernel'].dtype)
  y = call.module.clone(parent=None).apply({'params': params}, x.astype(call.args[0].dtype))
  return y.astype(jnp.float32)


def output_score(call, kernel, x, seg=None):
  """score(xq) for `search_uniform`: mean squared error of the layer output (kernel: the layer's W diag(r), FP)
  with input xq against its FP output. seg (lo, hi): xq is that channel segment of x (the rest stays FP)."""
  ref = call.output.astype(jnp.float32)

  def score(xq):
    if seg is not None:
      xq = jnp.concatenate([x[..., :seg[0]], xq, x[..., seg[1]:]], axis=-1)
    return jnp.mean((layer_output(call, xq, kernel) - ref) ** 2)
  return score


def search_uniform(x, bits, pcts, key, symmetric, score=None, ends: str = 'paired'):
  """Best (scale, zero) scalars over percentile candidates (one sort) by the MSE of fake_quant(x), or by
  score(fake_quant(x)) when given (e.g. `output_score`: the layer's output error). ends 'paired': candidate i
  clips both tails at percentile i (hi = p_i, lo = 100 - p_i); 'independent': every (lo_i, hi_j) pair, so one
  tail can stay at its extreme while the other is clipped (len(pcts)^2 candidates; asymmetric ranges only)."""
  if ends not in ENDS:
    raise ActSearchError(f'ends must be one of {ENDS}, got {ends!r}')
  sub = _subsample(x, key)
  q = np.asarray([p for p in pcts if p < 100.0] + [100.0 - p for p in pcts if p < 100.0], np.float32)
  nc = len([p for p in pcts if p < 100.0])
  lo_all, hi_all = jnp.min(x), jnp.max(x)
  his, los = [], []
  if nc:
    v = _percentiles(sub, q)
    his, los = [v[i] for i in range(nc)], [v[nc + i] for i in range(nc)]
  if any(p >= 100.0 for p in pcts):
    his, los = [hi_all] + his, [lo_all] + los
  if ends == 'independent' and not symmetric:
    los, his = [lo for lo in los for _ in his], [hi for _ in los for hi in his]
  s, z = params_from_range(jnp.stack(los), jnp.stack(his), bits, symmetric=symmetric)     # [n_cand]
  # candidates unrolled (a handful): XLA:CPU runs while-loop (lax.map) bodies much slower than top-level ops
  score = score or (lambda xq: jnp.mean((xq - x) ** 2))
  err = jnp.stack([score(fake_quant(x, s[i], z[i], bits)) for i in range(s.shape[0])])
  best = jnp.argmin(err)
  return s[best], z[best]


_DAQ_ERR_SAMPLES = 16        # samples of a slot's batch on which the attention-output errors are measured


def _v_path(softmax_path: str) -> str:
  """The V operand's quantization point beside a post-Softmax point (models name it 'av_v')."""
  return softmax_path.rsplit('/', 1)[0] + '/av_v' if '/' in softmax_path else 'av_v'


def make_search(forward: Callable, policy, ratio_paths: Sequence[str] = (), pcts: Sequence[float] = DEFAULT_PCTS,
                daq: bool = True, log_kind: str = 'log2', n_daq_values: int = 4096, daq_rule: str = 'llr',
                criterion: str = 'input', ends: str = 'paired') -> Callable:
  """The compiled per-slot search: fn(consts, ratios {path: r}, key, *data_batch) -> {path: per-slot record}.

  ratio_paths: the layers whose inputs are divided by a TCR ratio (part of the compiled signature). Reuse the
  returned function across calls with the same forward, policy and options (PAR rounds). daq_rule 'llr': the
  power-law likelihood-ratio test on sampled values (log kind `log_kind`); 'error': the errors of probs @ V
  (V: the FP input of the sibling 'av_v' point, called before the softmax) with each of uniform / log2 /
  log-sqrt2 (`tcaq_jax.quant.daq.output_errors`). ends: how a conv / dense input's candidates pair the two tails
  (`search_uniform`; post-Softmax ranges stay paired). criterion 'input': a conv / dense input's clipping range by the
  MSE of the quantized input; 'output': by the MSE of the layer's output (weights W diag(r) FP) against its FP
  output (`output_score`; a split input's segments one at a time, the other segment FP).
  """
  if daq_rule not in ('llr', 'error'):
    raise ActSearchError(f"daq_rule must be 'llr' or 'error', got {daq_rule!r}")
  if criterion not in ('input', 'output'):
    raise ActSearchError(f"criterion must be 'input' or 'output', got {criterion!r}")
  if ends not in ENDS:
    raise ActSearchError(f'ends must be one of {ENDS}, got {ends!r}')
  specs = {s.path: s for s in policy.layers.values() if s.acts}
  ratio_paths = frozenset(ratio_paths)
  pcts = tuple(float(p) for p in pcts)
  v_paths = {_v_path(p) for p, s in specs.items() if s.kind == 'softmax'} if daq and daq_rule == 'error' else set()
  stash: dict = {}                    # V operands seen in the current trace (consumed by the same trace)

  def search(ratios, key, call):
    spec = specs.get(call.path)
    if call.path in v_paths:
      stash[call.path] = call.args[0].astype(jnp.float32)
    if spec is None:
      return None
    x = call.args[0].astype(jnp.float32)
    kernel = None
    if spec.kind in ('conv', 'dense') and criterion == 'output':
      kernel = call.module.variables['params']['kernel'].astype(jnp.float32)
    if call.path in ratio_paths and spec.kind in ('conv', 'dense'):
      x = scale_activation(x, ratios[call.path])
      kernel = None if kernel is None else scale_kernel_inputs(kernel, ratios[call.path])
    k = jax.random.fold_in(key, call.index)
    rec = {}
    if spec.kind == 'softmax':
      s, z = search_uniform(x, spec.a_bits, pcts, k, symmetric=True)
      rec['a_scale'], rec['a_zero'] = s[None], z[None]
      if daq and daq_rule == 'llr':
        sub = _subsample(x, jax.random.fold_in(k, 1), n=max(n_daq_values, 1 << 16))
        rec['delta'] = log2_search_delta(sub, spec.a_bits, log_kind)
        rec['values'] = sub[jax.random.randint(jax.random.fold_in(k, 2), (n_daq_values,), 0, sub.size)]
      elif daq:
        sub = _subsample(x, jax.random.fold_in(k, 1), n=1 << 16)
        rec['log2_delta'] = log2_search_delta(sub, spec.a_bits, 'log2')
        rec['logsqrt2_delta'] = log2_search_delta(sub, spec.a_bits, 'logsqrt2')
        v = stash.get(_v_path(call.path))
        m = min(_DAQ_ERR_SAMPLES, x.shape[0])
        rec['errors'] = output_errors(x[:m], None if v is None else v[:m], s, rec['log2_delta'],
                                      rec['logsqrt2_delta'], spec.a_bits)
    elif spec.split:
      bounds = [(0, spec.split), (spec.split, x.shape[-1])]
      sz = [search_uniform(x[..., lo:hi], spec.a_bits, pcts, jax.random.fold_in(k, i), symmetric=False,
                           score=None if kernel is None else output_score(call, kernel, x, (lo, hi)), ends=ends)
            for i, (lo, hi) in enumerate(bounds)]
      rec['a_scale'] = jnp.stack([s for s, _ in sz])
      rec['a_zero'] = jnp.stack([z for _, z in sz])
    else:
      s, z = search_uniform(x, spec.a_bits, pcts, k, symmetric=False,
                            score=None if kernel is None else output_score(call, kernel, x), ends=ends)
      rec['a_scale'], rec['a_zero'] = s[None], z[None]
    return rec

  def run(consts, ratios, key, *d):
    stash.clear()
    rec = collect_calls(lambda: forward(consts, *d), select=lambda path, m: path in specs or path in v_paths,
                        record=functools.partial(search, ratios, key), need_args=True)[1]
    stash.clear()
    return {p: r for p, r in rec.items() if p in specs}

  return jax.jit(run)


def slot_batches(slot_ids: np.ndarray, num_slots: int, batch: int, seed: int, what: str):
  """(slot k, sorted sample indices of slot k: all of them, or `batch` drawn without replacement)."""
  rng = np.random.default_rng(seed)
  for k in range(num_slots):
    idx = np.nonzero(np.asarray(slot_ids) == k)[0]
    if idx.size == 0:
      raise ActSearchError(f'{what}: calibration slot {k} has no samples')
    if idx.size > batch:
      idx = np.sort(rng.choice(idx, batch, replace=False))
    yield k, idx


def search_act_scales(forward: Callable, policy, qlayers: dict, data: Sequence[np.ndarray],
                      slot_ids: np.ndarray, num_slots: int, batch: int = 64, pcts: Sequence[float] = DEFAULT_PCTS,
                      daq: bool = True, log_kind: str = 'log2', n_daq_values: int = 4096, seed: int = 0,
                      consts: Any = None, search_fn: Callable | None = None, daq_rule: str = 'llr',
                      criterion: str = 'input', ends: str = 'paired') -> dict:
  """Returns {path: LayerQState(a_scale [K, S], a_zero [K, S], [<log_kind>_delta [K], use_log2 [K]])}.

  daq_rule 'error': per slot the quantizer with the lowest attention-output error; use_log2 then holds 0
  (uniform) / 1 (log2) / 2 (log-sqrt2) when both log kinds are used by the layer (both deltas stored), else 0/1
  with only the used kind's delta stored.

  forward(consts, *data_batch) runs the FP model (consts: params, passed as jit arguments); qlayers: current
  {path: LayerQState} (for the TCR ratios r); data: arrays [N, ...]; slot_ids: [N] slot of every sample.
  search_fn: a compiled search from `make_search` with the same options (built when None).
  """
  specs = {s.path: s for s in policy.layers.values() if s.acts}
  ratios = {p: st.r for p, st in qlayers.items() if st.r is not None and p in specs}
  if search_fn is None:
    search_fn = make_search(forward, policy, tuple(sorted(ratios)), pcts, daq, log_kind, n_daq_values, daq_rule,
                            criterion, ends)
  per_slot = []
  for k, idx in slot_batches(slot_ids, num_slots, batch, seed, 'activation search'):
    res = search_fn(consts, ratios, jax.random.PRNGKey(seed * 7919 + k),
                    *[jnp.asarray(np.asarray(a)[idx]) for a in data])
    per_slot.append(jax.device_get(res))
  missing = set(specs) - set(per_slot[0])
  if missing:
    raise ActSearchError(f'activation search: layers never called in the forward pass: {sorted(missing)[:5]}')
  out = {}
  for p, spec in specs.items():
    st = {'a_scale': np.stack([r[p]['a_scale'] for r in per_slot]).astype(np.float32),
          'a_zero': np.stack([r[p]['a_zero'] for r in per_slot]).astype(np.float32)}
    if not np.all(np.isfinite(st['a_scale'])):
      bad = int(np.nonzero(~np.all(np.isfinite(st['a_scale']), axis=1))[0][0])
      raise ActSearchError(f'activation search: non-finite scale at layer {p!r}, slot {bad}')
    if spec.kind == 'softmax' and daq and daq_rule == 'error':
      st.update(_error_choice(per_slot, p, num_slots))
    elif spec.kind == 'softmax' and daq:
      st[f'{log_kind}_delta'] = np.asarray([r[p]['delta'] for r in per_slot], np.float32).reshape(num_slots)
      values = np.stack([r[p]['values'] for r in per_slot])
      st['use_log2'] = np.asarray(choose_log2(values), np.float32).reshape(num_slots)
    out[p] = LayerQState(**{k: jnp.asarray(v) for k, v in st.items()})
  return out


def _error_choice(per_slot: list, path: str, num_slots: int) -> dict:
  """LayerQState fields of the output-error DAQ choice of one post-Softmax layer (see `search_act_scales`)."""
  choice = choose_by_error(np.stack([np.asarray(r[path]['errors']) for r in per_slot]))
  deltas = {kind: np.asarray([r[path][f'{kind}_delta'] for r in per_slot], np.float32).reshape(num_slots)
            for kind in ('log2', 'logsqrt2')}
  if (choice == 1).any() and (choice == 2).any():
    return {'log2_delta': deltas['log2'], 'logsqrt2_delta': deltas['logsqrt2'],
            'use_log2': choice.astype(np.float32)}
  kind = 'logsqrt2' if (choice == 2).any() else 'log2'
  return {f'{kind}_delta': deltas[kind], 'use_log2': (choice > 0).astype(np.float32)}


def daq_choices(layers: dict, policy) -> dict:
  """{post-Softmax layer path: [quantizer name per slot]} of a state ('uniform' / 'log2' / 'logsqrt2')."""
  out = {}
  for p, st in layers.items():
    spec = policy.layers.get(p)
    if spec is None or spec.kind != 'softmax' or st.use_log2 is None:
      continue
    use = np.asarray(st.use_log2).reshape(-1)
    only_sqrt2 = st.log2_delta is None and st.logsqrt2_delta is not None
    out[p] = [CHOICES[0] if u < 0.5 else (CHOICES[2] if (u > 1.5 or only_sqrt2) else CHOICES[1]) for u in use]
  return out


# ------------------------------------------------------------------------------- Q-Diffusion's min-max init

def make_minmax_sym(forward: Callable, policy) -> Callable:
  """The compiled Q-Diffusion activation init (`--a_sym`, scale_method 'max'): fn(params, qstate, *data_batch)
  -> {path: (scale [S], zero [S])}. The model runs with hard-rounded quantized weights; every quantized input,
  in call order, gets a per-tensor symmetric signed scale max|x| / (2^(b-1) - 1) from the batch (one per
  segment of a split input; x / r first under TCR) and is quantized with it before the layer runs, so later
  layers see the quantized inputs of earlier ones, as in Q-Diffusion's first forward with uninitialised
  quantizers. Signed codes [-2^(b-1), 2^(b-1) - 1] are stored as unsigned codes with zero point 2^(b-1).
  """
  import flax.linen as nn

  from tcaq_jax.quant.apply import act_fake_quant
  from tcaq_jax.quant.state import LayerQState

  specs = {s.path: s for s in policy.layers.values() if s.acts}

  def sym(x, bits):
    s, _ = params_from_range(jnp.min(x), jnp.max(x), bits, symmetric=True, signed=True)
    return s, jnp.float32(2 ** (bits - 1))

  def run(params, qstate, *d):
    found = {}

    def interceptor(next_fun, args, kwargs, ctx):
      path = '/'.join(ctx.module.path)
      if ctx.method_name != '__call__' or not args or path not in specs or path in found:
        return next_fun(*args, **kwargs)
      spec = specs[path]
      st = qstate.layers.get(path, LayerQState())
      x = act_fake_quant(args[0].astype(jnp.float32), st, spec, 0, quantize=False)     # x / r (TCR)
      segs = [x[..., :spec.split], x[..., spec.split:]] if spec.split else [x]
      sz = [sym(sg, spec.a_bits) for sg in segs]
      scale, zero = jnp.stack([a for a, _ in sz]), jnp.stack([b for _, b in sz])
      found[path] = (scale, zero)
      q = LayerQState(a_scale=scale[None], a_zero=zero[None])     # one slot; r already applied
      xq = act_fake_quant(x, q, spec, jnp.int32(0))
      return next_fun(xq.astype(args[0].dtype), *args[1:], **kwargs)

    qparams = quantize_weights(params, qstate, policy, 'hard')
    with nn.intercept_methods(interceptor):
      forward(qparams, *d)
    return found

  return jax.jit(run)


def init_minmax_sym(fn: Callable, policy, params, qstate, data: Sequence[np.ndarray], slot_ids: np.ndarray,
                    num_slots: int, n_samples: int = 64, seed: int = 0) -> dict:
  """Q-Diffusion's activation init per slot on `n_samples` random calibration samples of the slot (all samples
  when one slot: its `np.random.choice(N, 64, replace=False)`). fn: from `make_minmax_sym`.
  Returns {path: LayerQState(a_scale [K, S], a_zero [K, S])}."""
  from tcaq_jax.quant.state import LayerQState
  per_slot = []
  for _, idx in slot_batches(slot_ids, num_slots, n_samples, seed, 'activation init'):
    per_slot.append(jax.device_get(fn(params, qstate, *[jnp.asarray(np.asarray(a)[idx]) for a in data])))
  out = {}
  for p, spec in policy.layers.items():
    if not spec.acts:
      continue
    if p not in per_slot[0]:
      raise ActSearchError(f'activation init: layer {p!r} was never called in the forward pass')
    scale = np.stack([np.asarray(r[p][0]) for r in per_slot]).astype(np.float32)
    if not np.all(np.isfinite(scale)):
      raise ActSearchError(f'activation init: non-finite scale at layer {p!r}')
    out[p] = LayerQState(a_scale=jnp.asarray(scale),
                         a_zero=jnp.asarray(np.stack([np.asarray(r[p][1]) for r in per_slot]).astype(np.float32)))
  return out
