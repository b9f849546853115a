"""Reader for IDX files (the MNIST / Fashion-MNIST format), gzipped or plain.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian int32 per dimension, then the data in C order.
"""

import gzip
import os
import zlib

import numpy as np

_UBYTE = 0x08
_GZIP_MAGIC = b'\x1f\x8b'


class DataFileError(ValueError):
  """A data file exists but cannot be read (corrupt, truncated, wrong format)."""


def find_idx_file(directory, stem):
  """Returns the path of `stem` or `stem.gz` in `directory`, or None."""
  for name in (stem, stem + '.gz'):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def _open(path):
  with open(path, 'rb') as f:
    gzipped = f.read(2) == _GZIP_MAGIC
  return gzip.open(path, 'rb') if gzipped else open(path, 'rb')


def _read_header(f, path, ndim):
  header = f.read(4)
  expected = (_UBYTE << 8) | ndim
  if len(header) < 4:
    raise DataFileError(f'IDX file {path} is truncated: it ends inside the '
                        'magic number; delete it and download it again.')
  magic = int.from_bytes(header, 'big')
  if magic != expected:
    raise DataFileError(
        f'IDX file {path} has magic number 0x{magic:08x} where a {ndim}-d '
        f'unsigned-byte IDX file has 0x{expected:08x}; the file is corrupt or '
        'not an IDX file, so delete it and download it again.')
  dims = f.read(4 * ndim)
  if len(dims) < 4 * ndim:
    raise DataFileError(f'IDX file {path} is truncated inside its header; '
                        'delete it and download it again.')
  return tuple(int(d) for d in np.frombuffer(dims, dtype='>i4'))


def read_idx_shape(path, ndim):
  """Reads only the header of an IDX file; returns its shape."""
  try:
    with _open(path) as f:
      return _read_header(f, path, ndim)
  except (OSError, EOFError, zlib.error) as e:
    raise DataFileError(f'IDX file {path} cannot be read ({e}); delete it '
                        'and download it again.') from e


def read_idx(path, ndim, max_items=None):
  """Reads an unsigned-byte IDX file into a uint8 array.

  Args:
    path: the file, gzipped or not (detected from its first bytes).
    ndim: the number of dimensions the file must have (3 images, 1 labels).
    max_items: read only the first `max_items` entries of the first axis.

  Returns:
    A uint8 array of the file's shape (first axis cut to `max_items`).

  Raises:
    DataFileError: bad magic number, truncated or undecompressable file.
  """
  try:
    with _open(path) as f:
      shape = _read_header(f, path, ndim)
      if max_items is not None:
        shape = (min(shape[0], max_items),) + shape[1:]
      size = int(np.prod(shape))
      data = f.read(size)
  except (OSError, EOFError, zlib.error) as e:
    raise DataFileError(f'IDX file {path} cannot be read ({e}); delete it '
                        'and download it again.') from e
  if len(data) < size:
    raise DataFileError(
        f'IDX file {path} is truncated: its header promises {size} bytes of '
        f'data but only {len(data)} are there; delete it and download it '
        'again.')
  return np.frombuffer(data, dtype=np.uint8).reshape(shape)
