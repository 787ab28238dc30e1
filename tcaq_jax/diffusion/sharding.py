"""Batch sharding over all local devices (Mesh + NamedSharding on the batch axis).

Usage:
  mesh = batch_mesh()                     # 1-D mesh over jax.local_devices(), axis 'batch'
  x = shard_batch(x, mesh)                # leading axis split over devices
  params = replicate(params, mesh)        # a full copy on every device
Batches whose size is not a multiple of the device count are padded by the caller (`pad_to_multiple`).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ['BATCH_AXIS', 'batch_mesh', 'batch_sharding', 'replicated_sharding', 'shard_batch', 'replicate',
           'pad_to_multiple']

BATCH_AXIS = 'batch'


def batch_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all local devices) with axis name 'batch'."""
  devices = jax.local_devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places every array leaf with its leading (batch) axis split over the mesh; the size must divide."""
  n = mesh.devices.size
  for leaf in jax.tree.leaves(tree):
    if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n:
      raise ValueError(f'batch axis of shape {np.shape(leaf)} does not split over {n} devices; '
                       'pad it first (pad_to_multiple)')
  return jax.device_put(tree, batch_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, replicated_sharding(mesh))


def pad_to_multiple(n: int, multiple: int) -> int:
  """The smallest size >= n divisible by `multiple`."""
  return -(-n // multiple) * multiple
