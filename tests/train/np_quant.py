"""Float64 NumPy references of the asymmetric uniform quantizer, shared by the activation search tests."""
import numpy as np


def fq(x, s, z, bits):
  """Fake quantization with scale s and zero point z (codes 0 .. 2^bits - 1)."""
  return (np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


def params(lo, hi, bits):
  """(scale, zero point) covering [min(lo, 0), max(hi, 0)]."""
  lo, hi = min(lo, 0.), max(hi, 0.)
  s = (hi - lo) / (2 ** bits - 1)
  return s, np.clip(-np.round(lo / s), 0, 2 ** bits - 1)
