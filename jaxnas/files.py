"""Files a run writes, each replaced whole: written under a temporary name beside it,
flushed to disk, then renamed over it, so a reader, or a run killed mid-write, finds the
old file or the new one and never a part of one. In a multi-process run only process 0
writes (the others hold the same values)."""

import glob
import io
import json
import os

import jax
from jax._src import xla_bridge  # backends_are_initialized: no public form
import numpy as np


def is_writer() -> bool:
  """Whether this process writes files: in a multi-process run process 0 alone. Asking
  starts no JAX backend (a script that plots a run's files must not take a GPU)."""
  if not (jax.distributed.is_initialized() or xla_bridge.backends_are_initialized()):
    return True
  return jax.process_index() == 0


def _replace(path, data: bytes) -> str:
  path = os.fspath(path)
  if not is_writer():
    return path
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  for stale in glob.glob(glob.escape(path) + '.tmp*'):  # left by a killed run
    os.remove(stale)
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_bytes(path, data: bytes) -> str:
  """Writes ``data`` to ``path`` (replaced whole); returns the path."""
  return _replace(path, data)


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
