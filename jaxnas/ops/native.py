"""jaxnas's native CPU kernels (``jaxnas/ops/csrc``), built on first use and called
through the XLA FFI.

The depthwise convs of the supernet are the bulk of its program: as XLA ops every one
of their k*k taps is a handful of HLO instructions, so the batch-64 PC-DARTS step is
some 300k fused instructions and most of its compile time. As FFI custom calls each
conv is one instruction; so are max pooling's index of each window's first maximum, its
gather and its transpose (``ops/primitives.py``), and the average pool becomes a
depthwise conv with a filter of ones. The kernels are compiled once per machine with
the system C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``) against the FFI
headers of the installed jaxlib, and the shared library is cached under
``$JAXNAS_CACHE_DIR`` (default ``~/.cache/jaxnas``), keyed by the source, jaxlib's
version, the compiler and the CPU. Where no compiler is found or the build fails,
`available()` says so (the reason is in `unavailable_reason()`) and the convs and pools
stay XLA ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import pathlib
import platform
import re
import shutil
import subprocess
import tempfile
import threading

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import jaxlib
import numpy as np
from absl import logging

SOURCE = pathlib.Path(__file__).parent / 'csrc' / 'depthwise.cc'
CACHE_ENV_VAR = 'JAXNAS_CACHE_DIR'
CONV_TARGET = 'jaxnas_depthwise_conv'
WEIGHT_GRAD_TARGET = 'jaxnas_depthwise_weight_grad'
MAX_POOL_INDEX_TARGET = 'jaxnas_max_pool_index'
POOL_GATHER_TARGET = 'jaxnas_pool_gather'
POOL_SCATTER_TARGET = 'jaxnas_pool_scatter'
_SYMBOLS = {CONV_TARGET: 'JaxnasDepthwiseConv',
            WEIGHT_GRAD_TARGET: 'JaxnasDepthwiseWeightGrad',
            MAX_POOL_INDEX_TARGET: 'JaxnasMaxPoolIndex',
            POOL_GATHER_TARGET: 'JaxnasPoolGather',
            POOL_SCATTER_TARGET: 'JaxnasPoolScatter'}
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')

_lock = threading.Lock()
_failure: str | None = None  # '' once loaded; the reason once a build failed.


def available() -> bool:
  """Whether the kernels are loaded and registered, building them if need be."""
  global _failure
  with _lock:
    if _failure is None:
      try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
        for target, symbol in _SYMBOLS.items():
          jax.ffi.register_ffi_target(
              target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
        _failure = ''
      except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        _failure = str(e)
        logging.warning('jaxnas native CPU kernels unavailable, the depthwise convs stay '
                        'XLA ops: %s', _failure)
  return not _failure


def unavailable_reason() -> str:
  """Why `available()` is False ('' when it is True or was not asked yet)."""
  return _failure or ''


def cache_dir() -> pathlib.Path:
  base = os.environ.get(CACHE_ENV_VAR) or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'jaxnas')
  return pathlib.Path(base)


def _compiler() -> str:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  raise RuntimeError('no C++ compiler found (set $CXX or install g++)')


def _cpu_signature() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      lines = [l for l in f if l.startswith(('model name', 'flags'))]
    return ''.join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def _build() -> pathlib.Path:
  """The path of the shared library, compiling it if the cache has none for this key."""
  compiler = _compiler()
  source = SOURCE.read_bytes()
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True,
                           check=True).stdout
  key = hashlib.sha256(b'\0'.join(s.encode() if isinstance(s, str) else s for s in (
      source, jaxlib.__version__, compiler, version, ' '.join(_FLAGS),
      _cpu_signature()))).hexdigest()[:16]
  target = cache_dir() / f'depthwise-{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  logging.info('Building the jaxnas native CPU kernels into %s', target)
  # Compiled to a temporary name and renamed: processes building at once never load a
  # partly written library.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(fd)
  try:
    result = subprocess.run(
        [compiler, *_FLAGS, f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', tmp],
        capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f'compiling {SOURCE.name} failed: {result.stderr.strip()[-2000:]}')
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def _geometry_attrs(geo) -> dict[str, np.int64]:
  (h_lo, h_hi), (w_lo, w_hi) = geo.padding
  return dict(stride=np.int64(geo.stride), lhs_dilation=np.int64(geo.lhs_dilation),
              rhs_dilation=np.int64(geo.rhs_dilation), pad_h_lo=np.int64(h_lo),
              pad_h_hi=np.int64(h_hi), pad_w_lo=np.int64(w_lo), pad_w_hi=np.int64(w_hi))


# Every kernel works sample by sample: on a device mesh, each device runs it on its own
# samples. Left to XLA's partitioner, a custom call is opaque and would have its operands
# gathered onto every device, each of which then computed the whole batch. `_call` says
# instead, with `custom_partitioning`, that the sample axis of every operand and result
# may stay split (and that a weight gradient, which sums over the samples, is the psum of
# the devices' partial sums); every other axis is replicated. On one device the call is
# lowered as it is.


def lowers_with_devices(prim) -> None:
  """Has JAX lower ``prim`` knowing the devices of the program, which the partitioned
  calls of `_call` need (as JAX's own primitives that lower to `custom_partitioning`)."""
  from jax._src import dispatch  # pylint: disable=g-import-not-at-top
  dispatch.prim_requires_devices_during_lowering.add(prim)


def _sample_axis(rank: int) -> int:
  return rank - 4  # [*leading, N, H, W, C]


def _call(target: str, out_shape, dtype, operands, attrs, sampled, reduces_samples=False):
  """The FFI call ``target(*operands, **attrs)`` -> ``out_shape`` ``dtype``, partitioned
  over the sample axis of the operands that have one (``sampled``: one bool each). The
  result has a sample axis too, unless the kernel sums over the samples
  (``reduces_samples``)."""
  ranks = [len(x.shape) for x in operands]
  out_rank = len(out_shape)

  def run(xs, shape):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype))(*xs, **attrs)

  def axes(tag, rank, has_samples):
    names = [f'{tag}{i}' for i in range(rank)]
    if has_samples:
      names[_sample_axis(rank)] = 'n'
    return names

  factors = [axes(f'a{i}_', r, s) for i, (r, s) in enumerate(zip(ranks, sampled))]
  result = axes('r', out_rank, not reduces_samples)
  rule = ', '.join(' '.join(f) for f in factors) + ' -> ' + ' '.join(result)
  others = tuple(f for f in (*sum(factors, []), *result) if f != 'n')

  def shardings(mesh, arg_shapes):
    first = sampled.index(True)
    spec = arg_shapes[first].sharding.spec
    samples = spec[_sample_axis(ranks[first])] if len(spec) > _sample_axis(ranks[first]) else None

    def sharding(rank, has_samples):
      parts = [None] * rank
      if has_samples:
        parts[_sample_axis(rank)] = samples
      return NamedSharding(mesh, PartitionSpec(*parts))

    args = tuple(sharding(r, s) for r, s in zip(ranks, sampled))
    return samples, args, sharding(out_rank, not reduces_samples)

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    samples, args, out = shardings(mesh, arg_shapes)
    local_shape = out.shard_shape(tuple(out_shape))

    def per_device(*xs):
      y = run(xs, local_shape)
      return jax.lax.psum(y, samples) if reduces_samples and samples is not None else y

    return mesh, per_device, out, args

  partitioned = custom_partitioning(lambda *xs: run(xs, tuple(out_shape)))
  partitioned.def_partition(
      partition, infer_sharding_from_operands=lambda mesh, args, _: shardings(mesh, args)[2],
      sharding_rule=rule, reduction_factors=('n',) if reduces_samples else (),
      need_replication_factors=others)
  return partitioned(*operands)


def conv(x, w, geo, out_shape, flip: bool = False, relu: bool = False):
  """The depthwise conv of x [*Bx, N, H, W, C] with w [*B, kh, kw, C] (float32) in the
  geometry ``geo`` (a ``depthwise._Geometry``), as one FFI call: [*B, N, Ho, Wo, C]. *Bx
  are the last axes of *B (an x shared by the filters of the others). With ``flip``, w
  is mirrored in kh and kw; with ``relu``, x is read as relu(x)."""
  return _call(CONV_TARGET, out_shape, x.dtype, (x, w),
               dict(_geometry_attrs(geo), flip=np.int64(flip), relu=np.int64(relu)),
               sampled=(True, False))


def weight_grad(x, g, geo, out_shape, relu: bool = False):
  """The weight gradient [*B, kh, kw, C] of that conv for the output cotangent g
  [*B, N, Ho, Wo, C]."""
  return _call(WEIGHT_GRAD_TARGET, out_shape, x.dtype, (x, g),
               dict(_geometry_attrs(geo), relu=np.int64(relu)), sampled=(True, True),
               reduces_samples=True)


def _pool_attrs(window, stride, padding) -> dict[str, np.int64]:
  (h_lo, _), (w_lo, _) = padding
  return dict(window=np.int64(window), stride=np.int64(stride), pad_h_lo=np.int64(h_lo),
              pad_w_lo=np.int64(w_lo))


def max_pool_index(x, window, stride, padding, out_shape):
  """For x [*B, N, H, W, C] (float32) padded by ``padding`` with -inf: the int8 tap of
  each window's first maximum, [*B, N, Ho, Wo, C]."""
  return _call(MAX_POOL_INDEX_TARGET, out_shape, np.int8, (x,),
               _pool_attrs(window, stride, padding), sampled=(True,))


def pool_gather(index, t, window, stride, padding):
  """t (shaped as the pool's input) read at each output's tap ``index``."""
  return _call(POOL_GATHER_TARGET, index.shape, t.dtype, (index, t),
               _pool_attrs(window, stride, padding), sampled=(True, True))


def pool_scatter(index, g, window, stride, padding, out_shape):
  """The transpose of `pool_gather` in t: each g added where its index points."""
  return _call(POOL_SCATTER_TARGET, out_shape, g.dtype, (index, g),
               _pool_attrs(window, stride, padding), sampled=(True, True))


_SHAPE = r'\w+\[([\d,]*)\]'  # an array's dims, of any dtype
_CALL = re.compile(rf'= {_SHAPE}\S* custom-call\(.*?custom_call_target="(\w+)", '
                   rf'operand_layout_constraints={{(.*?)}}}}')


def kernel_calls(hlo_text: str) -> list[tuple[str, list[int], list[list[int]]]]:
  """(target, output dims, operand dims) of every single-output custom call in a
  compiled program's HLO text (``compiled.as_text()``)."""
  dims = lambda text: [int(d) for d in text.split(',') if d]  # noqa: E731
  return [(target, dims(out), [dims(o) for o in re.findall(_SHAPE, operands)])
          for out, target, operands in _CALL.findall(hlo_text)]


def custom_call_flops(hlo_text: str) -> float:
  """FLOPs (2 per multiply-add) of the kernels' calls in a compiled program's
  HLO text (``compiled.as_text()``), which XLA's cost analysis counts as zero."""
  total = 0.0
  for target, out, shapes in kernel_calls(hlo_text):
    if target == CONV_TARGET:  # (x, w) -> y: every output element takes kh * kw taps.
      total += 2 * math.prod(out) * math.prod(shapes[1][-3:-1])
    elif target == WEIGHT_GRAD_TARGET:  # (x, g) -> dw: every g element, kh * kw taps.
      total += 2 * math.prod(shapes[1]) * math.prod(out[-3:-1])
  return total
