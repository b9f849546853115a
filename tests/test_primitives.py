"""Tests of jaxnas.ops.primitives: the DARTS primitives against reference formulas.

References are written independently of the library: pools by explicit loops over the
in-image window, depthwise convs with lax's grouped convolution, BatchNorm by its
formula with PyTorch's running-statistics update.
"""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxnas.genotypes import PRIMITIVES
from jaxnas.ops import depthwise
from jaxnas.ops import primitives as ops

EPS = 1e-5
C = 4
# (kernel size, dilation, blocks) of the conv primitives (DARTS operations.py).
CONVS = {'sep_conv_3x3': (3, 1, 2), 'sep_conv_5x5': (5, 1, 2),
         'dil_conv_3x3': (3, 2, 1), 'dil_conv_5x5': (5, 2, 1)}


def _x(shape, seed=0, loc=0.0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def _bn_train(y, axes=(0, 1, 2)):
  y = np.asarray(y, np.float64)
  return (y - y.mean(axes)) / np.sqrt(y.var(axes) + EPS)  # biased variance


def _pool_ref(x, kind, stride):
  """3x3 pool, padding 1, over in-image pixels only (avg: count_include_pad=False)."""
  x = np.asarray(x, np.float64)
  _, h, w, _ = x.shape
  ho, wo = math.ceil(h / stride), math.ceil(w / stride)
  out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
  for i, j in itertools.product(range(ho), range(wo)):
    r0, c0 = i * stride - 1, j * stride - 1
    win = x[:, max(r0, 0):r0 + 3, max(c0, 0):c0 + 3, :]
    out[:, i, j] = win.max((1, 2)) if kind == 'max' else win.mean((1, 2))
  return out


def _depthwise_ref(x, kernel, stride, dilation):
  """PyTorch Conv2d(C, C, k, stride, dilation*(k-1)//2, dilation, groups=C, bias=False)."""
  k, c = kernel.shape[0], kernel.shape[-1]
  p = dilation * (k - 1) // 2
  return lax.conv_general_dilated(
      x, kernel.reshape(k, k, 1, c), (stride, stride), [(p, p), (p, p)],
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=c, precision=lax.Precision.HIGHEST)


def _apply(op, variables, x, train):
  if train:
    return op.apply(variables, x, True, mutable=['batch_stats'])
  return op.apply(variables, x, False), None


# --- shapes and variables of every primitive -------------------------------------


@pytest.mark.parametrize('name', PRIMITIVES)
@pytest.mark.parametrize('affine', (False, True), ids=('search', 'eval'))
def test_op_output_shape(name, affine):
  # Traced with eval_shape: no compile. stride 2 gives ceil(H/2) for odd sizes.
  for size, stride in itertools.product((8, 7), (1, 2)):
    x = jax.ShapeDtypeStruct((2, size, size, C), jnp.float32)
    op = ops.make_op(name, C, stride, affine)
    out, variables = jax.eval_shape(
        lambda x, op=op: op.init_with_output(jax.random.key(0), x, True), x)
    o = math.ceil(size / stride)
    chex.assert_shape(out, (2, o, o, C))
    assert out.dtype == jnp.float32
    params = jax.tree_util.tree_leaves_with_path(variables.get('params', {}))
    bn_params = [p for p, _ in params if p[-1].key in ('scale', 'bias')]
    has_bn = name in CONVS or (name == 'skip_connect' and stride == 2)
    if name in ('max_pool_3x3', 'avg_pool_3x3'):
      # Search mode: a non-affine BN after each pool; eval mode: no BN, no variables.
      assert ('batch_stats' in variables) == (not affine), (name, affine, variables)
      assert not params
    elif has_bn:
      assert 'batch_stats' in variables
      assert bool(bn_params) == affine, (name, affine, bn_params)
    else:  # none, identity
      assert not jax.tree_util.tree_leaves(variables)


def test_op_parameter_shapes():
  x = jax.ShapeDtypeStruct((2, 8, 8, C), jnp.float32)
  shapes = {}
  for name in PRIMITIVES:
    v = jax.eval_shape(lambda x, n=name: ops.make_op(n, C, 2, False).init(
        jax.random.key(0), x, True), x)
    shapes[name] = jax.tree.map(lambda s: s.shape, v.get('params', {}))
  assert shapes['sep_conv_5x5'] == {
      'DepthwiseConv_0': {'kernel': (5, 5, 1, C)}, 'Conv1x1_0': {'kernel': (C, C)},
      'DepthwiseConv_1': {'kernel': (5, 5, 1, C)}, 'Conv1x1_1': {'kernel': (C, C)}}
  assert shapes['dil_conv_3x3'] == {
      'DepthwiseConv_0': {'kernel': (3, 3, 1, C)}, 'Conv1x1_0': {'kernel': (C, C)}}
  assert shapes['skip_connect'] == {'Conv1x1_0': {'kernel': (C, C // 2)},
                                    'Conv1x1_1': {'kernel': (C, C // 2)}}


def test_make_op_rejects_unknown_name():
  with pytest.raises(ValueError, match='conv_7x7'):
    ops.make_op('conv_7x7', C, 1, False)


def test_factorized_reduce_rejects_odd_channels():
  with pytest.raises(ValueError, match='even'):
    ops.FactorizedReduce(3).init(jax.random.key(0), jnp.ones((1, 4, 4, 3)), True)


# --- parameter-free primitives ------------------------------------------------------


@pytest.mark.parametrize('stride', (1, 2))
def test_none_is_zero(stride):
  x = _x((2, 7, 7, C), loc=3.0)
  y = ops.make_op('none', C, stride, False).apply({}, x, True)
  chex.assert_shape(y, (2, 4 if stride == 2 else 7, 4 if stride == 2 else 7, C))
  np.testing.assert_array_equal(y, 0.0)


def test_skip_connect_stride1_is_identity():
  x = _x((2, 7, 7, C))
  np.testing.assert_array_equal(ops.make_op('skip_connect', C, 1, False).apply({}, x, True), x)


@pytest.fixture(params=('shifted', 'native'))
def cpu_form(request, monkeypatch):
  """Runs a pool test with each CPU form of the pools' derivatives ('auto' follows the
  environment variable): XLA ops, or the native kernels."""
  monkeypatch.setenv(depthwise.ENV_VAR, request.param)
  return request.param


@pytest.mark.parametrize('kind', ('max', 'avg'))
@pytest.mark.parametrize('stride,size', [(1, 8), (1, 7), (2, 8), (2, 7)])
def test_pool_matches_in_image_window(kind, stride, size, cpu_form):
  # Eval mode (affine=True): the bare pool, no BN.
  x = _x((2, size, size, 3), seed=size)
  op = ops.make_op(f'{kind}_pool_3x3', 3, stride, affine=True)
  y, _ = _apply(op, {}, x, train=False)
  np.testing.assert_allclose(y, _pool_ref(x, kind, stride), rtol=1e-6, atol=1e-6)


def test_avg_pool_does_not_count_padding(cpu_form):
  x = _x((1, 7, 7, 2), seed=3, loc=1.0)
  y = ops.avg_pool(x, 3, 1, 1)
  # Corner: 4 in-image values; edge: 6; interior: 9.
  np.testing.assert_allclose(y[0, 0, 0], x[0, :2, :2].mean((0, 1)), rtol=1e-6)
  np.testing.assert_allclose(y[0, 6, 6], x[0, 5:, 5:].mean((0, 1)), rtol=1e-6)
  np.testing.assert_allclose(y[0, 0, 3], x[0, :2, 2:5].mean((0, 1)), rtol=1e-6)
  np.testing.assert_allclose(y[0, 3, 3], x[0, 2:5, 2:5].mean((0, 1)), rtol=1e-6)
  # Stride 2 on an odd size: the last output's window is rows/cols 5..7, 7 is padding.
  y2 = ops.avg_pool(x, 3, 2, 1)
  chex.assert_shape(y2, (1, 4, 4, 2))
  np.testing.assert_allclose(y2[0, 3, 3], x[0, 5:, 5:].mean((0, 1)), rtol=1e-6)
  # Counting the padding would shrink a constant image's border.
  np.testing.assert_allclose(ops.avg_pool(jnp.ones((1, 5, 5, 1)), 3, 1, 1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('stride,size', [(1, 7), (2, 8), (2, 7)])
def test_avg_pool_native_form_matches_window_sums(stride, size):
  # The native form is a depthwise conv with a filter of ones times 1 / count.
  x = _x((2, size, size, 3), seed=size)
  g = _x(ops.avg_pool(x, 3, stride, 1, impl='xla').shape, seed=1)
  f = lambda impl: jax.value_and_grad(  # noqa: E731
      lambda t: jnp.sum(ops.avg_pool(t, 3, stride, 1, impl=impl) * g))(x)
  chex.assert_trees_all_close(f('native'), f('xla'), rtol=1e-5, atol=1e-5)
  text = jax.jit(jax.grad(lambda t: jnp.sum(jnp.sin(ops.avg_pool(t, 3, stride, 1, impl='native')))))
  assert text.lower(x).as_text().count('@jaxnas_depthwise_conv') == 2  # forward, backward


@pytest.mark.parametrize('kind', ('max', 'avg'))
def test_search_mode_pool_is_followed_by_bn(kind, cpu_form):
  x = _x((2, 7, 7, 3), seed=5, loc=2.0)
  op = ops.make_op(f'{kind}_pool_3x3', 3, 2, affine=False)
  variables = {'batch_stats': {'BatchNorm_0': {'mean': jnp.zeros(3), 'var': jnp.ones(3)}}}
  y, _ = _apply(op, variables, x, train=True)
  np.testing.assert_allclose(y, _bn_train(_pool_ref(x, kind, 2)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('size', (8, 7))
def test_max_pool_2x2_ceil_mode(size):
  x = _x((2, size, size, 3), seed=size)
  y = ops.max_pool_2x2(x)
  o = math.ceil(size / 2)
  chex.assert_shape(y, (2, o, o, 3))
  xn = np.asarray(x)
  ref = np.stack([np.stack([xn[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max((1, 2))
                            for j in range(o)], 1) for i in range(o)], 1)
  np.testing.assert_array_equal(y, ref)


def _max_pool_grad_ref(x, g, window, stride, pad):
  """Routes each output's cotangent to the first maximum of its window (row-major),
  as PyTorch's max pool and XLA's select-and-scatter do; -inf padding."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  n, h, w, c = x.shape
  xp = np.full((n, h + 2 * pad + window, w + 2 * pad + window, c), -np.inf)
  xp[:, pad:pad + h, pad:pad + w] = x
  dx = np.zeros_like(xp)
  for b, i, j, ch in itertools.product(*map(range, g.shape)):
    win = xp[b, i * stride:i * stride + window, j * stride:j * stride + window, ch]
    a, b2 = np.unravel_index(np.argmax(win), win.shape)  # argmax: the first maximum
    dx[b, i * stride + a, j * stride + b2, ch] += g[b, i, j, ch]
  return dx[:, pad:pad + h, pad:pad + w]


@pytest.mark.parametrize('ties', (False, True))
@pytest.mark.parametrize('window,stride,pad,size', [(3, 1, 1, 7), (3, 2, 1, 8), (3, 2, 1, 7),
                                                    (2, 2, 0, 8), (2, 2, 0, 7)])
def test_max_pool_gradient_goes_to_first_maximum(window, stride, pad, size, ties, cpu_form):
  x = _x((2, size, size, 3), seed=size)
  if ties:  # few distinct values: most windows hold their maximum more than once
    x = jnp.round(x)
  pool = ops.max_pool_2x2 if window == 2 else lambda t: ops.max_pool(t, window, stride, pad)
  g = _x(pool(x).shape, seed=11)
  dx = jax.jit(jax.grad(lambda t: jnp.sum(pool(t) * g)))(x)
  np.testing.assert_allclose(dx, _max_pool_grad_ref(x, g, window, stride, pad), rtol=1e-6,
                             atol=1e-6)
  # The same as autodiff of lax.reduce_window, which goes through select-and-scatter.
  ref_pool = lambda t: lax.reduce_window(  # noqa: E731
      t, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
      ((0, 0), (pad, pad + (size % 2 if window == 2 else 0)),
       (pad, pad + (size % 2 if window == 2 else 0)), (0, 0)))
  np.testing.assert_array_equal(pool(x), ref_pool(x))
  np.testing.assert_allclose(dx, jax.grad(lambda t: jnp.sum(ref_pool(t) * g))(x), rtol=1e-6,
                             atol=1e-6)


def test_max_pool_forward_mode_batching_and_second_order(cpu_form):
  x = _x((3, 2, 6, 6, 4), seed=2)  # a leading (edge) axis
  t = _x(x.shape, seed=3)
  ref = lambda v: lax.reduce_window(  # noqa: E731
      v, -jnp.inf, lax.max, (1, 1, 3, 3, 1), (1,) * 5, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  chex.assert_trees_all_close(jax.jvp(ops.max_pool, (x,), (t,)), jax.jvp(ref, (x,), (t,)))
  per_edge = jax.vmap(jax.grad(lambda v: jnp.sum(ops.max_pool(v) ** 2)))(x)
  chex.assert_trees_all_close(per_edge, jax.grad(lambda v: jnp.sum(ref(v) ** 2))(x))
  # Second order, as the unrolled DARTS arch gradient takes it.
  hess = lambda pool: jax.grad(  # noqa: E731
      lambda a: jnp.sum(jax.grad(lambda v: jnp.sum(pool(v * a) ** 2))(x) ** 2))(1.5)
  np.testing.assert_allclose(hess(ops.max_pool), hess(ref), rtol=1e-5)


def test_max_pool_transpose_is_one_gather_primitive(cpu_form):
  # The backward pass goes through the transpose primitive (a gather over padded copies
  # of the cotangent and the index), not through JAX's transpose of the tangent map (one
  # padded copy per tap). The native form also takes the primal output as the gather of
  # the input at the index, from the index kernel.
  x = _x((2, 8, 8, 3), seed=5)
  for pool in (ops.max_pool, ops.max_pool_2x2):
    native = cpu_form == 'native' and pool is ops.max_pool  # 2x2: always XLA ops
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda v, pool=pool: jnp.sum(pool(v) ** 2)))(x))
    assert jaxpr.count('jaxnas_max_pool_scatter') == 1, jaxpr
    assert jaxpr.count('jaxnas_max_pool_gather') == int(native), jaxpr
    assert jaxpr.count('jaxnas_max_pool_index') == int(native), jaxpr


def test_max_pool_backward_keeps_one_byte_per_output(cpu_form):
  # Autodiff of lax.reduce_window keeps four int32 window coordinates per output for
  # XLA:CPU's scatter, and a zeroed input-sized buffer; max_pool keeps an int8 index.
  x = _x((4, 16, 32, 32, 4), seed=4)
  ref = lambda v: lax.reduce_window(  # noqa: E731
      v, -jnp.inf, lax.max, (1, 1, 3, 3, 1), (1,) * 5, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  temp = {}
  for name, pool in (('max_pool', ops.max_pool), ('reduce_window', ref)):
    f = jax.jit(jax.grad(lambda v, pool=pool: jnp.sum(jnp.tanh(pool(v)))))
    temp[name] = f.lower(x).compile().memory_analysis().temp_size_in_bytes
  assert temp['max_pool'] < 0.5 * temp['reduce_window'], temp


def test_scale_value_and_derivatives_equal_the_plain_product():
  x, w = _x((3, 5, 4), seed=6), jnp.float32(0.7)
  np.testing.assert_array_equal(ops.scale(x, w), x * w)
  f = lambda mul: lambda x, w: jnp.sum(jnp.sin(mul(x, w)) * x)  # noqa: E731
  plain = lambda x, w: x * w  # noqa: E731
  grad = lambda mul: jax.grad(f(mul), (0, 1))  # noqa: E731
  chex.assert_trees_all_close(jax.jit(grad(ops.scale))(x, w), grad(plain)(x, w), rtol=1e-6)
  # Second order, and per-edge weights under vmap (the supernet's stacked edges).
  hess = lambda mul: jax.grad(lambda w: jnp.sum(grad(mul)(x, w)[0] ** 2))  # noqa: E731
  np.testing.assert_allclose(hess(ops.scale)(w), hess(plain)(w), rtol=1e-5)
  ws = jnp.asarray([0.2, -1.0, 3.0], jnp.float32)
  chex.assert_trees_all_close(jax.vmap(grad(ops.scale))(x, ws), jax.vmap(grad(plain))(x, ws),
                              rtol=1e-6)


# --- BatchNorm ------------------------------------------------------------------------


def test_batch_norm_train_formula_and_running_stats():
  x = _x((4, 3, 3, 5), seed=1, loc=3.0, scale=2.0)
  m0 = jnp.asarray(np.linspace(-1, 1, 5), jnp.float32)
  v0 = jnp.asarray(np.linspace(0.5, 2, 5), jnp.float32)
  bn = ops.BatchNorm(train=True)
  y, new = bn.apply({'batch_stats': {'mean': m0, 'var': v0}}, x, mutable=['batch_stats'])
  xn = np.asarray(x, np.float64)
  np.testing.assert_allclose(y, _bn_train(xn), rtol=1e-4, atol=1e-4)
  # PyTorch: running = (1 - 0.1) * running + 0.1 * batch, with the UNBIASED variance.
  mean, var_unbiased = xn.mean((0, 1, 2)), xn.var((0, 1, 2), ddof=1)
  np.testing.assert_allclose(new['batch_stats']['mean'], 0.9 * m0 + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(new['batch_stats']['var'], 0.9 * v0 + 0.1 * var_unbiased,
                             rtol=1e-5)
  # The biased variance would differ by the factor n/(n-1) = 36/35.
  assert not np.allclose(new['batch_stats']['var'], 0.9 * v0 + 0.1 * xn.var((0, 1, 2)),
                         rtol=1e-4)


def test_batch_norm_init_keeps_default_running_stats():
  v = ops.BatchNorm(train=True).init(jax.random.key(0), _x((4, 2, 2, 3), loc=5.0))
  np.testing.assert_array_equal(v['batch_stats']['mean'], 0.0)
  np.testing.assert_array_equal(v['batch_stats']['var'], 1.0)


def test_batch_norm_eval_uses_running_stats_and_affine():
  x = _x((4, 3, 3, 5), seed=2)
  m0 = jnp.asarray(np.linspace(-1, 1, 5), jnp.float32)
  v0 = jnp.asarray(np.linspace(0.5, 2, 5), jnp.float32)
  scale = jnp.asarray(np.linspace(0.5, 1.5, 5), jnp.float32)
  bias = jnp.asarray(np.linspace(-0.3, 0.3, 5), jnp.float32)
  variables = {'batch_stats': {'mean': m0, 'var': v0},
               'params': {'scale': scale, 'bias': bias}}
  # Eval mode must not write batch_stats: apply without mutable would raise if it did.
  y = ops.BatchNorm(train=False, affine=True).apply(variables, x)
  ref = (np.asarray(x) - m0) / np.sqrt(np.asarray(v0) + EPS) * scale + bias
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  y_train, _ = ops.BatchNorm(train=True, affine=True).apply(variables, x,
                                                             mutable=['batch_stats'])
  np.testing.assert_allclose(y_train, _bn_train(x) * scale + bias, rtol=1e-4, atol=1e-4)


def test_grouped_batch_norm_is_independent_bns():
  x = _x((2, 4, 3, 3, 5), seed=4, loc=1.0)
  x = x.at[1].multiply(3.0)  # groups with different statistics
  y, new = ops.BatchNorm(train=True, grouped=True).apply(
      {'batch_stats': {'mean': jnp.zeros((2, 5)), 'var': jnp.ones((2, 5))}}, x,
      mutable=['batch_stats'])
  for g in range(2):
    np.testing.assert_allclose(y[g], _bn_train(x[g]), rtol=1e-4, atol=1e-4)
  xn = np.asarray(x, np.float64)
  np.testing.assert_allclose(new['batch_stats']['var'],
                             0.9 + 0.1 * xn.var((1, 2, 3), ddof=1), rtol=1e-5)
  np.testing.assert_allclose(new['batch_stats']['mean'], 0.1 * xn.mean((1, 2, 3)),
                             rtol=1e-5)
  # Eval mode uses the running statistics per (group, channel).
  y_eval = ops.BatchNorm(train=False, grouped=True).apply(new, x)
  ref = (xn - np.asarray(new['batch_stats']['mean'])[:, None, None, None]) / np.sqrt(
      np.asarray(new['batch_stats']['var'])[:, None, None, None] + EPS)
  np.testing.assert_allclose(y_eval, ref, rtol=1e-4, atol=1e-4)


# --- FactorizedReduce, SepConv, DilConv against references ------------------------------


def test_factorized_reduce_matches_reference_on_even_input(random_variables):
  x = _x((2, 8, 8, C), seed=6)
  op = ops.make_op('skip_connect', C, 2, affine=False)
  v = random_variables(op, x, True)
  y, _ = _apply(op, v, x, train=True)
  wa = np.asarray(v['params']['Conv1x1_0']['kernel'], np.float64)
  wb = np.asarray(v['params']['Conv1x1_1']['kernel'], np.float64)
  r = np.maximum(np.asarray(x, np.float64), 0.0)
  # conv_1(relu(x)) and conv_2(relu(x)[:, :, 1:, 1:]) with 1x1 kernels at stride 2.
  ref = np.concatenate([(r @ wa)[:, ::2, ::2], (r[:, 1:, 1:] @ wb)[:, ::2, ::2]], -1)
  chex.assert_shape(y, (2, 4, 4, C))
  np.testing.assert_allclose(y, _bn_train(ref), rtol=1e-4, atol=1e-4)


def _conv_op_ref(name, v, x, stride, train):
  k, dilation, blocks = CONVS[name]
  p = v['params']

  def bn(y, i):
    if train:
      y = _bn_train(y)
    else:
      s = v['batch_stats'][f'BatchNorm_{i}']
      y = (np.asarray(y) - s['mean']) / np.sqrt(np.asarray(s['var']) + EPS)
    if 'scale' in p.get(f'BatchNorm_{i}', {}):
      y = y * p[f'BatchNorm_{i}']['scale'] + p[f'BatchNorm_{i}']['bias']
    return jnp.asarray(y, jnp.float32)

  y = x
  for i in range(blocks):
    y = _depthwise_ref(jax.nn.relu(y), p[f'DepthwiseConv_{i}']['kernel'][:, :, 0, :],
                       stride if i == 0 else 1, dilation)
    y = bn(jnp.dot(y, p[f'Conv1x1_{i}']['kernel'], precision='highest'), i)
  return y


@pytest.mark.parametrize('name', tuple(CONVS))
@pytest.mark.parametrize('affine', (False, True), ids=('search', 'eval'))
def test_conv_ops_match_reference(name, affine, random_variables):
  # Search mode runs BN on batch stats; eval mode on running stats with scale and bias.
  stride = 2
  x = _x((2, 7, 7, C), seed=7)
  op = ops.make_op(name, C, stride, affine)
  v = random_variables(op, x, True, seed=1)
  y, _ = _apply(op, v, x, train=not affine)
  ref = _conv_op_ref(name, v, x, stride, train=not affine)
  chex.assert_shape(y, (2, 4, 4, C))
  np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-4)
