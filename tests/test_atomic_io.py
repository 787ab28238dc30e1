"""Atomic writes (`tcaq_jax.atomic_io`): the target holds the old file or the new one, never a part."""
import json
import os

import numpy as np
import pytest

from tcaq_jax import atomic_io


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / 'r.json')
  atomic_io.write_json(path, {'a': 1}, indent=1)
  atomic_io.write_json(path, {'b': [1, 2]}, fsync=True, sort_keys=True)
  with open(path) as f:
    assert json.load(f) == {'b': [1, 2]}
  assert os.listdir(tmp_path) == ['r.json']


def test_a_failed_write_keeps_the_old_file(tmp_path):
  path = str(tmp_path / 'r.json')
  atomic_io.write_json(path, {'a': 1})
  with pytest.raises(TypeError):
    atomic_io.write_json(path, {'a': np.float32})          # not serializable: fails before anything is written
  with pytest.raises(TypeError):
    atomic_io.write_text(path, b'bytes')                    # fails inside the write: the temporary is removed
  with open(path) as f:
    assert json.load(f) == {'a': 1}
  assert os.listdir(tmp_path) == ['r.json']
