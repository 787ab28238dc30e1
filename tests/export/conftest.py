"""Shared fixtures of the export tests: the tiny test model (random weights drawn without compiling an init)
and the shipped demo UNet, quantized with `tcaq_jax.export.synthetic` (calibration-shaped state in seconds; a
real calibration run takes minutes on CI's CPUs) and exported once per session at W8A8 and W4A8."""
import pytest

from tcaq_jax.assets import DEMO_UNET_DIR
from tcaq_jax.export import export_quantized, load_exported
from tcaq_jax.export.synthetic import random_params, synthetic_quantized
from tcaq_jax.models import configs, family


def tiny_model(seed=0):
  """(model, params, config) of ddim_tiny with random weights (`random_params`: no compiled init)."""
  config = configs.get_config('ddim_tiny')
  model = configs.build_model(config)
  return model, random_params(config, seed, model), config


@pytest.fixture(scope='session')
def models():
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = tiny_model() if name == 'tiny' else family.load(DEMO_UNET_DIR)
    return cache[name]
  return get


# Both bit widths in each model (one compiled forward per model, CI has 2 CPUs): the tiny model at W8A8 with
# its up path at W4A8 (the concat shortcuts' weight quantizer split in two, Q-Diffusion's w_split), the demo at
# W4A8 with its up path at W8A8 (one weight quantizer per shortcut). The tiny model's post-Softmax points hold the
# three-way DAQ state (both log deltas; log2 / log-sqrt2 / uniform over its 3 slots), the demo's log2 / uniform.
SETTINGS = {'tiny': dict(w_bits=8, overrides=('^up_:w4a8',), w_split=True, num_slots=3, daq='three_way'),
            'demo': dict(w_bits=4, overrides=('^up_:w8a8',), w_split=False)}


@pytest.fixture(scope='session')
def exported(models, tmp_path_factory):
  """exported(name) -> (QuantizedModel, ExportedModel, dir), 4 sampler steps over 2 or 3 calibration slots."""
  cache = {}

  def get(name):
    if name not in cache:
      model, params, config = models(name)
      q = synthetic_quantized(model, params, config, a_bits=8, num_steps=4, **SETTINGS[name])
      out = str(tmp_path_factory.mktemp('export') / name)
      export_quantized(q, out, source='synthetic')
      cache[name] = (q, load_exported(out), out)
    return cache[name]
  return get
