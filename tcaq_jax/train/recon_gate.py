"""--recon_gate: reconstruction is kept only where the model's samples gain from it.

Every unit's reconstruction lowers that unit's error (and --keep_best checks it on held-out samples), yet on the
demo at W4A4 the reconstructed models sample worse than their starting point: without TCR, tcaq's initialisation
with the eps bias correction scores digits-FID 15.4 and one reconstruction round makes it worse (fidelity.md,
session 12). So the run scores whole models by what the sampler makes of them: the state before reconstruction
('init') and the state after each round ('round0', 'round1', ...). The score is the mean squared difference of
the final images (decoded for latent models, clipped to [-1, 1]) from the FP model's, both sampled from the same
`--gate_samples` noises (seed --seed + 3), with each candidate's own eps bias correction fitted first
(--eps_bias). The run ends with the lowest-scoring state; with --gate_margin z > 0 a later stage must beat the
one kept before it by more than z standard errors of their paired per-sample difference (on the demo at W4A4 the
gate kept round 2 on leads of 0.5-4% that are within the score's noise, and those models sampled worse FIDs).

  per_sample_errors(q_images, fp_images) -> [n]       each image's squared error against its paired FP image
  score(per_sample) -> float                          their mean (inf if any is not finite)
  best(entries, margin) -> entry                      the stage kept: a later stage replaces an earlier one only if
                                                      its paired per-sample errors are lower by > margin std errors
  save_best(out_dir, qstate, entry) / load_best(out_dir) -> (qstate tree, entry)

The best state so far is written to out_dir/gate_best (an orbax step holding the qstate tree), so a resumed run
still ends with it; report.json's 'gate' lists every stage's score and which one was kept.
"""
from __future__ import annotations

import os

import numpy as np

from tcaq_jax import checkpoint

__all__ = ['SEED_OFFSET', 'BEST_DIR', 'stage_name', 'per_sample_errors', 'score', 'beats', 'best', 'save_best',
           'load_best']

SEED_OFFSET = 3          # the gate's noises: --seed + 3 (capture --seed, grid + 1, eps bias fit + 2)
BEST_DIR = 'gate_best'


def stage_name(rnd: int | None) -> str:
  """'init' (before reconstruction) or 'round<r>' (after round r)."""
  return 'init' if rnd is None else f'round{rnd}'


def per_sample_errors(q_images, fp_images) -> np.ndarray:
  """[n] float64: each sample's mean squared difference from its paired FP sample (same noise). Also the demo
  table's paired MSE (bench/demo_table.py)."""
  q = np.asarray(q_images, np.float64)
  fp = np.asarray(fp_images, np.float64)
  if q.shape != fp.shape:
    raise ValueError(f'paired samples differ in shape: {q.shape} vs FP {fp.shape}')
  return ((q - fp) ** 2).reshape(q.shape[0], -1).mean(axis=1)


def score(per_sample: np.ndarray) -> float:
  """A stage's score from its `per_sample_errors`: their mean (inf when any is not finite)."""
  if not np.all(np.isfinite(per_sample)):
    return float('inf')                     # a diverged candidate never wins
  return float(np.mean(per_sample))


def beats(new: dict, kept: dict, margin: float = 0.0) -> bool:
  """Whether stage `new` replaces the stage kept so far: its score is lower by more than `margin` standard errors
  of the paired per-sample difference (both scored on the same noises; entries' 'per_sample'). margin 0: a lower
  score. A stage that could not be scored (inf) never replaces a finite one and always replaces an unscored one."""
  if not np.isfinite(new['score']):
    return False
  if not np.isfinite(kept['score']):
    return True
  if margin <= 0:
    return new['score'] < kept['score']
  d = np.asarray(new['per_sample'], np.float64) - np.asarray(kept['per_sample'], np.float64)
  se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else 0.0
  return bool(d.mean() + margin * se < 0)


def best(entries: list[dict], margin: float = 0.0) -> dict:
  """The stage kept: walking the stages in order, each replaces the one kept so far only if it `beats` it. With
  margin 0 that is the lowest score (the earliest on ties: less reconstruction for the same result)."""
  if not entries:
    raise ValueError('no gate entries to choose from')
  kept = entries[0]
  for e in entries[1:]:
    if beats(e, kept, margin):
      kept = e
  return kept


def save_best(out_dir: str, qtree: dict, entry: dict) -> None:
  """Writes the best state so far (a `quant.state.to_tree` tree) to out_dir/gate_best, replacing the last."""
  checkpoint.save(os.path.join(out_dir, BEST_DIR), 0, None, qstate=qtree, meta={'gate': entry}, keep=1)


def load_best(out_dir: str) -> tuple[dict, dict]:
  """(qstate tree, its gate entry) from out_dir/gate_best (CheckpointError names the directory)."""
  ck = checkpoint.restore(os.path.join(out_dir, BEST_DIR))
  if ck['qstate'] is None or not ck['meta'] or 'gate' not in ck['meta']:
    raise checkpoint.CheckpointError(f'{os.path.join(out_dir, BEST_DIR)!r} holds no gate state')
  return ck['qstate'], ck['meta']['gate']
