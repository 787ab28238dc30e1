"""Sampling class-conditional models with eval.sample (tcaq_jax/eval/sample.py): --class_labels (random with the
sample seed, or a comma list cycled over the samples), --guidance_scale, for a float model dir and for an
exported integer model of the tiny class-conditional LDM (ldm_tiny_cin, random weights; synthetic W8A8 state on
the middle block: a SpatialTransformer whose self- and cross-attention matmuls run on integers); the labels are
written as the .npz's arr_1."""
import types

import numpy as np
import pytest

from tcaq_jax import checkpoint
from tcaq_jax.eval.sample import SampleError, class_labels, sample_main
from tcaq_jax.export import export_quantized
from tcaq_jax.export.synthetic import random_params, synthetic_quantized
from tcaq_jax.models import configs

N = 2


@pytest.fixture(scope='module')
def cin(tmp_path_factory):
  """(config, model dir, exported dir) of ldm_tiny_cin."""
  root = tmp_path_factory.mktemp('cin')
  config = configs.get_config('ldm_tiny_cin')
  model = configs.build_model(config)
  params = random_params(config, seed=5, model=model)
  checkpoint.save_model_dir(str(root / 'model'), params, config)
  q = synthetic_quantized(model, params, config, a_bits=8, num_steps=3, num_slots=2,
                          overrides=('.*:fp', '^diffusion_model/middle_block_1/:w8a8'))
  export_quantized(q, str(root / 'export'), source='synthetic')
  return config, str(root / 'model'), str(root / 'export')


def _flags(out_dir, **kw):
  values = dict(model_dir=None, quant_dir=None, backend=None, num_samples=N, batch_size=N, steps=None,
                skip_type=None, eta=None, seed=7, out_dir=str(out_dir), overwrite=True, class_labels='random',
                guidance_scale=None, sampler_loop='host')
  values.update(kw)
  return types.SimpleNamespace(**values)


def _read(out_dir):
  with np.load(f'{out_dir}/samples_{N}x16x16x3.npz') as z:
    return z['arr_0'], z['arr_1']


def test_class_labels_random_list_and_refusals():
  config = configs.get_config('ldm_tiny_cin')
  cond, uncond = class_labels(config, 500, seed=1)
  assert cond.dtype == np.int32 and cond.shape == (500,) and 0 <= cond.min() and cond.max() < 1000
  assert len(np.unique(cond)) > 300 and np.all(uncond == 1000)            # uniform over 1000 classes; null 1000
  np.testing.assert_array_equal(class_labels(config, 500, seed=1)[0], cond)
  assert not np.array_equal(class_labels(config, 500, seed=2)[0], cond)
  cond, uncond = class_labels(config, 5, seed=1, spec='3, 999')
  assert cond.tolist() == [3, 999, 3, 999, 3] and uncond.tolist() == [1000] * 5
  for bad in ('1000', '-1', 'cat'):
    with pytest.raises(SampleError, match='class_labels'):
      class_labels(config, 5, 0, bad)
  assert class_labels(configs.get_config('ddim_tiny'), 5, 0) == (None, None)
  with pytest.raises(SampleError, match='not class-conditional'):
    class_labels(configs.get_config('ddim_tiny'), 5, 0, '1,2')


def test_fp_and_exported_class_conditional_ldm_sample(cin, tmp_path):
  config, model_dir, export_dir = cin
  sample_main(_flags(tmp_path / 'fp', model_dir=model_dir, steps=3, class_labels='1,2', guidance_scale=3.0))
  fp, labels = _read(tmp_path / 'fp')
  assert fp.shape == (N, 16, 16, 3) and fp.dtype == np.uint8 and labels.tolist() == [1, 2]
  sample_main(_flags(tmp_path / 'int', quant_dir=export_dir, backend='int'))
  images, labels = _read(tmp_path / 'int')
  np.testing.assert_array_equal(labels, class_labels(config, N, 7)[0])        # random with the sample seed
  assert images.shape == (N, 16, 16, 3) and images.std() > 0
  with pytest.raises(SampleError, match='not class-conditional'):
    sample_main(_flags(tmp_path / 'x', guidance_scale=2.0))                   # the demo UNet
