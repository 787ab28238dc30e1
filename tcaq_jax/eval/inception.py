"""The FID Inception-v3 in Flax (NHWC): TF 2015-12-05 weights as ported by pytorch-fid.

Structure: torchvision's Inception3 (1008 classes, no aux head) with pytorch-fid's FID blocks: average pools
in Mixed_5b-d (A), Mixed_6b-e (C) and Mixed_7b (E_1) exclude the zero padding from the count
(count_include_pad=False, as TF does) and Mixed_7c (E_2) max-pools its pool branch. Every conv is torchvision's
BasicConv2d: conv without bias, BatchNorm (inference statistics, eps 1e-3), ReLU.

Parameter paths mirror the PyTorch keys: `Mixed_6d.branch1x1.conv.weight` -> `Mixed_6d/branch1x1/conv/kernel`
(OIHW -> HWIO); `...bn.{weight,bias,running_mean,running_var}` -> `.../bn/{scale,bias,mean,var}` (all in the
'params' collection; BatchNorm is folded into the conv at apply time); `fc.weight` [1008, 2048] ->
`fc/kernel` [2048, 1008].

Outputs of `features(params, images)` (images uint8 [B, H, W, 3], any size):
  'pool3'  : [B, 2048]  global average pool after Mixed_7c (TF `pool_3:0`; FID, precision/recall)
  'spatial': [B, 2023]  the first 7 channels of the 17x17 map TF calls `mixed_6/conv:0`, flattened in
                        (h, w, c) order (sFID, as guided-diffusion's evaluator). In the TF graph the blocks are
                        mixed (=Mixed_5b) ... mixed_10 (=Mixed_7c), so mixed_6 = Mixed_6d, and `mixed_6/conv` is
                        its 1x1 branch (torch-fidelity's TF->PyTorch weight map lists
                        "mixed_6/conv/conv2d_params" -> "Mixed_6d.branch1x1.conv"); the tensor `mixed_6/conv:0` is
                        the output of that layer after BatchNorm and ReLU (its Conv2D and batchnorm ops are named
                        `mixed_6/conv/Conv2D`, `mixed_6/conv/batchnorm`). So: Mixed_6d.branch1x1 output[..., :7].
  'logits' : [B, 1008]  fc(pool3) (TF `softmax/logits`; Inception Score)
Preprocessing as pytorch-fid: x/255, bilinear resize to 299x299 (align_corners=False, no antialias; PyTorch's
F.interpolate semantics, implemented as two interpolation matrices), then 2x - 1. (The TF evaluators resize with
TF1's legacy bilinear, which samples without the half-pixel offset; numbers are comparable to pytorch-fid's.)

Converter:  python -m tcaq_jax.eval.inception --weights pt_inception-2015-12-05-6726825d.pth --out DIR
            (--overwrite replaces a model already in DIR; errors are one line, --debug for the traceback)
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = ['InceptionError', 'FIDInceptionV3', 'init_params', 'convert_state_dict', 'load', 'save', 'features',
           'preprocess', 'resize_matrix', 'convert', 'NUM_CLASSES', 'SPATIAL_CHANNELS']

NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
INPUT_SIZE = 299
BN_EPS = 1e-3


class InceptionError(ValueError):
  """A weight file or parameter tree does not match the FID Inception (names the key / file)."""


def _pad(p):
  ph, pw = (p, p) if isinstance(p, int) else p
  return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm (inference, eps 1e-3, folded into the conv) -> ReLU.  x: [B, H, W, Cin]."""
  features: int
  kernel_size: Sequence[int]
  strides: int = 1
  padding: Any = 0
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    conv = ConvParams(kh, kw, cin, self.features, name='conv')()
    scale, bias, mean, var = BNParams(self.features, name='bn')()
    inv = scale * jax.lax.rsqrt(var + BN_EPS)
    kernel = conv * inv
    y = jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides), _pad(self.padding),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    return nn.relu(y + (bias - mean * inv))


class ConvParams(nn.Module):
  kh: int
  kw: int
  cin: int
  cout: int

  @nn.compact
  def __call__(self):
    return self.param('kernel', nn.initializers.lecun_normal(), (self.kh, self.kw, self.cin, self.cout))


class BNParams(nn.Module):
  c: int

  @nn.compact
  def __call__(self):
    return (self.param('scale', nn.initializers.ones, (self.c,)),
            self.param('bias', nn.initializers.zeros, (self.c,)),
            self.param('mean', nn.initializers.zeros, (self.c,)),
            self.param('var', nn.initializers.ones, (self.c,)))


def _avg_pool_same(x):
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """Mixed_5b/c/d (FIDInceptionA).  x: [B, 35, 35, C] -> [B, 35, 35, 224 + pool_features]."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv2d, precision=self.precision)
    b1 = c(64, (1, 1), name='branch1x1')(x)
    b5 = c(48, (1, 1), name='branch5x5_1')(x)
    b5 = c(64, (5, 5), padding=2, name='branch5x5_2')(b5)
    b3 = c(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = c(96, (3, 3), padding=1, name='branch3x3dbl_2')(b3)
    b3 = c(96, (3, 3), padding=1, name='branch3x3dbl_3')(b3)
    bp = c(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a.  x: [B, 35, 35, 288] -> [B, 17, 17, 768]."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv2d, precision=self.precision)
    b3 = c(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = c(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = c(96, (3, 3), padding=1, name='branch3x3dbl_2')(bd)
    bd = c(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b/c/d/e (FIDInceptionC).  x: [B, 17, 17, 768] -> ([B, 17, 17, 768], branch1x1 [B, 17, 17, 192])."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = c(192, (1, 1), name='branch1x1')(x)
    b7 = c(c7, (1, 1), name='branch7x7_1')(x)
    b7 = c(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = c(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = c(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = c(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = c(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = c(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = c(192, (1, 1), name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """Mixed_7a.  x: [B, 17, 17, 768] -> [B, 8, 8, 1280]."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv2d, precision=self.precision)
    b3 = c(192, (1, 1), name='branch3x3_1')(x)
    b3 = c(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = c(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = c(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = c(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, avg pool) / Mixed_7c (FIDInceptionE_2, max pool).  -> [B, 8, 8, 2048]."""
  max_pool: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv2d, precision=self.precision)
    b1 = c(320, (1, 1), name='branch1x1')(x)
    b3 = c(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          c(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = c(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = c(384, (3, 3), padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          c(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    pooled = _max_pool_same(x) if self.max_pool else _avg_pool_same(x)
    bp = c(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """x: float [B, 299, 299, 3] in [-1, 1] -> {'pool3': [B, 2048], 'spatial': [B, 17*17*7], 'logits': [B, 1008]}."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    p = self.precision
    c = functools.partial(BasicConv2d, precision=p)
    x = c(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = c(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = c(64, (3, 3), padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_s2(x)
    x = c(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = c(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_s2(x)
    x = InceptionA(32, p, name='Mixed_5b')(x)
    x = InceptionA(64, p, name='Mixed_5c')(x)
    x = InceptionA(64, p, name='Mixed_5d')(x)
    x = InceptionB(p, name='Mixed_6a')(x)
    x, _ = InceptionC(128, p, name='Mixed_6b')(x)
    x, _ = InceptionC(160, p, name='Mixed_6c')(x)
    x, mixed_6_conv = InceptionC(160, p, name='Mixed_6d')(x)
    x, _ = InceptionC(192, p, name='Mixed_6e')(x)
    x = InceptionD(p, name='Mixed_7a')(x)
    x = InceptionE(False, p, name='Mixed_7b')(x)
    x = InceptionE(True, p, name='Mixed_7c')(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=p, name='fc')(pool3)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS]
    return {'pool3': pool3, 'spatial': spatial.reshape(spatial.shape[0], -1), 'logits': logits}


# ----------------------------------------------------------------------------------------------- preprocessing

def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float32 matrix of PyTorch's 1-D bilinear interpolation (align_corners=False, no antialias)."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
  np.add.at(m, (np.arange(out_size), i1), lam)
  return m.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
  """images: uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 1] (pytorch-fid's order: /255, resize, 2x-1)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise InceptionError(f'FID Inception expects uint8 images [B, H, W, 3], got shape {images.shape}')
  x = images.astype(jnp.float32) / 255.0
  _, h, w, _ = x.shape
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum('oh,bhwc->bowc', resize_matrix(h, INPUT_SIZE), x, precision=hi)
    x = jnp.einsum('pw,bowc->bopc', resize_matrix(w, INPUT_SIZE), x, precision=hi)
  return 2.0 * x - 1.0


@functools.partial(jax.jit, static_argnames='precision')
def features(params: Any, images: jax.Array, precision: Any = jax.lax.Precision.HIGHEST) -> dict:
  """images: uint8 [B, H, W, 3] (any H, W) -> {'pool3': [B, 2048], 'spatial': [B, 2023], 'logits': [B, 1008]}.

  `precision` is the conv/matmul precision ('highest' = true float32; DEFAULT lets GPUs use TF32).
  """
  return FIDInceptionV3(precision=precision).apply({'params': params}, preprocess(images))


def init_params(seed: int = 0) -> Any:
  """Random parameters with the FID Inception's structure (for tests and benchmarks)."""
  return _init(jax.random.PRNGKey(seed))


@jax.jit
def _init(key):
  x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return FIDInceptionV3().init(key, x)['params']


# ----------------------------------------------------------------------------------------------- weights
# The converter and the model-dir reader live in inception_weights.py; `inception.load` etc. resolve there
# lazily (a module-level import would be circular when this file runs as `python -m tcaq_jax.eval.inception`).
_WEIGHTS_API = ('convert', 'convert_state_dict', 'load', 'save')


def __getattr__(name):
  if name in _WEIGHTS_API:
    from tcaq_jax.eval import inception_weights
    return getattr(inception_weights, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


if __name__ == '__main__':
  # Run the imported converter, not a __main__ copy: its error classes live in tcaq_jax, so cli.run prints them
  # as one line.
  from tcaq_jax import cli
  from tcaq_jax.eval import inception_weights as _weights
  _weights.define_flags()
  cli.run(_weights.main)
