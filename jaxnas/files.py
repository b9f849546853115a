"""Files a run writes, each replaced whole: written under a temporary name beside it, then
renamed over it, so a reader, or a run killed mid-write, finds the old file or the new
one and never a part of one."""

import io
import json
import os

import numpy as np


def _replace(path, data: bytes) -> str:
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_text(path, text: str) -> str:
  """Writes ``text`` to ``path`` (replaced whole); returns the path."""
  return _replace(path, text.encode())


def write_json(path, obj, indent: int = 2, **kwargs) -> str:
  """Writes ``obj`` as JSON to ``path`` (replaced whole; serialized first, so an object
  that cannot be written leaves the old file as it was); returns the path."""
  return write_text(path, json.dumps(obj, indent=indent, **kwargs) + '\n')


def write_npz(path, **arrays) -> str:
  """``np.savez`` of ``arrays`` to ``path`` (replaced whole); returns the path."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return _replace(path, buffer.getvalue())


def write_image(path, image, format: str = 'PNG') -> str:  # pylint: disable=redefined-builtin
  """A Pillow image saved to ``path`` (replaced whole); returns the path."""
  buffer = io.BytesIO()
  image.save(buffer, format=format)
  return _replace(path, buffer.getvalue())
