"""Tests of the DARTS / PC-DARTS supernet (jaxnas.spaces.darts).

Compile time dominates on CPU, so shapes are checked with `jax.eval_shape` (tracing,
no compile), parameters come from `random_variables` (conftest) instead of `init`, and
the numeric checks jit small modules once each (faster here than eager op-by-op).
"""

import functools
import itertools
import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import genotypes
from jaxnas import partial_channels as pc
from jaxnas.genotypes import PRIMITIVES, Genotype
from jaxnas.ops import primitives as ops
from jaxnas.spaces import darts

EPS = 1e-5
CONV_OPS = ('sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
SEP_OPS = ('sep_conv_3x3', 'sep_conv_5x5')
POOLS = ('max_pool_3x3', 'avg_pool_3x3')


def _x(shape, seed=0, loc=0.0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


def _applier(module, capture=None, **static):
  """Jitted train-mode ``module.apply``: f(variables, *args, key=...) -> (out, state).

  ``key`` feeds the 'channels' stream (unused by modules that do not sample); ``static``
  are keyword arguments fixed at trace time (e.g. ``train``).
  """
  mutable = ['batch_stats'] + (['intermediates'] if capture else [])

  @jax.jit
  def f(variables, args, key):
    return module.apply(variables, *args, **static, rngs={'channels': key},
                        mutable=mutable, capture_intermediates=capture or False)

  return lambda variables, *args, key=jax.random.key(1): f(variables, args, key)


def _weights(shape, seed):
  """Random positive mixing weights, distinct per entry."""
  return jnp.asarray(np.random.default_rng(seed).uniform(0.2, 1.0, shape), jnp.float32)


# --- cell topology -----------------------------------------------------------------------


def _reference_edge_rows(steps):
  """The reference cell's loop: node i reads states 0..i+1 at rows offset + j."""
  rows, offset = {}, 0
  for i in range(steps):
    for j in range(i + 2):
      rows[(i, j)] = offset + j
    offset += i + 2
  return rows


@pytest.mark.parametrize('steps', (2, 3, 4, 5))
def test_edge_topology(steps):
  rows = _reference_edge_rows(steps)
  assert darts.num_edges(steps) == len(rows)
  for (i, j), e in rows.items():
    assert darts.edge_index(i, j) == e, (i, j)
  # Every edge leaves exactly one state: the edges_from groups partition the rows.
  seen = []
  for source in range(steps + 1):  # states 0..steps (the last node feeds no edge)
    for node, e in darts.edges_from(source, steps):
      assert rows[(node, source)] == e
      seen.append(e)
  assert sorted(seen) == list(range(len(rows)))


def test_edge_topology_darts_cell():
  assert darts.num_edges(4) == 14
  assert darts.edges_from(0, 4) == [(0, 0), (1, 2), (2, 5), (3, 9)]
  assert darts.edges_from(1, 4) == [(0, 1), (1, 3), (2, 6), (3, 10)]
  assert darts.edges_from(2, 4) == [(1, 4), (2, 7), (3, 11)]
  assert darts.edges_from(4, 4) == [(3, 13)]
  assert darts.edges_from(5, 4) == []
  assert [len(darts.edges_from(s, 4)) for s in range(5)] == [4, 4, 3, 2, 1]


# --- MixedOp == sum_k w_k op_k(x) ---------------------------------------------------------


def _split_fused(variables, primitives, stride):
  """The separate ops' variables, taken from the fused MixedOp's stacked ones.

  pw0 stacks the first 1x1 conv of every conv op, sep convs first then dil convs, each
  in primitive order (for PRIMITIVES: sep_conv_3x3, sep_conv_5x5, dil_conv_3x3,
  dil_conv_5x5); pw1 the second 1x1 conv of every sep conv; bn0 / bn1 / pool_bn stack
  their BNs the same way. Depthwise kernels are '<op>_dw0' / '<op>_dw1'.
  """
  p, bs = variables['params'], variables['batch_stats']
  seps = [q for q in primitives if q in SEP_OPS]
  convs = seps + [q for q in primitives if q in CONV_OPS and q not in SEP_OPS]
  pools = [q for q in primitives if q in POOLS]
  out = {}
  for name in primitives:
    if name in CONV_OPS:
      g = convs.index(name)
      params = {'DepthwiseConv_0': p[f'{name}_dw0'], 'Conv1x1_0': {'kernel': p['pw0'][g]}}
      stats = {'BatchNorm_0': jax.tree.map(lambda a, g=g: a[g], bs['bn0'])}
      if name in SEP_OPS:
        h = seps.index(name)
        params.update(DepthwiseConv_1=p[f'{name}_dw1'], Conv1x1_1={'kernel': p['pw1'][h]})
        stats['BatchNorm_1'] = jax.tree.map(lambda a, h=h: a[h], bs['bn1'])
      out[name] = {'params': params, 'batch_stats': stats}
    elif name in POOLS:
      g = pools.index(name)
      out[name] = {'batch_stats': {
          'BatchNorm_0': jax.tree.map(lambda a, g=g: a[g], bs['pool_bn'])}}
    elif name == 'skip_connect' and stride == 2:
      out[name] = {'params': p['skip_connect'], 'batch_stats': bs['skip_connect']}
    else:
      out[name] = {}
  return out


def _check_mixed_op(primitives, stride, random_variables, seed=0):
  c = 4
  x = _x((2, 8, 8, c), seed=seed)
  w = _weights((len(primitives),), seed)
  mixed = darts.MixedOp(c, stride, primitives, train=True)
  v = random_variables(mixed, x, w, seed=seed)
  y, new = _applier(mixed)(v, x, w)
  o = math.ceil(8 / stride)
  chex.assert_shape(y, (2, o, o, c))

  separate = _split_fused(v, primitives, stride)
  ref = jnp.zeros((2, o, o, c))
  new_sep = {}
  for k, name in enumerate(primitives):
    op = ops.make_op(name, c, stride, affine=False)
    if separate[name].get('batch_stats'):
      out, upd = op.apply(separate[name], x, True, mutable=['batch_stats'])
      new_sep[name] = upd['batch_stats']
    else:
      out = op.apply(separate[name], x, True)
    chex.assert_shape(out, (2, o, o, c))
    ref = ref + w[k] * out
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

  # The stacked BNs update their running statistics exactly like the separate BNs.
  fused_new = _split_fused({'params': v['params'], 'batch_stats': new['batch_stats']},
                           primitives, stride)
  assert new_sep, 'expected some BatchNorms'
  for name, stats in new_sep.items():
    chex.assert_trees_all_close(fused_new[name]['batch_stats'], stats, rtol=1e-5, atol=1e-6)
    # ... and they really moved (train mode), so the comparison is not vacuous.
    assert not np.allclose(stats['BatchNorm_0']['mean'],
                           separate[name]['batch_stats']['BatchNorm_0']['mean'])


@pytest.mark.parametrize('stride', (1, 2))
def test_mixed_op_equals_weighted_sum_of_primitives(stride, random_variables):
  _check_mixed_op(PRIMITIVES, stride, random_variables, seed=stride)


def test_mixed_op_follows_primitive_order(random_variables):
  # Another order and a subset: the op weights follow this tuple's order.
  prims = ('dil_conv_3x3', 'skip_connect', 'none', 'sep_conv_3x3', 'avg_pool_3x3')
  _check_mixed_op(prims, 1, random_variables, seed=5)


def test_mixed_op_param_layout():
  x = jax.ShapeDtypeStruct((2, 8, 8, 6), jnp.float32)
  w = jax.ShapeDtypeStruct((8,), jnp.float32)
  v = jax.eval_shape(lambda x, w: darts.MixedOp(6, 2, PRIMITIVES, True).init(
      jax.random.key(0), x, w), x, w)
  shapes = jax.tree.map(lambda s: s.shape, v)
  assert shapes['params']['pw0'] == (4, 6, 6)
  assert shapes['params']['pw1'] == (2, 6, 6)
  assert shapes['params']['sep_conv_5x5_dw1']['kernel'] == (5, 5, 1, 6)
  assert 'dil_conv_3x3_dw1' not in shapes['params']
  assert shapes['batch_stats']['bn0']['mean'] == (4, 6)
  assert shapes['batch_stats']['pool_bn']['var'] == (2, 6)


# --- partial channels in the EdgeGroup ------------------------------------------------------

C, K = 8, 4
CK = C // K


def _edge_params(v, e):
  """Variables of edge e of a vmapped EdgeGroup, as a plain MixedOp's."""
  return jax.tree.map(lambda a: a[e], {'params': v['params']['mixed'],
                                       'batch_stats': v['batch_stats']['mixed']})


def _max_pool_2x2_ref(x):
  x = np.asarray(x)
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max((2, 4))


def test_partial_channels_compute_only_c_over_k_channels():
  s = jax.ShapeDtypeStruct((2, 8, 8, C), jnp.float32)
  opw = jax.ShapeDtypeStruct((14, 8), jnp.float32)
  ew = jax.ShapeDtypeStruct((14,), jnp.float32)
  for k, sampling in ((4, 'shuffle'), (4, 'random'), (2, 'shuffle'), (1, 'shuffle')):
    cell = darts.SearchCell(C, reduction=True, reduction_prev=False, train=True, k=k,
                            sampling=sampling)
    v = jax.eval_shape(lambda a, b, o, e, cell=cell: cell.init(
        {'params': jax.random.key(0), 'channels': jax.random.key(1)}, a, b, o, e),
        s, s, opw, ew)
    shapes = jax.tree.map(lambda t: t.shape, v['params'])
    c = C // k
    for source, n in enumerate((4, 4, 3, 2, 1)):
      mixed = shapes[f'edges_from_{source}']['mixed']
      assert mixed['pw0'] == (n, 4, c, c), (k, source, mixed['pw0'])
      assert mixed['pw1'] == (n, 2, c, c)
      assert mixed['sep_conv_3x3_dw0']['kernel'] == (n, 3, 3, 1, c)
      assert ('skip_connect' in mixed) == (source < 2)  # FactorizedReduce on stride 2
    # The preprocessing still sees all channels.
    assert shapes['preprocess1']['Conv1x1_0']['kernel'] == (C, C)

  group = darts.EdgeGroup(3, C, 2, 4, 'shuffle', PRIMITIVES, True)
  out = jax.eval_shape(lambda a, w: group.init_with_output(jax.random.key(0), a, w)[0],
                       s, jax.ShapeDtypeStruct((3, 8), jnp.float32))
  chex.assert_shape(out.mixed, (3, 2, 4, 4, CK))
  chex.assert_shape(out.bypass, (2, 4, 4, C - CK))
  assert out.channels is None


def test_random_sampling_bypassed_channels_pass_unchanged(random_variables):
  s = _x((2, 6, 6, C), seed=11, loc=0.5)
  w = jax.nn.softmax(_x((3, 8), seed=12), -1)
  group = darts.EdgeGroup(3, C, 1, K, 'random', PRIMITIVES, train=True)
  rngs = {'params': jax.random.key(0), 'channels': jax.random.key(1)}
  v = random_variables(group, s, w, rngs=rngs)
  run = _applier(group)
  out, _ = run(v, s, w, key=jax.random.key(1))
  mixed_op = _applier(darts.MixedOp(CK, 1, PRIMITIVES, True))
  chex.assert_shape(out.mixed, (3, 2, 6, 6, CK))
  chex.assert_shape(out.channels, (3, CK))
  np.testing.assert_array_equal(out.bypass, s)
  sn = np.asarray(s)
  for e in range(3):
    idx = np.asarray(out.channels[e])
    assert len(set(idx.tolist())) == CK
    # The combined edge output as the cell builds it: bypass * keep + scatter(mixed).
    keep = 1.0 - jnp.zeros((C,)).at[idx].set(1.0)
    edge = np.asarray(out.bypass * keep + pc.scatter_channels(out.mixed[e], idx, C))
    others = np.setdiff1d(np.arange(C), idx)
    np.testing.assert_array_equal(edge[..., others], sn[..., others])
    np.testing.assert_array_equal(edge[..., idx], out.mixed[e])
    # The mixed op ran on exactly the selected channels, with this edge's parameters.
    ref = mixed_op(_edge_params(v, e), s[..., idx], w[e])[0]
    np.testing.assert_allclose(out.mixed[e], ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ref, sn[..., idx], atol=1e-2)  # the op did change them

  # Same 'channels' key -> same selection; other keys -> other selections.
  again, _ = run(v, s, w, key=jax.random.key(1))
  np.testing.assert_array_equal(again.channels, out.channels)
  np.testing.assert_array_equal(again.mixed, out.mixed)
  selections = {tuple(np.asarray(out.channels).ravel().tolist())}
  for seed in (2, 3):
    other, _ = run(v, s, w, key=jax.random.key(seed))
    selections.add(tuple(np.asarray(other.channels).ravel().tolist()))
  assert len(selections) == 3


@pytest.mark.parametrize('stride', (1, 2))
def test_shuffle_sampling_bypass_and_mixed_channels(stride, random_variables):
  s = _x((2, 8, 8, C), seed=20 + stride)
  w = jax.nn.softmax(_x((2, 8), seed=30 + stride), -1)
  group = darts.EdgeGroup(2, C, stride, K, 'shuffle', PRIMITIVES, train=True)
  v = random_variables(group, s, w, seed=stride)
  out, _ = _applier(group)(v, s, w)
  mixed_op = _applier(darts.MixedOp(CK, stride, PRIMITIVES, True))
  assert out.channels is None
  sn = np.asarray(s)
  if stride == 1:
    np.testing.assert_array_equal(out.bypass, sn[..., CK:])
  else:
    np.testing.assert_array_equal(out.bypass, _max_pool_2x2_ref(sn[..., CK:]))
  # The first C/K channels go through the mixed op.
  for e in range(2):
    ref = mixed_op(_edge_params(v, e), s[..., :CK], w[e])[0]
    np.testing.assert_allclose(out.mixed[e], ref, rtol=1e-5, atol=1e-5)
  assert not np.allclose(out.mixed[0], out.mixed[1], atol=1e-3)  # per-edge weights


# --- a whole SearchCell against a reference written from the PC-DARTS code ------------------

CELL_PRIMS = ('none', 'skip_connect')  # keeps the reference simple: 0, identity / FR


def _bn_train(y):
  return (y - y.mean((0, 1, 2))) / np.sqrt(y.var((0, 1, 2)) + EPS)


def _relu(y):
  return np.maximum(y, 0.0)


def _factorized_reduce_ref(h, wa, wb):
  return _bn_train(np.concatenate(
      [(_relu(h) @ wa)[:, ::2, ::2], (_relu(h)[:, 1:, 1:] @ wb)[:, ::2, ::2]], -1))


def _shuffle_ref(x, groups):
  c = x.shape[-1]
  out = np.empty_like(x)
  for g, j in itertools.product(range(groups), range(c // groups)):
    out[..., j * groups + g] = x[..., g * (c // groups) + j]
  return out


def _cell_ref(v, s0, s1, opw, ew, k, sampling, reduction, channels):
  """PC-DARTS search cell (model_search.py), per edge, float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v['params'])
  opw, ew = np.asarray(opw, np.float64), np.asarray(ew, np.float64)
  states = [_bn_train(_relu(np.asarray(s, np.float64)) @ p[f'preprocess{i}']['Conv1x1_0'][
      'kernel']) for i, s in enumerate((s0, s1))]
  c = C // k

  def edge(h, e, source, node):
    stride = 2 if reduction and source < 2 else 1
    pos = node - max(0, source - 1)  # the edges leaving `source` go to nodes in order
    pool = _max_pool_2x2_ref if stride == 2 else (lambda t: t)

    def mixed_op(xs):  # w_none * 0 + w_skip * skip(xs)
      if stride == 1:
        return opw[e, 1] * xs
      fr = p[f'edges_from_{source}']['mixed']['skip_connect']
      return opw[e, 1] * _factorized_reduce_ref(xs, fr['Conv1x1_0']['kernel'][pos],
                                                fr['Conv1x1_1']['kernel'][pos])

    if k == 1:
      return mixed_op(h)
    if sampling == 'shuffle':
      return _shuffle_ref(np.concatenate([mixed_op(h[..., :c]), pool(h[..., c:])], -1), k)
    idx = np.asarray(channels[source][pos])
    out = pool(h).copy()
    out[..., idx] = mixed_op(h[..., idx])
    return out

  offset = 0
  for node in range(4):
    states.append(sum(ew[offset + j] * edge(h, offset + j, j, node)
                      for j, h in enumerate(states)))
    offset += len(states) - 1
  return np.concatenate(states[2:], -1)


@pytest.mark.parametrize('k,sampling,reduction,impl', [
    (1, 'shuffle', False, 'auto'), (1, 'shuffle', True, 'auto'),
    (4, 'shuffle', False, 'shifted'), (4, 'shuffle', True, 'shifted'),
    (4, 'shuffle', False, 'xla'), (4, 'shuffle', True, 'xla'),
    (4, 'random', False, 'auto'), (4, 'random', True, 'auto')])
def test_search_cell_matches_reference(k, sampling, reduction, impl, random_variables):
  # impl 'shifted' selects and shuffles the partial channels by matmuls, 'xla' by slicing.
  s0, s1 = _x((2, 8, 8, 6), seed=40), _x((2, 8, 8, 5), seed=41)
  skip_w = np.random.default_rng(42).uniform(0.3, 0.9, 14)
  opw = jnp.asarray(np.stack([1 - skip_w, skip_w], -1), jnp.float32)
  ew = _weights((14,), 43)
  cell = darts.SearchCell(C, reduction, reduction_prev=False, train=True, k=k,
                          sampling=sampling, primitives=CELL_PRIMS, impl=impl)
  rngs = {'params': jax.random.key(0), 'channels': jax.random.key(1)}
  v = random_variables(cell, s0, s1, opw, ew, rngs=rngs)
  run = _applier(cell, capture=lambda mdl, _: isinstance(mdl, darts.EdgeGroup))
  y, state = run(v, s0, s1, opw, ew, key=jax.random.key(1))
  o = 4 if reduction else 8
  chex.assert_shape(y, (2, o, o, 4 * C))
  channels = None
  if sampling == 'random':
    channels = [state['intermediates'][f'edges_from_{j}']['__call__'][0].channels
                for j in range(5)]
  ref = _cell_ref(v, s0, s1, opw, ew, k, sampling, reduction, channels)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


# --- the network ---------------------------------------------------------------------------

NET_MODES = {'darts_k1': dict(k=1), 'pc_shuffle': dict(k=4, sampling='shuffle'),
             'pc_random': dict(k=4, sampling='random')}
RNGS = {'params': jax.random.key(0), 'channels': jax.random.key(1)}


def _net_shapes(net, shape, **kwargs):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: net.init_with_output(RNGS, x, True, **kwargs), x)


@pytest.mark.parametrize('mode,edge_norm', [
    ('darts_k1', False), ('pc_shuffle', False), ('pc_shuffle', True), ('pc_random', False),
    ('pc_random', True)])
@pytest.mark.parametrize('shape', ((2, 32, 32, 3), (2, 28, 28, 1)), ids=('cifar', 'fmnist'))
def test_search_network_shapes(mode, edge_norm, shape):
  net = darts.SearchNetwork(10, C=8, layers=5, stem='cifar', edge_normalization=edge_norm,
                            **NET_MODES[mode])
  logits, v = _net_shapes(net, shape, capture_intermediates=True)
  chex.assert_shape(logits, (2, 10))
  assert logits.dtype == jnp.float32
  arch = jax.tree.map(lambda s: s.shape, v['arch'])
  expected = {'alphas_normal': (14, 8), 'alphas_reduce': (14, 8)}
  if edge_norm:
    expected.update(betas_normal=(14,), betas_reduce=(14,))
  assert arch == expected
  # Reductions at L//3 and 2L//3 halve H, W and double C; cells output 4C.
  h = shape[1]
  sizes = [(h, 32), (-(-h // 2), 64), (-(-h // 2), 64), (-(-h // 4), 128), (-(-h // 4), 128)]
  for i, (hw, c) in enumerate(sizes):
    chex.assert_shape(v['intermediates'][f'cell_{i}']['__call__'][0], (2, hw, hw, c))


def test_search_network_imagenet_stem_shapes():
  # Three stride-2 convs: s0 at H/4, s1 at H/8; the first cell reduces s0 (reduction_prev).
  net = darts.SearchNetwork(10, C=8, layers=3, stem='imagenet', k=2, edge_normalization=True)
  logits, v = _net_shapes(net, (2, 64, 64, 3), capture_intermediates=True)
  chex.assert_shape(logits, (2, 10))
  inter = v['intermediates']
  chex.assert_shape(inter['cell_0']['__call__'][0], (2, 8, 8, 32))
  chex.assert_shape(inter['cell_1']['__call__'][0], (2, 4, 4, 64))
  chex.assert_shape(inter['cell_2']['__call__'][0], (2, 2, 2, 128))
  kernels = jax.tree.map(lambda t: t.shape, v['params']['cell_0']['preprocess0'])
  assert set(kernels) == {'Conv1x1_0', 'Conv1x1_1'}  # FactorizedReduce


def test_random_sampling_needs_channels_rng():
  net = darts.SearchNetwork(10, C=8, layers=3, k=4, sampling='random')
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  v = jax.eval_shape(lambda x: net.init(RNGS, x, True), x)
  with pytest.raises(flax.errors.InvalidRngError, match='channels'):
    jax.eval_shape(lambda v, x: net.apply(v, x, True, mutable=['batch_stats']), v, x)


def test_arch_init_scale():
  # 1e-3 * N(0, 1), as in the reference. A real init compiles one initializer per
  # parameter shape, so this network uses parameter-light primitives (init code is the same).
  net = darts.SearchNetwork(10, C=4, layers=1, edge_normalization=True,
                            primitives=('none', 'max_pool_3x3', 'avg_pool_3x3'))
  init = jax.jit(lambda key: net.init(key, jnp.ones((2, 4, 4, 1)), True))
  arch = init(jax.random.key(0))['arch']
  chex.assert_shape([arch['alphas_normal'], arch['alphas_reduce']], (14, 3))
  values = np.concatenate([np.ravel(a) for a in jax.tree.leaves(arch)])
  assert len(values) == 2 * 14 * 3 + 2 * 14
  assert 0.6e-3 < values.std() < 1.5e-3, values.std()
  assert abs(values.mean()) < 4e-4
  assert not np.allclose(arch['alphas_normal'], arch['alphas_reduce'])
  assert not np.allclose(arch['betas_normal'], arch['betas_reduce'])
  assert not np.allclose(init(jax.random.key(1))['arch']['alphas_normal'],
                         arch['alphas_normal'])


def test_search_network_forward_random_sampling(random_variables):
  # A real forward of two reduction cells (the second with reduction_prev). The
  # primitives are cut to one of each kind to keep the compile short; the full set is
  # checked above (MixedOp, EdgeGroup) and traced in test_search_network_shapes.
  net = darts.SearchNetwork(10, C=4, layers=2, k=4, sampling='random',
                            edge_normalization=True,
                            primitives=('none', 'max_pool_3x3', 'skip_connect', 'dil_conv_3x3'))
  x = _x((2, 8, 8, 3), seed=50)
  v = random_variables(net, x, True, rngs=RNGS)
  fwd = _applier(net, train=True)
  logits, new = fwd(v, x, key=jax.random.key(1))
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite((logits, new))
  same, _ = fwd(v, x, key=jax.random.key(1))
  np.testing.assert_array_equal(same, logits)
  other, _ = fwd(v, x, key=jax.random.key(2))
  assert not np.allclose(other, logits, rtol=1e-4, atol=1e-4)
  # Train mode moved the running statistics.
  assert not np.allclose(new['batch_stats']['cell_0']['preprocess1']['BatchNorm_0']['mean'],
                         v['batch_stats']['cell_0']['preprocess1']['BatchNorm_0']['mean'])
  # Rematerialized cells compute the same function (same channel samples included).
  remat_logits, remat_new = _applier(net.clone(remat=True), train=True)(
      v, x, key=jax.random.key(1))
  np.testing.assert_allclose(remat_logits, logits, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(remat_new, new, rtol=1e-5, atol=1e-5)


def test_cpu_path_gradients_equal_the_xla_path(random_variables):
  # impl 'shifted' (the CPU path: shifted-sum depthwise convs, matmul channel selection,
  # ops.scale for the mixing weights) against 'xla' (grouped convs, slices, products), in
  # float64 so that the two summation orders agree to far below any wrong rule's error.
  # Two nodes per cell keep the float64 programs small; layers=3 has both cell kinds.
  net = darts.SearchNetwork(10, C=4, layers=3, steps=2, multiplier=2, k=4, sampling='shuffle',
                            edge_normalization=True, impl='xla')
  x = _x((2, 8, 8, 3), seed=51)
  v = random_variables(net, x, True, rngs=RNGS)
  with jax.enable_x64(True):
    v64, x64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (v, x))

    def grads(module):
      def loss(params, arch):
        logits, _ = module.apply({**v64, 'params': params, 'arch': arch}, x64, True,
                                 rngs={'channels': jax.random.key(3)},
                                 mutable=['batch_stats'])
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
      return jax.jit(jax.grad(loss, (0, 1)))(v64['params'], v64['arch'])

    xla_grads = grads(net)
    cpu_grads = grads(net.clone(impl='shifted'))
  chex.assert_trees_all_close(cpu_grads, xla_grads, rtol=1e-7, atol=1e-9)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(xla_grads[1]))


def test_mixing_weights():
  net = darts.SearchNetwork(10, edge_normalization=True)
  rng = np.random.default_rng(0)
  arch = {name: jnp.asarray(rng.normal(size=s), jnp.float32)
          for name, s in net.arch_shapes().items()}
  w = net.mixing_weights(arch)
  for kind in ('normal', 'reduce'):
    op_w, edge_w = w[kind]
    a = np.asarray(arch[f'alphas_{kind}'], np.float64)
    np.testing.assert_allclose(op_w, np.exp(a) / np.exp(a).sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(edge_w, pc.edge_normalization(arch[f'betas_{kind}'], 4),
                               rtol=1e-6)
  no_betas = darts.SearchNetwork(10).mixing_weights(
      {k: a for k, a in arch.items() if k.startswith('alphas')})
  np.testing.assert_array_equal(no_betas['normal'][1], np.ones(14))


# --- derive_genotype ---------------------------------------------------------------------------


def _alphas(spec, seed=0):
  """(14, 8) alphas from {edge: (op, logit, none_logit)}; other entries small noise."""
  a = np.random.default_rng(seed).normal(0, 0.01, (14, len(PRIMITIVES)))
  for e, (op, logit, none_logit) in spec.items():
    a[e, PRIMITIVES.index(op)] = logit
    a[e, 0] = none_logit
  return a


def _spec(cell):
  """cell: per node, per input j, (op, logit, none_logit)."""
  rows = _reference_edge_rows(4)
  return {rows[(i, j)]: cell[i][j] for i in range(4) for j in range(i + 2)}


# Node 0: input 1's 'none' dominates (12 vs 6) but both edges are kept and 'none' is
# never chosen. Node 3: input 0's 'none' is huge, so that edge is the weakest.
NORMAL = [
    [('sep_conv_3x3', 9, 0), ('dil_conv_3x3', 6, 12)],
    [('avg_pool_3x3', 3, 0), ('max_pool_3x3', 9, 0), ('skip_connect', 6, 0)],
    [('sep_conv_5x5', 8, 0), ('dil_conv_5x5', 2, 0), ('skip_connect', 4, 0),
     ('sep_conv_3x3', 10, 0)],
    [('sep_conv_3x3', 12, 20), ('avg_pool_3x3', 3, 0), ('dil_conv_3x3', 11, 0),
     ('max_pool_3x3', 1, 0), ('sep_conv_5x5', 7, 0)],
]
NORMAL_GENE = [('sep_conv_3x3', 0), ('dil_conv_3x3', 1),
               ('max_pool_3x3', 1), ('skip_connect', 2),
               ('sep_conv_3x3', 3), ('sep_conv_5x5', 0),
               ('dil_conv_3x3', 2), ('sep_conv_5x5', 4)]
REDUCE = [
    [('max_pool_3x3', 5, 0), ('skip_connect', 7, 0)],
    [('dil_conv_5x5', 8, 0), ('avg_pool_3x3', 2, 0), ('sep_conv_5x5', 6, 0)],
    [('sep_conv_3x3', 1, 0), ('max_pool_3x3', 9, 0), ('dil_conv_3x3', 3, 0),
     ('skip_connect', 7, 0)],
    [('avg_pool_3x3', 2, 0), ('sep_conv_3x3', 3, 0), ('dil_conv_5x5', 4, 0),
     ('skip_connect', 10, 0), ('sep_conv_5x5', 9, 0)],
]
REDUCE_GENE = [('skip_connect', 1), ('max_pool_3x3', 0),
               ('dil_conv_5x5', 0), ('sep_conv_5x5', 2),
               ('max_pool_3x3', 1), ('skip_connect', 3),
               ('skip_connect', 3), ('sep_conv_5x5', 4)]


def test_derive_genotype_picks_ops_and_strongest_edges():
  arch = {'alphas_normal': _alphas(_spec(NORMAL)), 'alphas_reduce': _alphas(_spec(REDUCE), 1)}
  g = darts.derive_genotype(arch)
  assert g == Genotype(NORMAL_GENE, [2, 3, 4, 5], REDUCE_GENE, [2, 3, 4, 5])
  assert all(op != 'none' for op, _ in g.normal + g.reduce)
  genotypes.validate(g)
  # jax arrays work as well as numpy ones.
  assert darts.derive_genotype(jax.tree.map(jnp.asarray, arch)) == g


def test_derive_genotype_betas_change_kept_edges():
  # Node 1 (rows 2, 3, 4 = inputs 0, 1, 2): by alphas input 2 > 1 > 0, so inputs 2 and 1
  # are kept. Betas favouring input 0 (softmax over the node's 3 edges: 0.95, 0.047,
  # 0.002) make input 0 strongest and input 1 second.
  arch = {'alphas_normal': _alphas(_spec(NORMAL)), 'alphas_reduce': _alphas(_spec(REDUCE), 1)}
  plain = darts.derive_genotype(arch)
  assert plain.normal[2:4] == [('max_pool_3x3', 1), ('skip_connect', 2)]

  betas_normal = np.zeros(14)
  betas_normal[2:5] = [3.0, 0.0, -3.0]
  # Scaling by beta: input 0 = 0.95 * softmax(3 vs 0s) = 0.95 * 0.74 = 0.70 > input 1 =
  # 0.047 * 1.0 > input 2 = 0.0024 * 0.98.
  with_betas = darts.derive_genotype(dict(arch, betas_normal=betas_normal,
                                          betas_reduce=np.zeros(14)))
  expected = list(NORMAL_GENE)
  expected[2:4] = [('avg_pool_3x3', 0), ('max_pool_3x3', 1)]
  assert with_betas.normal == expected
  # Equal betas within a node change nothing (the reduce cell here).
  assert with_betas.reduce == plain.reduce == REDUCE_GENE


def test_derive_genotype_betas_reorder_node0():
  # With betas only the weighted strength decides the order: node 0 flips.
  arch = {'alphas_normal': _alphas(_spec(NORMAL)), 'alphas_reduce': _alphas(_spec(REDUCE), 1)}
  betas = np.zeros(14)
  betas[0:2] = [-4.0, 4.0]
  g = darts.derive_genotype(dict(arch, betas_normal=betas, betas_reduce=np.zeros(14)))
  assert g.normal[:2] == [('dil_conv_3x3', 1), ('sep_conv_3x3', 0)]


def _alphas_for(gene, seed):
  """Alphas whose derived cell is `gene`: kept edges strong (decreasing in list order)."""
  rows = _reference_edge_rows(4)
  a = np.random.default_rng(seed).normal(0, 0.01, (14, len(PRIMITIVES)))
  for idx, (op, j) in enumerate(gene):
    a[rows[(idx // 2, j)], PRIMITIVES.index(op)] = 8.0 - (idx % 2)
  return a


@pytest.mark.parametrize('name', tuple(genotypes.PUBLISHED))
def test_derive_genotype_recovers_published_cells(name):
  g = genotypes.PUBLISHED[name]
  arch = {'alphas_normal': _alphas_for(g.normal, 0), 'alphas_reduce': _alphas_for(g.reduce, 1)}
  derived = darts.derive_genotype(arch)
  assert derived == genotypes.validate(g)


def test_op_params_count_each_ops_weights():
  # sep: two (depthwise k*k*C + pointwise C*C); dil: one; FactorizedReduce: 2 * (C/2 * C).
  C8 = 8
  assert darts.op_params('sep_conv_3x3', C8) == 2 * (9 * C8 + C8 * C8) == 272
  assert darts.op_params('sep_conv_5x5', C8) == 2 * (25 * C8 + C8 * C8)
  assert darts.op_params('dil_conv_5x5', C8) == 25 * C8 + C8 * C8
  assert darts.op_params('skip_connect', C8) == 0
  assert darts.op_params('skip_connect', C8, stride=2) == C8 * C8
  assert darts.op_params('max_pool_3x3', C8, stride=2) == 0
  costs = darts.op_costs(PRIMITIVES, C8)
  assert costs[PRIMITIVES.index('sep_conv_5x5')] == 1.0
  np.testing.assert_allclose(costs[PRIMITIVES.index('sep_conv_3x3')], 272 / 528)


def _two_op_alphas(gap, seed):
  """Alphas where every edge prefers sep_conv_5x5 over max_pool_3x3 by ``gap`` logits."""
  a = np.random.default_rng(seed).normal(0, 1e-3, (14, len(PRIMITIVES)))
  a[:, PRIMITIVES.index('sep_conv_5x5')] += gap
  a[:, PRIMITIVES.index('max_pool_3x3')] += gap - 0.1
  return a


def test_cost_penalty_trades_weight_for_cost():
  arch = {'alphas_normal': _alphas(_spec(NORMAL)), 'alphas_reduce': _alphas(_spec(REDUCE), 1)}
  assert darts.derive_genotype(arch, cost_penalty=0.0) == darts.derive_genotype(arch)
  # sep_conv_5x5 leads max_pool_3x3 by 0.1 logits on every edge: a penalty below 0.1
  # (per the heaviest op's weights) keeps it, one above swaps it for the free op.
  arch = {'alphas_normal': _two_op_alphas(1.0, 0), 'alphas_reduce': _two_op_alphas(1.0, 1)}
  ops_of = lambda g: {op for op, _ in g.normal + g.reduce}
  assert ops_of(darts.derive_genotype(arch, cost_penalty=0.05, C=8)) == {'sep_conv_5x5'}
  assert ops_of(darts.derive_genotype(arch, cost_penalty=0.2, C=8)) == {'max_pool_3x3'}
  # Edges are ranked by penalized score: a cheap edge overtakes a stronger costly one.
  a = np.zeros((14, len(PRIMITIVES)))
  a[0, PRIMITIVES.index('sep_conv_5x5')] = 2.0  # node 0, input 0: strong but heavy
  a[1, PRIMITIVES.index('skip_connect')] = 1.8  # node 0, input 1: a little weaker, free
  a[2:, PRIMITIVES.index('avg_pool_3x3')] = 1.0
  arch = {'alphas_normal': a, 'alphas_reduce': a}
  plain = darts.derive_genotype(arch, C=8)
  assert plain.normal[:2] == [('sep_conv_5x5', 0), ('skip_connect', 1)]
  costly = darts.derive_genotype(arch, cost_penalty=0.5, C=8)
  assert costly.normal[:2] == [('skip_connect', 1), ('sep_conv_5x5', 0)]
  # In a reduction cell skip_connect from an input is a FactorizedReduce (C*C weights).
  assert darts.op_costs(PRIMITIVES, 8, 2)[PRIMITIVES.index('skip_connect')] == 64 / 528
  for bad in (-0.1, float('nan'), float('inf')):
    with pytest.raises(ValueError, match='cost_penalty'):
      darts.derive_genotype(arch, cost_penalty=bad)


# --- the scanned cell (GPU / TPU form) --------------------------------------------------------


@pytest.mark.parametrize('steps', [2, 3, 4, 5])
def test_inner_schedule_covers_every_inner_edge_once_in_order(steps):
  width, rounds = darts.inner_schedule(steps)
  assert len(rounds) == steps - 1 and all(len(r) == width for r in rounds)
  real = [(j, i) for r in rounds for j, i in r if i < steps]
  assert sorted(real) == sorted((j, i) for i in range(steps) for j in range(i))
  for t, r in enumerate(rounds):
    assert r[0] == (t, t + 1)  # the chain edge: node t + 1 is complete after round t
    # Each edge reads a node complete by round t and feeds a node not yet read.
    assert all(j <= t < i for j, i in r)
    assert all(j == t for j, i in r if i == steps)  # padding reads the round's node
  if steps == 4:
    assert width == 2 and len(real) == 6  # 3 rounds of 2 edges, none padded


# A few ops keep the programs small; the cells' structure does not depend on them.
FEW_OPS = ('none', 'skip_connect', 'max_pool_3x3', 'sep_conv_3x3')


@pytest.mark.parametrize('reduction,k,steps,edge_norm', [
    (True, 4, 4, True),    # a PC-DARTS reduction cell: values, statistics and gradients
    (False, 2, 3, True),   # a padded schedule: values and statistics
])
def test_scanned_cell_computes_the_unrolled_cell(reduction, k, steps, edge_norm):
  n = darts.num_edges(steps)
  kw = dict(features=C, reduction=reduction, reduction_prev=False, train=True, steps=steps,
            multiplier=steps, k=k, sampling='shuffle', primitives=FEW_OPS, impl='xla')
  unrolled, scanned = darts.SearchCell(**kw), darts.ScannedCell(**kw)
  s0, s1 = _x((2, 4, 4, C), seed=1), _x((2, 4, 4, C), seed=2)
  opw = jax.nn.softmax(_x((n, len(FEW_OPS)), seed=3), -1)
  ew = jax.nn.softmax(_x((n,), seed=4)) * 3 if edge_norm else None
  variables = unrolled.init({'params': jax.random.key(0)}, s0, s1, opw, ew)
  rng = np.random.default_rng(5)  # non-trivial statistics and weights
  variables = jax.tree.map(lambda a: a + jnp.asarray(rng.uniform(-0.3, 0.3, a.shape),
                                                     a.dtype), variables)
  converted = darts.scanned_variables(variables, steps)
  expected = jax.eval_shape(lambda: scanned.init({'params': jax.random.key(0)}, s0, s1, opw,
                                                 ew))
  chex.assert_trees_all_equal_shapes(converted, expected)

  def run(module, v, s0, s1, opw, ew):
    out, updates = module.apply(v, s0, s1, opw, ew, mutable=['batch_stats'])
    return out, updates['batch_stats']

  def loss(module, v, s0, s1, opw, ew):
    out = run(module, v, s0, s1, opw, ew)[0]
    return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape)))

  args = (s0, s1, opw, ew)
  out_u, stats_u = jax.jit(functools.partial(run, unrolled))(variables, *args)
  out_s, stats_s = jax.jit(functools.partial(run, scanned))(converted, *args)
  np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-5)
  stats_u = darts.scanned_variables({'batch_stats': stats_u}, steps)['batch_stats']
  pad = [(t, e) for t, r in enumerate(darts.inner_schedule(steps)[1])
         for e, (_, i) in enumerate(r) if i == steps]
  assert bool(pad) == (steps == 3)
  for t, e in pad:  # the padding edge's statistics have no counterpart
    stats_s['inner_edges'] = jax.tree.map(lambda a, b, t=t, e=e: a.at[t, e].set(b[t, e]),
                                          stats_s['inner_edges'], stats_u['inner_edges'])
  chex.assert_trees_all_close(stats_s, stats_u, rtol=1e-5, atol=1e-5)
  if steps == 4:
    argnums = (0, 1, 2, 3, 4)
    grads_u = jax.jit(jax.grad(functools.partial(loss, unrolled), argnums))(variables, *args)
    grads_s = jax.jit(jax.grad(functools.partial(loss, scanned), argnums))(converted, *args)
    chex.assert_trees_all_close(grads_s[0], darts.scanned_variables(grads_u[0], steps),
                                rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_s[1:], grads_u[1:]):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_scanned_cell_with_random_channels_and_the_cell_form_field():
  ops_ = ('none', 'skip_connect', 'max_pool_3x3')  # no convs: a small program
  cell = darts.ScannedCell(C, reduction=False, reduction_prev=False, train=True, k=K,
                           sampling='random', primitives=ops_, impl='xla')
  s = _x((2, 4, 4, C), seed=6)
  opw = jax.nn.softmax(_x((14, len(ops_)), seed=7), -1)
  rngs = {'params': jax.random.key(0), 'channels': jax.random.key(1)}
  variables = cell.init(rngs, s, s, opw, None)
  # (These ops have no weights, only the pools' BN statistics.)
  assert set(variables['batch_stats']) == {'preprocess0', 'preprocess1', 'input_edges',
                                           'inner_edges'}
  run = jax.jit(lambda v, key: cell.apply(v, s, s, opw, None, rngs={'channels': key},
                                          mutable=['batch_stats'])[0])
  a, b = run(variables, jax.random.key(2)), run(variables, jax.random.key(3))
  chex.assert_shape(a, (2, 4, 4, 4 * C))
  chex.assert_tree_all_finite(a)
  assert not np.allclose(a, b)  # fresh channels per call
  assert darts.resolve_cell_form('auto') == 'unrolled'  # on the CPU
  net = darts.SearchNetwork(num_classes=10, C=C, layers=3, cell_form='rolled')
  with pytest.raises(ValueError, match="cell_form is 'rolled'"):
    jax.eval_shape(lambda: net.init(rngs, jnp.zeros((1, 8, 8, 3)), train=True))
