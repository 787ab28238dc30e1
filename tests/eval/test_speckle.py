"""tcaq_jax.eval.speckle (a scipy.ndimage 3x3 median) against closed forms and a sorting reference."""
import numpy as np
import pytest

from tcaq_jax.eval import speckle


def _flat(n=2, h=8, w=10, c=1, value=-1.0):
  return np.full((n, h, w, c), value, np.float32)


def test_constant_images_have_no_speckle():
  x = _flat(value=0.3)
  np.testing.assert_array_equal(speckle.isolated_residual(x), 0.0)
  assert speckle.speckle_energy(x) == 0.0
  assert speckle.speckle_share(x) == 0.0


@pytest.mark.parametrize('pos', [(0, 0), (0, 4), (3, 9), (7, 9), (4, 5)])     # corner, edges, interior
@pytest.mark.parametrize('height', [1.7, -0.6])
def test_one_isolated_pixel_keeps_its_height(pos, height):
  h, w = 8, 10
  x = _flat(n=1, h=h, w=w)
  x[0, pos[0], pos[1], 0] += height
  r = speckle.isolated_residual(x)
  want = np.zeros_like(r)
  want[0, pos[0], pos[1], 0] = height
  np.testing.assert_allclose(r, want, atol=1e-6)
  assert speckle.speckle_energy(x) == pytest.approx(height ** 2 / (h * w), rel=1e-6)
  assert speckle.speckle_share(x, threshold=0.5) == pytest.approx(1 / (h * w))
  assert speckle.speckle_share(x, threshold=2.0) == 0.0


def test_energy_is_the_mean_over_images_and_channels():
  x = _flat(n=2, h=4, w=4, c=2)
  x[0, 1, 1, 0] += 2.0                        # image 0, channel 0 only
  assert speckle.speckle_energy(x) == pytest.approx(4.0 / (4 * 4 * 2) / 2)


def _median3_loops(x):
  """Reference: per pixel, the 5th of the 9 sorted window values, indices clamped to the image (edge border)."""
  n, h, w, c = x.shape
  out = np.empty_like(x)
  for b in range(n):
    for i in range(h):
      for j in range(w):
        for k in range(c):
          win = sorted(x[b, min(max(i + di, 0), h - 1), min(max(j + dj, 0), w - 1), k]
                       for di in (-1, 0, 1) for dj in (-1, 0, 1))
          out[b, i, j, k] = win[4]
  return out


def test_median_matches_a_sorting_reference_on_random_images():
  rng = np.random.default_rng(0)
  for x in (rng.uniform(-1, 1, (3, 7, 9, 2)), rng.integers(-2, 3, (2, 5, 6, 1)).astype(np.float64),
            rng.normal(size=(1, 1, 4, 1)), rng.normal(size=(2, 16, 16, 1))):
    ref = _median3_loops(x)
    np.testing.assert_allclose(speckle.median3(x), ref, atol=1e-12)
    np.testing.assert_allclose(speckle.isolated_residual(x), x - ref, atol=1e-12)


def test_smooth_gradient_vs_salt_noise():
  yy, xx = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16), indexing='ij')
  smooth = np.broadcast_to((0.5 * (xx + yy))[None, :, :, None], (4, 16, 16, 1)).copy()
  salty = smooth.copy()
  rng = np.random.default_rng(1)
  for n in range(4):                                        # 5 isolated salt pixels per image (2%)
    idx = rng.choice(16 * 16, 5, replace=False)
    salty[n, idx // 16, idx % 16, 0] = 1.0
  e_smooth, e_salty = speckle.speckle_energy(smooth), speckle.speckle_energy(salty)
  assert e_smooth < 1e-3
  assert e_salty > 30 * e_smooth
  assert speckle.speckle_share(smooth) == 0.0
  assert speckle.speckle_share(salty) > 0.01
  assert speckle.speckle_ratio(salty, smooth) == pytest.approx(e_salty / e_smooth)


def test_ratio_of_identical_sets_is_one():
  x = np.random.default_rng(2).uniform(-1, 1, (5, 16, 16, 1)).astype(np.float32)
  assert speckle.speckle_ratio(x, x) == pytest.approx(1.0)
  assert speckle.speckle_ratio(x[:2], x) == pytest.approx(speckle.speckle_energy(x[:2]) / speckle.speckle_energy(x))


@pytest.mark.parametrize('bad, match', [
    (np.zeros((4, 4, 1)), r'\[N, H, W, C\]'),
    (np.zeros((0, 4, 4, 1)), 'empty'),
    (np.full((1, 4, 4, 1), np.nan), 'non-finite'),
    (np.array([[[[np.inf]]]]), 'non-finite'),
    (np.array([[[['a']]]]), 'real numbers'),
])
def test_bad_images_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    speckle.speckle_energy(bad)


def test_ratio_refuses_mismatched_sizes_and_flat_fp():
  x = np.random.default_rng(3).uniform(-1, 1, (2, 8, 8, 1))
  with pytest.raises(ValueError, match='same'):
    speckle.speckle_ratio(x, x[:, :4])
  with pytest.raises(ValueError, match='zero speckle energy'):
    speckle.speckle_ratio(x, _flat(h=8, w=8))
  with pytest.raises(ValueError, match='fp_images'):
    speckle.speckle_ratio(x, np.zeros((8, 8)))
  with pytest.raises(ValueError, match='threshold'):
    speckle.speckle_share(x, threshold=-1.0)
