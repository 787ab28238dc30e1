"""Flax UNets and autoencoders, and conversion of the public PyTorch checkpoints."""


def load(directory: str):
  """Reads a model directory written by `checkpoint.save_model_dir` (e.g. by `models.convert`).

  Returns (model, params, config): the Flax module from `configs.build_model(config)`, params as jnp
  float32 with exactly the model's tree structure (CheckpointError on any missing / extra / misshaped leaf).
  """
  import jax.numpy as jnp
  from flax import traverse_util

  from tcaq_jax import checkpoint
  from tcaq_jax.models import configs
  from tcaq_jax.models.convert import abstract_params

  raw, config = checkpoint.load_model_dir(directory)
  model = configs.build_model(config)
  target = traverse_util.flatten_dict(abstract_params(config, model))
  got = traverse_util.flatten_dict(raw)
  problems = [f'missing {"/".join(p)}' for p in target if p not in got]
  problems += [f'unexpected {"/".join(p)}' for p in got if p not in target]
  problems += [f'{"/".join(p)}: stored {tuple(got[p].shape)}, model expects {tuple(s.shape)}'
               for p, s in target.items() if p in got and tuple(got[p].shape) != tuple(s.shape)]
  if problems:
    raise checkpoint.CheckpointError(f'{directory}: params do not match model {config.get("name")!r}: '
                                     + '; '.join(problems[:40]))
  params = traverse_util.unflatten_dict({p: jnp.asarray(got[p], jnp.float32) for p in target})
  return model, params, config
