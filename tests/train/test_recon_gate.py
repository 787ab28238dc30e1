"""tcaq_jax/train/recon_gate.py: the score, the choice and the stored best state."""
import numpy as np
import pytest

from tcaq_jax import checkpoint
from tcaq_jax.train import recon_gate


def test_per_sample_errors_and_the_score_are_the_per_image_mse_and_its_mean():
  rng = np.random.default_rng(0)
  fp = rng.normal(size=(5, 4, 4, 2)).astype(np.float32)
  q = fp + rng.normal(scale=0.1, size=fp.shape).astype(np.float32)
  want = [np.mean((q[i].astype(np.float64) - fp[i]) ** 2) for i in range(5)]
  np.testing.assert_allclose(recon_gate.per_sample_errors(q, fp), want, rtol=1e-12)
  assert recon_gate.score(recon_gate.per_sample_errors(q, fp)) == pytest.approx(np.mean(want), rel=1e-12)
  assert recon_gate.score(recon_gate.per_sample_errors(fp, fp)) == 0.0
  q[2, 0, 0, 0] = np.nan
  assert recon_gate.score(recon_gate.per_sample_errors(q, fp)) == float('inf')
  with pytest.raises(ValueError, match='shape'):
    recon_gate.per_sample_errors(q[:4], fp)


def test_best_takes_the_lowest_score_and_the_earlier_stage_on_ties():
  e = [{'stage': 'init', 'score': 2.0}, {'stage': 'round0', 'score': 1.0}, {'stage': 'round1', 'score': 1.0}]
  assert recon_gate.best(e)['stage'] == 'round0'
  assert recon_gate.best(e[:1])['stage'] == 'init'
  assert recon_gate.stage_name(None) == 'init' and recon_gate.stage_name(2) == 'round2'
  with pytest.raises(ValueError):
    recon_gate.best([])


def test_best_state_round_trips_and_a_missing_one_is_named(tmp_path):
  tree = {'step_slot': np.arange(4, dtype=np.int32), 'layers': {'a.b': {'w_scale': np.ones((3, 1), np.float32)}}}
  entry = {'stage': 'round0', 'score': 0.5}
  recon_gate.save_best(str(tmp_path), tree, entry)
  recon_gate.save_best(str(tmp_path), dict(tree, step_slot=np.zeros(4, np.int32)), dict(entry, stage='round1'))
  got, got_entry = recon_gate.load_best(str(tmp_path))
  assert got_entry['stage'] == 'round1'                      # the later save replaces the earlier
  np.testing.assert_array_equal(got['step_slot'], np.zeros(4))
  np.testing.assert_array_equal(got['layers']['a.b']['w_scale'], np.ones((3, 1)))
  with pytest.raises(checkpoint.CheckpointError, match='gate_best'):
    recon_gate.load_best(str(tmp_path / 'none'))


def _entry(stage, per_sample):
  return {'stage': stage, 'score': float(np.mean(per_sample)), 'per_sample': list(per_sample)}


def test_margin_asks_a_later_stage_to_beat_the_kept_one_by_its_paired_standard_errors():
  """Differences -0.3, -0.1, -0.2, 0.0: mean -0.15, sample std sqrt(0.05 / 3), so the lead is 2.324 standard
  errors (hand-computed): kept over margin 2, not over 2.5; margin 0 is the plain lower score."""
  kept = _entry('init', [1.0, 1.0, 1.0, 1.0])
  new = _entry('round0', [0.7, 0.9, 0.8, 1.0])
  assert recon_gate.beats(new, kept, 2.0) and not recon_gate.beats(new, kept, 2.5)
  assert recon_gate.beats(new, kept, 0.0) and not recon_gate.beats(kept, new, 0.0)
  # the walk: round0 (2.32 SE ahead of init) is not kept at margin 2.5; round1, far ahead of init, is
  far = _entry('round1', [0.1, 0.2, 0.1, 0.3])
  assert recon_gate.best([kept, new], 2.5)['stage'] == 'init'
  assert recon_gate.best([kept, new, far], 2.5)['stage'] == 'round1'
  assert recon_gate.best([kept, new, far], 0.0)['stage'] == 'round1'
  # unscored stages (inf, no per-sample errors): never kept over a scored one, always replaced by one
  bad = {'stage': 'round2', 'score': float('inf'), 'samples': 0}
  assert recon_gate.best([kept, bad], 2.0)['stage'] == 'init'
  assert recon_gate.best([dict(bad, stage='init'), new], 2.0)['stage'] == 'round0'
