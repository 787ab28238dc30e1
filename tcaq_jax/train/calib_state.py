"""The state a calibration run threads through its stages (`CalibState`) and its checkpoint form.

A run dir's orbax step holds: params (the FP model's; only in the final step, the others find them in
out_dir/fp_model), qstate (`quant.state.to_tree`), meta = {'config': the flat
config, 'model_config', 'policy', 'units', 'progress', 'report', 'ckpt_step'}. `restore_state` refuses a run made
with other flags (those in `config.RESUMABLE` may change).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading

import flax.struct
import jax

from tcaq_jax import checkpoint
from tcaq_jax.quant.state import QState, from_tree, to_tree
from tcaq_jax.quantized import FP_MODEL_DIR
from tcaq_jax.train.config import RESUMABLE, CalibrationError, with_added_later

__all__ = ['FP_MODEL_DIR', 'Progress', 'CalibState', 'Saver', 'save_state', 'restore_state', 'new_report', 'jsonable']


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a run stands: the next unit of round `round`; act_done: this round's activation search is done."""
  round: int = 0
  next_unit: int = 0
  act_done: bool = True
  done: bool = False

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@flax.struct.dataclass
class CalibState:
  """The one state a run threads through its stages and saves after each: the quantizer state (a pytree),
  progress, the report so far and the checkpoint step (static metadata)."""
  qstate: QState
  progress: Progress = flax.struct.field(pytree_node=False, default_factory=Progress)
  report: dict = flax.struct.field(pytree_node=False, default_factory=dict)
  ckpt_step: int = flax.struct.field(pytree_node=False, default=0)


def save_state(setup, state: CalibState) -> None:
  """Atomically writes `state` as checkpoint step state.ckpt_step of out_dir (qstate, meta; params in the final
  step). The FP params are written once per run, to out_dir/fp_model (a model dir, `checkpoint.save_model_dir`),
  instead of into every step: the intermediate steps hold only what changes (for ddim_cifar10 that is 137 MB
  less per unit). The final step (progress.done) holds the params too, so a finished run dir is self-contained."""
  _write(*_prepare(setup, state))


def _prepare(setup, state: CalibState) -> tuple:
  """What one save writes, as host values (so that a background writer shares nothing with the caller); writes
  out_dir/fp_model first when it is missing."""
  out_dir = setup.cfg.out_dir
  fp_dir = os.path.join(out_dir, FP_MODEL_DIR)
  if not state.progress.done and checkpoint.latest_step(fp_dir) is None:
    checkpoint.save_model_dir(fp_dir, setup.params, setup.mconfig, extra={'model_fingerprint': setup.fingerprint},
                              overwrite=True)
  meta = {'config': setup.cfg.to_flat(), 'model_config': setup.mconfig, 'policy': setup.policy.to_dict(),
          'units': [u.to_dict() for u in setup.units], 'progress': state.progress.to_dict(),
          'report': jsonable(state.report), 'ckpt_step': state.ckpt_step, 'model_fingerprint': setup.fingerprint,
          'params_in': 'step' if state.progress.done else FP_MODEL_DIR}
  params = jax.device_get(setup.params) if state.progress.done else None
  return out_dir, state.ckpt_step, params, to_tree(jax.device_get(state.qstate)), jsonable(meta)


def _write(out_dir: str, step: int, params, qtree, meta: dict) -> None:
  checkpoint.save(out_dir, step, params, qstate=qtree, meta=meta)


class Saver:
  """Saves calibration states; with background=True on one writer thread, so the next stage runs while a step is
  written (at most one write in flight: the next `save` or `wait` joins it first and re-raises its error).
  A kill during a write leaves the previous steps intact (orbax writes a step to a temporary dir and renames)."""

  def __init__(self, setup, background: bool = True):
    self.setup, self.background = setup, background
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None

  def save(self, state: CalibState) -> None:
    self.wait()
    job = _prepare(self.setup, state)
    if not self.background:
      _write(*job)
      return

    def work():
      try:
        _write(*job)
      except BaseException as e:  # noqa: BLE001  (re-raised on the caller's thread by wait())
        self._error = e

    self._thread = threading.Thread(target=work, name=f'save-step-{state.ckpt_step}', daemon=False)
    self._thread.start()

  def wait(self) -> None:
    """Joins the write in flight; raises its error (with the run dir named) if it failed."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      err, self._error = self._error, None
      raise CalibrationError(f'saving a checkpoint of {self.setup.cfg.out_dir} failed: {err}') from err


def jsonable(d):
  return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _same_path(a: str, b: str) -> bool:
  return os.path.realpath(os.path.expanduser(a or '')) == os.path.realpath(os.path.expanduser(b or ''))


def _check_compatible(stored: dict, now: dict, out_dir: str) -> None:
  """Raises when a flag that changes results differs from the stored run's; an option added after the run was
  stored counts as the value that reproduces it (config.ADDED_LATER), so e.g. resuming an old run with a new
  option set otherwise is refused too."""
  stored = with_added_later(stored)
  for k, v in now.items():
    if k in RESUMABLE or k not in stored:
      continue
    if k in ('model_dir', 'calib_dir') and _same_path(v, stored[k]):
      continue                       # the same dir written another way (relative / absolute)
    if v != stored[k]:
      raise CalibrationError(f'{out_dir} holds a run with --{k}={stored[k]!r}, now --{k}={v!r}: use another '
                             f'--out_dir (or the same flags) to resume')


def restore_state(setup) -> CalibState | None:
  """The last saved state of out_dir (None when it holds none); refuses a run made with other flags."""
  if checkpoint.latest_step(setup.cfg.out_dir) is None:
    return None
  ck = checkpoint.restore(setup.cfg.out_dir)
  meta = ck['meta'] or {}
  _check_compatible(meta.get('config', {}), setup.cfg.to_flat(), setup.cfg.out_dir)
  stored = meta.get('model_fingerprint')
  if stored is not None and stored != setup.fingerprint:
    raise CalibrationError(f'{setup.cfg.out_dir} was calibrated from other model weights (fingerprint {stored}) '
                           f'than --model_dir={setup.cfg.model_dir!r} holds now ({setup.fingerprint}): use another '
                           '--out_dir, or restore the original model')
  p = meta['progress']
  progress = Progress(p['round'], p['next_unit'], p.get('act_done', True), p.get('done', False))
  return CalibState(from_tree(ck['qstate']), progress, meta['report'], int(meta['ckpt_step']))


def new_report(setup, timings: dict) -> dict:
  cfg = setup.cfg
  return {'model': setup.mconfig.get('name'), 'family': setup.mconfig['family'], 'method': cfg.method,
          'bits': {'w': cfg.w_bits, 'a': cfg.a_bits, 'softmax': cfg.softmax_bits},
          'components': {k: getattr(cfg, k) for k in ('tcr', 'daq', 'par', 'act_per_step', 'learn_act_scale')},
          'policy_summary': setup.policy.summary(), 'preset': cfg.preset,
          'policy_overrides': list(cfg.policy_override), 'num_units': len(setup.units), 'units': [],
          'init_timings': dict(timings), 'iters_scale': cfg.iters_scale,
          'adaround_lr': cfg.adaround_lr}
