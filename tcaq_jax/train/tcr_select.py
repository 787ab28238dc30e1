"""TCR per layer, only where it helps (`--tcr_select=error`, tcaq's default; issue 14 part 2).

The paper applies one TCR ratio r per input channel to every conv (and linear) layer. Measured on the demo at
W6A6, that makes some layers worse (some channel at some step gets a much coarser activation step; the time
embedding's ratios reach thousands on inputs that depend only on t). Here every TCR layer chooses, among the
tempered ratios r^a for a in `--tcr_exponents` (0 = no TCR, 1 = the paper's r; after the R_tru truncation), the
one with the lowest *quantized output error of that layer* on calibration data:

  err_a = sum over calibration slots k of mean((conv(Q_a(x / r^a), Q_w(W diag(r^a))) - conv(x, W))^2)

x: the layer's FP input on the slot's activation-search batch (the same samples `act_search` uses); Q_a: the
percentile-searched uniform activation quantizer of x / r^a for that slot (`act_search.search_uniform` with the
activation search's criterion, one per segment of a split input); Q_w: the layer's initial weight quantizer for W diag(r^a) (`init.init_weights`, round
to nearest). Ties keep the smaller exponent (a = 0 first). Layers whose input depends only on t (the time
embedding) take part like every other layer: they keep TCR only when it lowers their error.
`--tcr_select=all` is the paper: every layer takes r (exponent 1).

  fn = make_select(forward, policy, paths, pcts)                     # compiled once
  errors = layer_errors(fn, base_ratios, weight_states, exponents, data, slot_ids, num_slots, batch, seed, params)
  chosen = choose(errors, exponents)                                 # {path: exponent}
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tcaq_jax.quant.intercept import collect_calls
from tcaq_jax.quant.tcr import scale_activation, scale_kernel_inputs
from tcaq_jax.quant.uniform import fake_quant
from tcaq_jax.train.act_search import DEFAULT_PCTS, layer_output, output_score, search_uniform, slot_batches

__all__ = ['make_select', 'layer_errors', 'choose', 'tempered']


def tempered(ratios: dict, exponent: float) -> dict:
  """{path: r ** exponent} (exponent 0: all ones, 1: r itself)."""
  return {p: jnp.asarray(r, jnp.float32) ** jnp.float32(exponent) for p, r in ratios.items()}


def make_select(forward: Callable, policy, paths: Sequence[str], pcts: Sequence[float] = DEFAULT_PCTS,
                criterion: str = 'input', ends: str = 'paired') -> Callable:
  """The compiled per-slot error: fn(consts, ratios {path: [A, C]}, wq {path: (scale [A, ..], zero [A, ..]) or
  None}, key, *data_batch) -> {path: {'err': [A] mean squared output error of the layer per candidate,
  'power': mean squared FP output}}.

  forward(consts, *data) runs the FP model; `paths` are the conv / dense layers that may take TCR. wq[path] None:
  the layer's weights stay FP in the measure. criterion, ends: the activation search's (see
  `act_search.make_search`), so that each candidate's activation quantizer is the one the search would pick."""
  specs = {p: policy.layers[p] for p in paths}
  pcts = tuple(float(p) for p in pcts)

  def errors(ratios, wq, key, call):
    spec = specs[call.path]
    x = call.args[0].astype(jnp.float32)
    kernel = call.module.variables['params']['kernel'].astype(jnp.float32)
    ref = call.output.astype(jnp.float32)
    r_all = ratios[call.path]
    bounds = [(0, spec.split), (spec.split, x.shape[-1])] if spec.split else [(0, x.shape[-1])]
    out = []
    for a in range(r_all.shape[0]):
      r = r_all[a]
      xa, wa = scale_activation(x, r), scale_kernel_inputs(kernel, r)
      k = jax.random.fold_in(jax.random.fold_in(key, call.index), a)
      qs = []
      for i, (lo, hi) in enumerate(bounds):
        score = None if criterion == 'input' else output_score(call, wa, xa, (lo, hi) if spec.split else None)
        s, z = search_uniform(xa[..., lo:hi], spec.a_bits, pcts, jax.random.fold_in(k, i), symmetric=False,
                              score=score, ends=ends)
        qs.append(fake_quant(xa[..., lo:hi], s, z, spec.a_bits))
      xq = jnp.concatenate(qs, axis=-1) if len(qs) > 1 else qs[0]
      if wq[call.path] is not None:
        ws, wz = wq[call.path]
        wa = fake_quant(wa, ws[a], wz[a], spec.w_bits)
      out.append(jnp.mean((layer_output(call, xq, wa) - ref) ** 2))
    return {'err': jnp.stack(out), 'power': jnp.mean(ref ** 2)}

  def run(consts, ratios, wq, key, *d):
    return collect_calls(lambda: forward(consts, *d), select=lambda path, m: path in specs,
                         record=functools.partial(errors, ratios, wq, key), need_args=True)[1]

  return jax.jit(run)


def layer_errors(fn: Callable, base_ratios: dict, weight_states: Sequence[dict], exponents: Sequence[float],
                 data: Sequence[np.ndarray], slot_ids: np.ndarray, num_slots: int, batch: int, seed: int,
                 consts: Any, relative: bool = False) -> dict:
  """{path: [A] float64} errors summed over slots (relative: each slot's error divided by the mean squared FP
  output of that slot, so that every step counts alike). weight_states[a]: {path: LayerQState} from
  `init_weights` with the ratios r^exponents[a] (w_scale / w_zero read; layers without w_scale stay FP)."""
  paths = list(base_ratios)
  per_exp = [tempered(base_ratios, e) for e in exponents]
  ratios = {p: jnp.stack([r[p] for r in per_exp]) for p in paths}
  wq = {}
  for p in paths:
    sts = [ws[p] for ws in weight_states]
    wq[p] = (None if sts[0].w_scale is None else
             (jnp.stack([st.w_scale for st in sts]), jnp.stack([st.w_zero for st in sts])))
  total = {p: np.zeros(len(exponents)) for p in paths}
  for k, idx in slot_batches(slot_ids, num_slots, batch, seed, 'TCR selection'):
    res = jax.device_get(fn(consts, ratios, wq, jax.random.PRNGKey(seed * 7919 + k),
                            *[jnp.asarray(np.asarray(a)[idx]) for a in data]))
    for p in paths:
      err = np.asarray(res[p]['err'], np.float64)
      total[p] += err / max(float(res[p]['power']), 1e-30) if relative else err
  bad = [p for p, e in total.items() if not np.all(np.isfinite(e))]
  if bad:
    raise ValueError(f'TCR selection: non-finite output error at layer {bad[0]!r}')
  return total


def choose(errors: dict, exponents: Sequence[float]) -> dict:
  """{path: chosen exponent}: the lowest error, ties to the earlier (smaller) exponent."""
  order = np.argsort(np.asarray(exponents, np.float64), kind='stable')
  out = {}
  for p, e in errors.items():
    e = np.asarray(e)[order]
    out[p] = float(np.asarray(exponents, np.float64)[order][int(np.argmin(e))])
  return out
