"""Atomic file writes: the text goes to a temporary file beside the target (named for this process, so two
processes writing the same file do not share one) and replaces the target in one `os.replace`. A reader sees the
old file or the new one, never half of one; an interrupted write leaves the old file (and at worst a stray
`*.tmp`)."""
from __future__ import annotations

import json
import os
from typing import Any


def write_text(path: str, text: str, fsync: bool = False) -> None:
  """Writes `text` to `path` atomically (fsync: flush it to disk before the rename, for manifests)."""
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any, fsync: bool = False, **dump_kw) -> None:
  """json.dumps(obj, **dump_kw) written atomically to `path` (with a final newline)."""
  write_text(path, json.dumps(obj, **dump_kw) + '\n', fsync=fsync)
