"""Flax UNets and autoencoders, and conversion of the public PyTorch checkpoints. Family-specific helpers
(loading a model dir, example inputs, eps / decode functions): `tcaq_jax.models.family`."""


def load(directory: str):
  """Reads a model directory written by `checkpoint.save_model_dir` (e.g. by `models.convert`).

  Returns (model, params, config): the Flax module from `configs.build_model(config)`, params as jnp
  float32 with exactly the model's tree structure (CheckpointError on any missing / extra / misshaped leaf).
  Same as `tcaq_jax.models.family.load`.
  """
  from tcaq_jax.models import family
  return family.load(directory)
