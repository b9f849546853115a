"""The DARTS primitives as Flax modules (NHWC).

Search mode (``affine=False``) follows the search code of DARTS / PC-DARTS: BatchNorm
without scale and bias, and a non-affine BatchNorm after each pool. Evaluation mode
(``affine=True``) uses affine BatchNorm and no BN after pools.
"""

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import ad

from jaxnas.ops import depthwise as depthwise_lib
from jaxnas.ops import native as native_lib
from jaxnas.ops import recompute as recompute_lib

# PyTorch's default conv/linear init (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); keeping it keeps the reference's early dynamics.
torch_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# The same for a stack of kernels (G, fan_in, fan_out): the leading axis is not fan-in.
torch_init_stacked = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform',
                                                      batch_axis=(0,))


class BatchNorm(nn.Module):
  """BatchNorm over every axis but the channels (PyTorch semantics: momentum 0.1,
  eps 1e-5, running variance unbiased).

  Written out rather than ``nn.BatchNorm`` because a supernet holds hundreds of them and
  this form lowers to fewer HLO ops. ``grouped=True`` normalizes a stack of independent
  BNs in one go: x is (G, B, ..., C) and every (group, channel) pair has its own
  statistics, over the batch and spatial axes (the group axis leads, so each group is a
  contiguous block).

  ``batch_groups`` > 1 computes the training statistics per slice of B / batch_groups
  rows: per device, as PyTorch DataParallel does (sharded over the ``data`` axis, each
  slice is one device's rows). The running statistics take the mean over the slices.
  """
  train: bool
  affine: bool = False
  grouped: bool = False
  momentum: float = 0.1
  epsilon: float = 1e-5
  batch_groups: int = 1

  @nn.compact
  def __call__(self, x):
    batch_axis = 1 if self.grouped else 0
    feat = (x.shape[0], x.shape[-1]) if self.grouped else (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, feat, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, feat, jnp.float32)
    if self.train:
      # Init needs no statistics (it may run on a single example).
      g = 1 if self.is_initializing() else self.batch_groups
      b = x.shape[batch_axis]
      if b % g:
        raise ValueError(f'BatchNorm over {g} batch groups needs a batch divisible by '
                         f'{g}, got {b}.')
      # The batch axis split as (g, B/g): the slice axis comes first, so on a mesh it is
      # the sharded one. With g = 1 the reshape only adds a unit axis.
      xg = x.reshape(x.shape[:batch_axis] + (g, b // g) + x.shape[batch_axis + 1:])
      axes = tuple(range(batch_axis + 1, xg.ndim - 1))
      n = math.prod(xg.shape[a] for a in axes)
      mean = jnp.mean(xg, axes, keepdims=True)
      var = jnp.maximum(jnp.mean(jnp.square(xg), axes, keepdims=True) - jnp.square(mean),
                        0.0)
      if not self.is_initializing():
        m = self.momentum
        slice_mean = lambda t: jnp.mean(t, batch_axis).reshape(feat)  # noqa: E731
        ra_mean.value = (1 - m) * ra_mean.value + m * slice_mean(mean)
        ra_var.value = (1 - m) * ra_var.value + m * slice_mean(var) * (n / max(n - 1, 1))
      y = ((xg - mean) * lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    else:
      y = (x - self._expand(ra_mean.value, x)) * lax.rsqrt(
          self._expand(ra_var.value, x) + self.epsilon)
    if self.affine:
      scale = self.param('scale', nn.initializers.ones, feat)
      bias = self.param('bias', nn.initializers.zeros, feat)
      y = y * self._expand(scale, x) + self._expand(bias, x)
    return y

  def _expand(self, v, x):
    """A (G, C) or (C,) per-feature array, shaped to broadcast against x."""
    if self.grouped:
      return v.reshape((v.shape[0],) + (1,) * (x.ndim - 2) + (v.shape[1],))
    return v


def batch_norm(train: bool, affine: bool, name: str | None = None,
               batch_groups: int = 1) -> BatchNorm:
  return BatchNorm(train, affine, batch_groups=batch_groups, name=name)


def pointwise(x, kernel):
  """1x1 convolution: x ([G,] ..., c_in) times kernel ([G,] c_in, c_out); a leading
  group axis is a batch axis of one matmul (no transposes)."""
  if kernel.ndim == 3:
    return jnp.einsum('g...c,gcd->g...d', x, kernel)
  return jnp.dot(x, kernel)


@jax.custom_vjp
def scale(x, w):
  """x * w for a scalar w (a mixing weight), differentiated as usual, except that the
  backward pass broadcasts its own copy of w.

  On XLA:CPU a matmul fusion takes in the elementwise ops that feed it, and a scalar
  factor among them becomes a full-size broadcast array. XLA shares that array with the
  backward pass's product g * w, so it lived from the forward to the backward pass: the
  edge weights in front of PC-DARTS's channel-shuffle matmuls alone kept 0.36 GB of such
  arrays in the batch-256 search step. Here the backward's w is w + 0 * g[0]
  (``recompute.after``), which XLA can neither fold away nor merge with the forward's w.
  """
  return x * w


def _scale_fwd(x, w):
  return x * w, (x, w)


def _scale_bwd(residuals, g):
  x, w = residuals
  return g * recompute_lib.after(w, g), jnp.sum(g * x).astype(w.dtype)


scale.defvjp(_scale_fwd, _scale_bwd)


class Conv1x1(nn.Module):
  """1x1 convolution (no bias); ``stride`` subsamples first."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    if self.stride > 1:
      x = x[:, ::self.stride, ::self.stride, :]
    kernel = self.param('kernel', torch_init, (x.shape[-1], self.features))
    return pointwise(x, kernel)


class DepthwiseConv(nn.Module):
  """k x k depthwise convolution, padding dilation*(k-1)//2 (PyTorch semantics); of
  relu(x) where ``relu`` (see `depthwise.depthwise_conv`)."""
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  impl: str = 'auto'
  relu: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    # fan_in of a depthwise filter is k*k (in_channels / groups == 1).
    kernel = self.param('kernel', torch_init, (k, k, 1, x.shape[-1]))
    return depthwise_lib.depthwise_conv(
        x, kernel[:, :, 0, :], stride=self.stride, dilation=self.dilation, impl=self.impl,
        relu=self.relu)


class ReLUConvBN(nn.Module):
  """ReLU -> 1x1 conv -> BN, the cells' preprocessing."""
  features: int
  affine: bool = False
  bn_groups: int = 1  # BatchNorm.batch_groups

  @nn.compact
  def __call__(self, x, train: bool):
    x = Conv1x1(self.features)(nn.relu(x))
    return batch_norm(train, self.affine, batch_groups=self.bn_groups)(x)


class FactorizedReduce(nn.Module):
  """Halves H and W: ReLU, two 1x1 stride-2 convs (the second on the input shifted by
  one pixel) to features/2 each, concat, BN.

  The shifted branch is zero-padded at the bottom/right so both branches give
  ceil(H/2) rows for odd sizes too; for even sizes this is exactly the reference.
  """
  features: int
  affine: bool = False
  bn_groups: int = 1  # BatchNorm.batch_groups

  @nn.compact
  def __call__(self, x, train: bool):
    if self.features % 2:
      raise ValueError(f'FactorizedReduce needs an even channel count, got {self.features}.')
    x = nn.relu(x)
    shifted = jnp.pad(x[:, 1:, 1:, :], ((0, 0), (0, 1), (0, 1), (0, 0)))
    half = self.features // 2
    y = jnp.concatenate([Conv1x1(half, stride=2)(x), Conv1x1(half, stride=2)(shifted)], -1)
    return batch_norm(train, self.affine, batch_groups=self.bn_groups)(y)


def _pool_padding(x, window, stride, pad):
  return ((0, 0), (pad, pad), (pad, pad), (0, 0)), (1, window, window, 1), (1, stride, stride, 1)


def max_pool(x, window: int = 3, stride: int = 1, pad: int = 1, impl: str = 'auto'):
  """window x window max pool of x [..., H, W, C], padded with -inf by ``pad``; its
  derivatives run as the native CPU kernels where ``impl`` (a depthwise conv impl)
  resolves to 'native' and x is float32."""
  native = depthwise_lib.resolve_impl(impl) == 'native' and x.dtype == jnp.float32
  return _max_pool(x, window, stride, ((pad, pad), (pad, pad)), native)


def max_pool_2x2(x):
  """2x2 stride-2 max pool, ceil mode (matches the strided ops' ceil(H/2) on odd sizes)."""
  h, w = x.shape[-3], x.shape[-2]
  return _max_pool(x, 2, 2, ((0, h % 2), (0, w % 2)), False)


# Max pooling differentiates through the index of each window's first maximum (the
# element PyTorch and XLA's select-and-scatter pick), kept as one int8 per output.
# Autodiff of `lax.reduce_window` goes through select-and-scatter instead, which XLA:CPU
# runs as a scatter after a windowed argmax that keeps four int32 coordinates per output
# element, plus a zeroed full-size buffer, from the forward to the backward pass.
#
# The tangent map (each output takes the input tangent at its index) and its transpose
# are two primitives, each the other's transpose, and both are gathers: the transpose
# reads, at every input position, the cotangent and the index of each window that holds
# that position, from padded (for a stride, also dilated) copies of both, as a conv's
# input gradient reads its cotangent. Left to JAX, the transpose of the tangent map is a sum of
# padded copies, one per tap, and XLA:CPU fused the producers of the index and of the
# cotangent (the first-maximum comparisons, BatchNorm's backward) into it once per tap.
# The PC-DARTS CIFAR search step at batch 64, both versions compiled in one process on a
# 2-core CPU: 3.25 s that way, 2.66 s this way.
#
# With ``native`` the index, the gather and its transpose are the C++ kernels of
# jaxnas/ops/native.py (the gather of x at the index is then also the primal output).
@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window: int, stride: int, padding, native: bool):
  del native
  lead = x.ndim - 3
  return lax.reduce_window(x, -jnp.inf, lax.max, (1,) * lead + (window, window, 1),
                           (1,) * lead + (stride, stride, 1),
                           ((0, 0),) * lead + tuple(padding) + ((0, 0),))


@_max_pool.defjvp
def _max_pool_jvp(window, stride, padding, native, primals, tangents):
  (x,), (tx,) = primals, tangents
  padding = tuple(tuple(p) for p in padding)
  params = dict(window=window, stride=stride, padding=padding, native=native)
  if native:
    index = _pool_index_p.bind(x, window=window, stride=stride, padding=padding)
    return _pool_gather_p.bind(index, x, **params), _pool_gather_p.bind(index, tx, **params)
  y, index = _max_and_index(x, window, stride, padding)
  return y, _pool_gather_p.bind(index, tx, **params)


def _max_and_index(x, window, stride, padding):
  # The maximum and the index of the first tap that reaches it, in one pass (a NaN
  # wins over numbers, as in lax.max).
  y = index = None
  for t, tap in enumerate(depthwise_lib.pool_windows(x, window, stride, padding, -jnp.inf)):
    if y is None:
      y, index = tap, jnp.zeros(tap.shape, jnp.int8)
      continue
    take = (tap > y) | (jnp.isnan(tap) & ~jnp.isnan(y))
    y = jnp.where(take, tap, y)
    index = jnp.where(take, jnp.int8(t), index)
  return y, index


def _pool_index_impl(x, *, window, stride, padding):
  return _max_and_index(x, window, stride, padding)[1]


def _pool_index_cpu(x, *, window, stride, padding):
  out_shape = _pool_index_abstract(x, window=window, stride=stride, padding=padding).shape
  return native_lib.max_pool_index(x, window, stride, padding, out_shape)


def _pool_index_abstract(x, *, window, stride, padding):
  out = [(size + lo + hi - window) // stride + 1
         for size, (lo, hi) in zip(x.shape[-3:-1], padding)]
  return jax.core.ShapedArray((*x.shape[:-3], *out, x.shape[-1]), jnp.int8)


def _pool_gather_impl(index, t, *, window, stride, padding, native=False):
  """out[o] = t at tap index[o] of output o's window."""
  del native
  out = None
  for k, tap in enumerate(depthwise_lib.pool_windows(t, window, stride, padding, 0)):
    term = jnp.where(index == k, tap, jnp.zeros((), tap.dtype))
    out = term if out is None else out + term
  return out


def _pool_scatter_impl(index, g, *, window, stride, padding, in_hw, native=False):
  """The transpose in g of ``_pool_gather_impl``: dx[p] sums g[o] over the outputs o
  whose index points at p."""
  del native
  last = window * window - 1
  windows = zip(
      depthwise_lib.transposed_pool_windows(index, window, stride, padding, in_hw, -1),
      depthwise_lib.transposed_pool_windows(g, window, stride, padding, in_hw, 0))
  out = None
  for u, (index_u, g_u) in enumerate(windows):
    term = jnp.where(index_u == last - u, g_u, jnp.zeros((), g_u.dtype))
    out = term if out is None else out + term
  return out


_pool_gather_p = jex_core.Primitive('jaxnas_max_pool_gather')
_pool_scatter_p = jex_core.Primitive('jaxnas_max_pool_scatter')
_pool_index_p = jex_core.Primitive('jaxnas_max_pool_index')


def _pool_gather_abstract(index, t, **params):
  del params
  return jax.core.ShapedArray(index.shape, t.dtype)


def _pool_scatter_abstract(index, g, *, in_hw, **params):
  del params
  return jax.core.ShapedArray((*index.shape[:-3], *in_hw, index.shape[-1]), g.dtype)


def _pool_gather_cpu(index, t, *, window, stride, padding, native):
  if native and t.dtype == jnp.float32:
    return native_lib.pool_gather(index, t, window, stride, padding)
  return _pool_gather_impl(index, t, window=window, stride=stride, padding=padding)


def _pool_scatter_cpu(index, g, *, window, stride, padding, in_hw, native):
  if native and g.dtype == jnp.float32:
    out_shape = _pool_scatter_abstract(index, g, in_hw=in_hw).shape
    return native_lib.pool_scatter(index, g, window, stride, padding, out_shape)
  return _pool_scatter_impl(index, g, window=window, stride=stride, padding=padding,
                            in_hw=in_hw)


def _pool_gather_transpose(ct, index, t, *, window, stride, padding, native):
  return [None, _pool_scatter_p.bind(index, ad.instantiate_zeros(ct), window=window,
                                     stride=stride, padding=padding,
                                     in_hw=tuple(t.aval.shape[-3:-1]), native=native)]


def _pool_scatter_transpose(ct, index, g, *, window, stride, padding, in_hw, native):
  del g, in_hw
  return [None, _pool_gather_p.bind(index, ad.instantiate_zeros(ct), window=window,
                                    stride=stride, padding=padding, native=native)]


depthwise_lib.define_primitive(_pool_gather_p, _pool_gather_abstract, _pool_gather_impl,
                               _pool_gather_cpu, ('window', 'stride', 'padding', 'native'))
depthwise_lib.define_primitive(_pool_scatter_p, _pool_scatter_abstract, _pool_scatter_impl,
                               _pool_scatter_cpu,
                               ('window', 'stride', 'padding', 'in_hw', 'native'))
for _prim, _transpose in ((_pool_gather_p, _pool_gather_transpose),
                          (_pool_scatter_p, _pool_scatter_transpose)):
  ad.primitive_jvps[_prim] = functools.partial(depthwise_lib.linear_in_second_jvp, _prim)
  ad.primitive_transposes[_prim] = _transpose

# The index: only bound with ``native`` (so only lowered to the kernel, on CPU); an
# integer, so its derivative is zero.
depthwise_lib.define_primitive(_pool_index_p, _pool_index_abstract, _pool_index_impl,
                               _pool_index_cpu, ('window', 'stride', 'padding'))


def _pool_index_jvp(primals, tangents, **params):
  del tangents
  index = _pool_index_p.bind(*primals, **params)
  return index, ad.Zero(jax.typeof(index).to_tangent_aval())


ad.primitive_jvps[_pool_index_p] = _pool_index_jvp


def avg_pool(x, window: int = 3, stride: int = 1, pad: int = 1, impl: str = 'auto'):
  """Average pool that does not count the padding (count_include_pad=False).

  Where ``impl`` (a depthwise conv impl) resolves to 'native', x is [N, H, W, C] float32
  and the padding is the conv's ((window - 1) // 2), the window sums are a depthwise conv
  with a filter of ones (the native kernel, forward and backward), times the constant
  1 / count."""
  if (x.ndim == 4 and x.dtype == jnp.float32 and pad == (window - 1) // 2
      and depthwise_lib.resolve_impl(impl) == 'native'):
    ones = jnp.ones((window, window, x.shape[-1]), x.dtype)
    total = depthwise_lib.depthwise_conv(x, ones, stride=stride, impl='native')
    counts = [np.convolve(np.pad(np.ones(size), pad), np.ones(window), 'valid')[::stride]
              for size in x.shape[1:3]]
    return total * np.float32(1.0 / np.outer(*counts))[:, :, None]
  padding, dims, strides = _pool_padding(x, window, stride, pad)
  total = lax.reduce_window(x, 0.0, lax.add, dims, strides, padding)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = lax.reduce_window(ones, 0.0, lax.add, dims, strides, padding)
  return total / count


class Pool(nn.Module):
  kind: str  # 'max' or 'avg'
  stride: int = 1
  affine: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    y = (max_pool if self.kind == 'max' else avg_pool)(x, 3, self.stride, 1)
    if not self.affine:  # search mode: a non-affine BN after each pool
      y = batch_norm(train, affine=False)(y)
    return y


class Identity(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return x


class Zero(nn.Module):
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    return jnp.zeros_like(x[:, ::self.stride, ::self.stride, :])


class SepConv(nn.Module):
  """Two stacked ReLU -> depthwise kxk -> 1x1 -> BN blocks; stride only in the first."""
  features: int
  kernel_size: int
  stride: int = 1
  affine: bool = False
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = x.shape[-1]
    x = DepthwiseConv(self.kernel_size, self.stride, impl=self.impl)(nn.relu(x))
    x = batch_norm(train, self.affine)(Conv1x1(c_in)(x))
    x = DepthwiseConv(self.kernel_size, 1, impl=self.impl)(nn.relu(x))
    return batch_norm(train, self.affine)(Conv1x1(self.features)(x))


class DilConv(nn.Module):
  """ReLU -> depthwise kxk with dilation 2 -> 1x1 -> BN."""
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 2
  affine: bool = False
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool):
    x = DepthwiseConv(self.kernel_size, self.stride, self.dilation, impl=self.impl)(nn.relu(x))
    return batch_norm(train, self.affine)(Conv1x1(self.features)(x))


def make_op(name: str, features: int, stride: int, affine: bool,
            impl: str = 'auto', module_name: str | None = None) -> nn.Module:
  """Builds primitive ``name`` mapping ``features`` channels to ``features`` channels;
  the module is named ``module_name`` (default: the primitive's name)."""
  op_name, name = name, module_name or name
  builders: dict[str, Callable[[], nn.Module]] = {
      'none': lambda: Zero(stride, name=name),
      'max_pool_3x3': lambda: Pool('max', stride, affine, name=name),
      'avg_pool_3x3': lambda: Pool('avg', stride, affine, name=name),
      'skip_connect': lambda: (Identity(name=name) if stride == 1
                               else FactorizedReduce(features, affine, name=name)),
      'sep_conv_3x3': lambda: SepConv(features, 3, stride, affine, impl, name=name),
      'sep_conv_5x5': lambda: SepConv(features, 5, stride, affine, impl, name=name),
      'sep_conv_7x7': lambda: SepConv(features, 7, stride, affine, impl, name=name),
      'dil_conv_3x3': lambda: DilConv(features, 3, stride, 2, affine, impl, name=name),
      'dil_conv_5x5': lambda: DilConv(features, 5, stride, 2, affine, impl, name=name),
  }
  if op_name not in builders:
    raise ValueError(f'Unknown primitive {op_name!r}; known: {sorted(builders)}.')
  return builders[op_name]()
