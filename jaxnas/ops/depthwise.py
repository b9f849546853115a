"""Depthwise 2-D convolution (one kxk filter per channel), fast on CPU.

Semantics follow PyTorch `Conv2d(C, C, k, stride, padding=dilation*(k-1)//2,
dilation, groups=C, bias=False)` on NHWC inputs; these are the depthwise convs of
the DARTS SepConv / DilConv ops.

Three implementations:

* 'xla': `lax.conv_general_dilated(..., feature_group_count=C)`. Good on GPU/TPU
  (cuDNN), but XLA:CPU runs grouped convs slowly (64x32x32x16, 3x3: ~30 ms forward,
  ~70 ms forward+backward on 2 cores).
* 'shifted': the forward is a sum over the k*k taps of strided slices of the
  padded input times that tap's per-channel weights; XLA fuses it into one loop.
  Plain autodiff of that sum is slow (one materialized shifted copy and one
  reduction per tap for the weight gradient) and compiles to a large program, so
  the shifted conv is a JAX primitive with its own rules:
    - input gradient (transpose in x): the transposed conv, i.e. the same shifted
      sum over the dilated, padded cotangent with the flipped filter;
    - weight gradient (transpose in w): a second primitive that computes all k*k
      per-tap products in ONE variadic `lax.reduce` over (H, W), then sums over
      the batch. XLA emits one fused pass over x and g for it (5-10x faster than
      per-tap sums on CPU); reducing per sample first keeps float32 summation
      chains short (about 10x smaller error than one reduce over N*H*W).
      Where the input is no larger than the output (stride 1) the taps are
      taken from the cotangent instead, so the backward pass reads x
      unpadded. Taken from x, XLA shares the forward pass's padded (under
      vmap also broadcast) copy of x with the weight gradient and keeps it
      alive from the forward to the backward pass: in the PC-DARTS batch-64
      step those copies were 23 % of the buffers.
  Both primitives are bilinear, and every transpose of one is again one of the
  two, so forward mode, reverse mode and any nesting (DARTS second order,
  Hessian-vector products by jvp-of-grad or grad-of-grad) stay in these fast
  forms. Linearization keeps only x and w as residuals. Both take the ReLU in
  front of the conv as a flag (``relu``): the rectified input is never an array
  of its own, and the backward pass keeps x instead of relu(x). Both have
  batching rules: under `jax.vmap` (a stacked edge axis with per-edge filters)
  the batch axis becomes a leading axis of the same fused loops (faster than
  folding edges into channels, which needs transposes), and an input that is
  not mapped (all edges leaving one state read it) stays one array that every
  filter reads, instead of a copy per edge.
  XLA fuses cheap producers of x or of the cotangent (ReLU, BatchNorm) into the
  k*k-tap loops and recomputes them per tap; that is fine for those ops but
  costly for transcendental ones (e.g. a sin/cos directly around the conv).
* 'native': the same two primitives, with the same rules, lowered on CPU to C++
  kernels called through the XLA FFI (`jaxnas/ops/native.py`, built on first use)
  instead of XLA ops. Each conv is then one instruction of the program rather than
  k*k taps of several each. With the pools' kernels (`ops/primitives.py`) the
  batch-64 PC-DARTS search step compiles in 50-59 s instead of 97-121 s and steps in
  2.1-2.3 s instead of 2.5-2.7 s on a 2-core CPU. float32 only: other dtypes take
  the 'shifted' ops.

'auto' picks 'native' on the CPU backend where the kernels build ('shifted' where
they do not, e.g. without a C++ compiler) and 'xla' elsewhere. The environment
variable JAXNAS_DEPTHWISE=xla|shifted|native overrides 'auto' (for benchmarks); an
explicit `impl=` argument always wins.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

from jaxnas.ops import native as native_lib

ENV_VAR = 'JAXNAS_DEPTHWISE'
IMPLS = ('auto', 'xla', 'shifted', 'native')


def resolve_impl(impl: str = 'auto') -> str:
  """Returns 'xla', 'shifted' or 'native' for `impl` ('auto' honours JAXNAS_DEPTHWISE)."""
  if impl not in IMPLS:
    raise ValueError(f'depthwise_conv impl must be one of {IMPLS}, got {impl!r}.')
  if impl == 'auto':
    impl = os.environ.get(ENV_VAR, '') or 'auto'
    if impl not in IMPLS:
      raise ValueError(
          f'Environment variable {ENV_VAR}={impl!r}: set it to one of {IMPLS} '
          'or unset it.')
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'xla'
    return 'native' if native_lib.available() else 'shifted'
  if impl == 'native' and not native_lib.available():
    raise RuntimeError("depthwise_conv impl 'native' needs jaxnas's CPU kernels, which "
                       f'could not be built: {native_lib.unavailable_reason()}')
  return impl


def is_cpu_form(impl: str) -> bool:
  """Whether `impl` resolves to one of the CPU forms ('shifted' or 'native')."""
  return resolve_impl(impl) in ('shifted', 'native')


def depthwise_conv(x: jax.Array, w: jax.Array, *, stride: int = 1,
                   dilation: int = 1, impl: str = 'auto', relu: bool = False) -> jax.Array:
  """Depthwise conv of x [N, H, W, C] (of relu(x) where ``relu``) with w [kh, kw, C],
  'same'-style padding.

  Padding is dilation*(k-1)//2 on each side, so the output is [N, Ho, Wo, C]
  with Ho = (H + 2p - dilation*(kh-1) - 1) // stride + 1. With ``relu`` the rectified
  input is not a separate array: the kernels read x through the relu, and the backward
  pass keeps x (which the network keeps anyway) instead of relu(x).
  """
  _check_args(x, w, stride, dilation)
  dtype = jnp.result_type(x, w)
  x, w = x.astype(dtype), w.astype(dtype)
  kh, kw = w.shape[:2]
  pads = ((dilation * (kh - 1) // 2,) * 2, (dilation * (kw - 1) // 2,) * 2)
  impl = resolve_impl(impl)
  if impl == 'xla':
    if relu:
      x = jax.nn.relu(x)
    return lax.conv_general_dilated(
        x, w[:, :, None, :], window_strides=(stride, stride), padding=pads,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=x.shape[-1])
  return _conv_p.bind(x, w, geo=_Geometry(stride, 1, dilation, pads),
                     native=impl == 'native', flip=False, relu=relu)


def depthwise_conv_batched(x: jax.Array, w: jax.Array, *, stride: int = 1,
                           dilation: int = 1, impl: str = 'auto',
                           relu: bool = False) -> jax.Array:
  """`depthwise_conv` per leading index: x [E, N, H, W, C], w [E, kh, kw, C].

  The supernet's stacked edges; the same as `jax.vmap(depthwise_conv)`.
  """
  if x.ndim != 5 or w.ndim != 4 or x.shape[0] != w.shape[0]:
    raise ValueError(
        'depthwise_conv_batched expects x [E, N, H, W, C] and w [E, kh, kw, C] '
        f'with the same E; got x {x.shape} and w {w.shape}.')
  conv = functools.partial(depthwise_conv, stride=stride, dilation=dilation,
                           impl=impl, relu=relu)
  return jax.vmap(conv)(x, w)


def _check_args(x, w, stride, dilation):
  if x.ndim != 4 or w.ndim != 3 or w.shape[-1] != x.shape[-1]:
    raise ValueError(
        'depthwise_conv expects x [N, H, W, C] and w [kh, kw, C] with the same '
        f'C; got x {x.shape} and w {w.shape}.')
  for name, v in (('stride', stride), ('dilation', dilation)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f'depthwise_conv {name} must be a positive int, got {v!r}.')


# ----------------------------------------------------------------------------
# Geometry. A `_Geometry` describes a general, transposable conv along H and W:
# pad the input with `padding` and `lhs_dilation - 1` zeros between pixels, then
# out[o] = sum_i xp[o * stride + i * rhs_dilation] * w[i]. The input gradient of
# such a conv is another one (`_transpose`).
# ----------------------------------------------------------------------------


class _Geometry(NamedTuple):
  stride: int
  lhs_dilation: int
  rhs_dilation: int
  padding: tuple[tuple[int, int], tuple[int, int]]  # (lo, hi) for H and W.


def _out_size(size: int, k: int, pad: tuple[int, int], geo: _Geometry) -> int:
  padded = pad[0] + pad[1] + (size - 1) * geo.lhs_dilation + 1
  return (padded - geo.rhs_dilation * (k - 1) - 1) // geo.stride + 1


def _transpose(geo: _Geometry, in_hw, k_hw) -> _Geometry:
  """Geometry of the conv that maps an output cotangent to the input's."""
  pads = []
  for size, k, pad in zip(in_hw, k_hw, geo.padding):
    span = geo.rhs_dilation * (k - 1)
    lo = span - pad[0]
    # High padding (negative = crop) that makes the result exactly `size` long.
    hi = (geo.lhs_dilation * (size - 1) + span - lo
          - (_out_size(size, k, pad, geo) - 1) * geo.stride)
    pads.append((lo, hi))
  return _Geometry(geo.lhs_dilation, geo.stride, geo.rhs_dilation, tuple(pads))


# ----------------------------------------------------------------------------
# Implementations. Arrays may carry leading batch axes (from vmap): x
# [*B, N, H, W, C], w [*B, kh, kw, C], with the same *B.
# ----------------------------------------------------------------------------


def _taps(x, k_hw, geo: _Geometry, fill=0):
  """The padded input's strided window for each tap (i, j), row-major; the padding
  and the interior dilation hold ``fill`` (zero for the convs)."""
  (kh, kw), d, s = k_hw, geo.rhs_dilation, geo.stride
  lead = x.ndim - 3  # Leading axes before H, W, C.
  interior = geo.lhs_dilation - 1
  xp = lax.pad(x, jnp.asarray(fill, x.dtype),
               ((0, 0, 0),) * lead
               + ((*geo.padding[0], interior), (*geo.padding[1], interior),
                  (0, 0, 0)))
  ho = _out_size(x.shape[-3], kh, geo.padding[0], geo)
  wo = _out_size(x.shape[-2], kw, geo.padding[1], geo)
  return [lax.slice(xp, (0,) * lead + (i * d, j * d, 0),
                    x.shape[:lead] + (i * d + (ho - 1) * s + 1,
                                      j * d + (wo - 1) * s + 1, x.shape[-1]),
                    (1,) * lead + (s, s, 1))
          for i in range(kh) for j in range(kw)]


def pool_windows(x, window: int, stride: int, padding, fill):
  """The strided [..., Ho, Wo, C] window of x, padded with ``fill`` by ``padding``
  ((lo, hi) for H and W), for each tap of a window x window pool, row-major."""
  return _taps(x, (window, window), _Geometry(stride, 1, 1, tuple(padding)), fill)


def transposed_pool_windows(y, window: int, stride: int, padding, in_hw, fill):
  """For y [..., Ho, Wo, C] on the output grid of such a pool of an [..., *in_hw, C]
  input: the [..., *in_hw, C] windows of y (padded, and dilated by the stride, with
  ``fill``) that the input gradient sums, as a conv's. Window u holds, at each input
  position, the value of the output whose pool tap window*window-1-u reads that position
  (``fill`` where none does)."""
  geo = _transpose(_Geometry(stride, 1, 1, tuple(padding)), tuple(in_hw), (window, window))
  return _taps(y, (window, window), geo, fill)


def _conv_impl(x, w, *, geo: _Geometry, native: bool = False, flip: bool = False,
               relu: bool = False):
  """The conv of x (of relu(x) where ``relu``) with w, or with w mirrored in both
  spatial axes where ``flip`` (as the input gradient's conv takes it)."""
  del native  # The XLA form; the kernels are chosen by the CPU lowering (_conv_cpu).
  x = _shared_input(x, w.shape[:w.ndim - 3], relu)
  if flip:
    w = _flip(w)
  lead = x.ndim - 4
  windows = _taps(x, w.shape[-3:-1], geo)
  w = w.reshape(*w.shape[:lead], -1, w.shape[-1])  # [*B, k*k, C]
  # Each tap's [*B, 1, C] weights broadcast straight onto [*B, N, Ho, Wo, C]
  # (the size-1 tap axis onto N): fewer HLO ops than indexing and reshaping.
  to_window = (*range(lead), lead, lead + 3)
  out = None
  for t, window in enumerate(windows):
    w_t = lax.slice_in_dim(w, t, t + 1, axis=lead)
    term = window * lax.broadcast_in_dim(w_t, window.shape, to_window)
    out = term if out is None else out + term
  return out


def _weight_grad_impl(x, g, *, geo: _Geometry, k_hw, native: bool = False,
                      relu: bool = False):
  """dw[i, j, c] = sum_{n, h, w} window_ij(x)[n, h, w, c] * g[n, h, w, c] (x read as
  relu(x) where ``relu``).

  Equivalently sum_{n, h, w} x * window'(g) with window' the mirrored tap of g
  in the transposed geometry; that form is used where x is not larger than g.
  """
  del native  # As in _conv_impl.
  x = _shared_input(x, g.shape[:g.ndim - 4], relu)
  acc = jnp.promote_types(x.dtype, jnp.float32)
  in_hw = x.shape[-3:-1]
  if in_hw[0] * in_hw[1] <= g.shape[-3] * g.shape[-2]:
    # The same sum with the taps taken from g: tap t of the conv pairs x with
    # tap k*k-1-t of g in the transposed geometry (the input gradient's).
    windows = _taps(g, k_hw, _transpose(geo, in_hw, k_hw))[::-1]
    prods = [(x * window).astype(acc) for window in windows]
  else:
    prods = [(window * g).astype(acc) for window in _taps(x, k_hw, geo)]
  zeros = [jnp.zeros((), acc)] * len(prods)
  lead = x.ndim - 4
  # One variadic reduce = one fused pass over x and g for all taps; separate
  # jnp.sum calls each got their own materialized shifted copy.
  per_sample = lax.reduce(prods, zeros,
                          lambda a, b: [u + v for u, v in zip(a, b)],
                          (lead + 1, lead + 2))  # k*k arrays [*B, N, C]
  dw = jnp.stack(per_sample, axis=lead).sum(axis=lead + 1)  # [*B, k*k, C]
  return dw.reshape(*x.shape[:lead], *k_hw, x.shape[-1]).astype(x.dtype)


def _flip(w):
  return lax.rev(w, (w.ndim - 3, w.ndim - 2))


def _shared_input(x, lead, relu):
  """x [*Bx, N, H, W, C] (relu-ed where ``relu``) broadcast to the leading axes ``lead``,
  of which *Bx are the last: the XLA forms' view of an input shared by several filters."""
  if relu:
    x = jnp.maximum(x, jnp.zeros((), x.dtype))
  return jnp.broadcast_to(x, (*lead, *x.shape[-4:]))


def _sum_to(t, shape):
  """t [*B, *shape[-k:]] summed over the leading axes that ``shape`` lacks (the transpose
  of sharing an input, `_shared_input`)."""
  extra = t.ndim - len(shape)
  return jnp.sum(t, tuple(range(extra))) if extra else t


# ----------------------------------------------------------------------------
# Primitives and their rules.
# ----------------------------------------------------------------------------

_conv_p = jex_core.Primitive('jaxnas_depthwise_conv')
_weight_grad_p = jex_core.Primitive('jaxnas_depthwise_weight_grad')


def _conv_abstract(x, w, *, geo, native=False, flip=False, relu=False):
  del native, flip, relu
  ho = _out_size(x.shape[-3], w.shape[-3], geo.padding[0], geo)
  wo = _out_size(x.shape[-2], w.shape[-2], geo.padding[1], geo)
  return jax.core.ShapedArray((*w.shape[:-3], x.shape[-4], ho, wo, x.shape[-1]), x.dtype)


def _weight_grad_abstract(x, g, *, geo, k_hw, native=False, relu=False):
  del geo, native, relu
  return jax.core.ShapedArray((*g.shape[:-4], *k_hw, x.shape[-1]), x.dtype)


# where(x > 0, t, 0): the ReLU's tangent map, linear in t. A primitive so that its
# linearization keeps x (which the network keeps anyway), not a mask or a zero array.
_relu_mask_p = jex_core.Primitive('jaxnas_relu_mask')


def _relu_mask_impl(x, t):
  return jnp.where(x > 0, t, jnp.zeros((), t.dtype))


def _masked(dx, x, relu):
  return _relu_mask_p.bind(x, dx) if relu else dx


# Both conv primitives are bilinear in (relu(x), w) and (relu(x), g): linear in w and
# g, and in x where ``relu`` is off. Their JVPs say so, with the ReLU's mask applied to
# the x-tangent, so every transpose needed is of a linear use and is again one of the
# two primitives (one with ``relu`` is only ever transposed in its second operand). The
# input gradient's conv reads the filter mirrored: a ``flip`` parameter rather than a
# reversed copy (on CPU the kernel reads the taps backwards). An x shared by several
# filters (fewer leading axes, `_batch_shared_input`) gets its input gradient summed
# over the filters that share it.


def linear_in_second_jvp(prim, primals, tangents, **params):
  """The JVP of a primitive linear in its second operand and constant in its first
  (an integer index, or a mask's source)."""
  first, v = primals
  return (prim.bind(first, v, **params),
          prim.bind(first, ad.instantiate_zeros(tangents[1]), **params))


def _bilinear_jvp(prim, primals, tangents, **params):
  (x, v), (dx, dv) = primals, tangents
  out = prim.bind(x, v, **params)
  terms = []
  if type(dx) is not ad.Zero:
    terms.append(prim.bind(_masked(dx, x, params['relu']), v, **{**params, 'relu': False}))
  if type(dv) is not ad.Zero:
    terms.append(prim.bind(x, dv, **params))
  if not terms:
    return out, ad.Zero(jax.typeof(out).to_tangent_aval())
  return out, functools.reduce(jnp.add, terms)


def _input_gradient(x, data, filters, *, geo, k_hw, native, flip, relu, what):
  """The transpose in x: the conv of ``data`` with ``filters`` (mirrored where ``flip``)
  in the transposed geometry, summed over the filters that share x."""
  if relu:
    raise NotImplementedError(f'The {what} of relu(x) is not linear in x.')
  full = _conv_p.bind(data, filters, geo=_transpose(geo, x.aval.shape[-3:-1], k_hw),
                      native=native, flip=flip, relu=False)
  return [_sum_to(full, x.aval.shape), None]


def _conv_transpose(ct, x, w, *, geo, native, flip, relu):
  ct = ad.instantiate_zeros(ct)
  if ad.is_undefined_primal(x):
    return _input_gradient(x, ct, w, geo=geo, k_hw=w.shape[-3:-1], native=native,
                           flip=not flip, relu=relu, what='depthwise conv')
  dw = _weight_grad_p.bind(x, ct, geo=geo, k_hw=tuple(w.aval.shape[-3:-1]), native=native,
                           relu=relu)
  return [None, _flip(dw) if flip else dw]


def _weight_grad_transpose(ct, x, g, *, geo, k_hw, native, relu):
  ct = ad.instantiate_zeros(ct)
  if ad.is_undefined_primal(x):
    return _input_gradient(x, g, ct, geo=geo, k_hw=k_hw, native=native, flip=True,
                           relu=relu, what='depthwise weight gradient')
  return [None, _conv_p.bind(x, ct, geo=geo, native=native, flip=False, relu=relu)]


def _conv_cpu(x, w, *, geo, native, flip, relu):
  if native and x.dtype == w.dtype == jnp.float32:
    return native_lib.conv(x, w, geo, _conv_abstract(x, w, geo=geo).shape, flip, relu)
  return _conv_impl(x, w, geo=geo, flip=flip, relu=relu)


def _weight_grad_cpu(x, g, *, geo, k_hw, native, relu):
  if native and x.dtype == g.dtype == jnp.float32:
    return native_lib.weight_grad(
        x, g, geo, _weight_grad_abstract(x, g, geo=geo, k_hw=k_hw).shape, relu)
  return _weight_grad_impl(x, g, geo=geo, k_hw=k_hw, relu=relu)


def _batch_shared_input(prim, core, args, dims, **params):
  """Batching of the conv primitives: x [*Bx, N, H, W, C] may have fewer leading axes
  than the other operand (*Bx its last ones), which it is then shared by, so an input
  that is not mapped (the edges of a vmapped mixed op reading one state) is not copied
  per edge. ``core`` is the other operand's rank without leading axes."""
  (x, v), (dx, dv) = args, dims
  size = x.shape[dx] if dx is not None else v.shape[dv]
  v = jnp.broadcast_to(v, (size, *v.shape)) if dv is None else jnp.moveaxis(v, dv, 0)
  if dx is not None:
    x = jnp.moveaxis(x, dx, 0)
    lead = v.shape[:v.ndim - core]
    if x.shape[:x.ndim - 4] != lead:  # mapped, but shared along inner axes: expand.
      x = x.reshape(size, *(1,) * (len(lead) - (x.ndim - 4)), *x.shape[1:])
      x = jnp.broadcast_to(x, (*lead, *x.shape[-4:]))
  return prim.bind(x, v, **params), 0


def _batch_on_leading_axis(prim, args, dims, **params):
  """A batching rule for primitives whose implementations take leading batch axes on
  every operand: moves the vmapped axis to the front of each (broadcasting one that is
  not mapped)."""
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  args = [jnp.broadcast_to(a, (size, *a.shape)) if d is None
          else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
  return prim.bind(*args, **params), 0


def define_primitive(prim, abstract, xla_form, cpu_form, static_argnames):
  """Gives ``prim`` its abstract evaluation, eager evaluation (itself, jitted), its
  lowering to ``xla_form`` on every platform and to ``cpu_form`` on CPU (the native
  kernels exist there only; ``cpu_form`` falls back to XLA ops where they are not
  chosen), and batching on a leading axis. Both forms take the primitive's params. The
  kernels are partitioned over a device mesh by sample (`native_lib.lowers_with_devices`).
  """
  prim.def_impl(jax.jit(prim.bind, static_argnames=static_argnames))
  prim.def_abstract_eval(abstract)
  mlir.register_lowering(prim, mlir.lower_fun(xla_form, multiple_results=False))
  mlir.register_lowering(prim, mlir.lower_fun(cpu_form, multiple_results=False),
                         platform='cpu')
  native_lib.lowers_with_devices(prim)
  batching.primitive_batchers[prim] = functools.partial(_batch_on_leading_axis, prim)


define_primitive(_conv_p, _conv_abstract, _conv_impl, _conv_cpu,
                 ('geo', 'native', 'flip', 'relu'))
define_primitive(_weight_grad_p, _weight_grad_abstract, _weight_grad_impl,
                 _weight_grad_cpu, ('geo', 'k_hw', 'native', 'relu'))
define_primitive(_relu_mask_p, lambda x, t: t, _relu_mask_impl, _relu_mask_impl, ())
ad.primitive_jvps[_relu_mask_p] = functools.partial(linear_in_second_jvp, _relu_mask_p)
ad.primitive_transposes[_relu_mask_p] = lambda ct, x, t: [
    None, _relu_mask_p.bind(x, ad.instantiate_zeros(ct))]
for _prim, _core, _transpose_rule in ((_conv_p, 3, _conv_transpose),
                                      (_weight_grad_p, 4, _weight_grad_transpose)):
  batching.primitive_batchers[_prim] = functools.partial(_batch_shared_input, _prim, _core)
  ad.primitive_jvps[_prim] = functools.partial(_bilinear_jvp, _prim)
  ad.primitive_transposes[_prim] = _transpose_rule
