"""The DARTS cell search space (Liu et al. 2019) with PC-DARTS partial channels.

A cell has two inputs (the outputs of the two previous cells), ``steps`` intermediate
nodes and an output that concatenates the last ``multiplier`` nodes. Node i sums one
edge from every earlier state (0 .. i+1), so 4 nodes give 2+3+4+5 = 14 edges. Each edge
is a mixed op: a weighted sum of all primitives.

To keep the program XLA sees small, the edges leaving one state are computed together:
their mixed ops share the input and are ``nn.vmap``-ed over stacked per-edge weights, so
a ``SearchCell`` is 5 batched mixed ops (4+4+3+2+1 edges) instead of 14 separate ones.
A ``ScannedCell`` goes further for GPU and TPU: 2 mixed ops per cell, the 8 edges from
the inputs vmapped together and the 6 between nodes as a scan over 3 rounds of 2 edges
(``SearchNetwork.cell_form``). The paper-size PC-DARTS step lowered for CUDA: 46.0k +
54.9k StableHLO ops unrolled, 25.3k + 29.8k scanned (experiments/program_size.py).
"""

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import genotypes
from jaxnas import partial_channels as pc
from jaxnas.ops import depthwise as depthwise_lib
from jaxnas.ops import primitives as ops
from jaxnas.ops import recompute as recompute_lib

PRIMITIVES = genotypes.PRIMITIVES


def num_edges(steps: int) -> int:
  return steps * (steps + 3) // 2


def edge_index(node: int, source: int) -> int:
  """Row of the alphas for the edge from state ``source`` into intermediate ``node``."""
  return node * (node +3) // 2 + source


def edges_from(source: int, steps: int) -> list[tuple[int, int]]:
  """(node, edge index) of every edge that leaves state ``source``."""
  return [(i, edge_index(i, source)) for i in range(max(0, source - 1), steps)]


def matmul_channels(impl: str) -> bool:
  """Whether partial-channel slices and shuffles are computed as matmuls with 0/1
  matrices (``partial_channels.take_channels``): on the CPU path, where the depthwise
  convs are the fused shifted sums that a slice's padding would slow down."""
  return depthwise_lib.is_cpu_form(impl)


def weighting(impl: str):
  """How the mixing weights (op weights, edge weights) scale their arrays: on the CPU
  path with ``ops.scale``, which keeps XLA:CPU from holding a full-size broadcast of
  each weight from the forward to the backward pass; elsewhere a plain product."""
  if depthwise_lib.is_cpu_form(impl):
    return ops.scale
  return lambda x, w: x * w


# (kernel size, dilation, stacked blocks) of the conv primitives.
CONV_OPS = {'sep_conv_3x3': (3, 1, 2), 'sep_conv_5x5': (5, 1, 2),
            'dil_conv_3x3': (3, 2, 1), 'dil_conv_5x5': (5, 2, 1)}
POOL_OPS = {'max_pool_3x3': ops.max_pool, 'avg_pool_3x3': ops.avg_pool}


class MixedOp(nn.Module):
  """One edge: sum_k w_k * op_k(x) over the primitives, in search mode.

  The primitives run side by side on the same input, so their like stages are computed
  together on a leading (group) axis: the 1x1 convs of all conv ops as one batched
  matmul and their BatchNorms as one grouped BN (BN is per channel, so this is exact);
  the pools likewise. The group axis leads so that every op writes and reads one
  contiguous block (no interleaving copies, no transposes around the matmul). The
  parameters are those of the separate ops, stacked. 'none' adds zero and is not
  computed; its alpha still takes part in the softmax.
  """
  features: int
  stride: int
  primitives: tuple[str, ...]
  train: bool
  impl: str = 'auto'
  bn_groups: int = 1  # BatchNorm.batch_groups: per-device statistics when > 1

  @nn.compact
  def __call__(self, x, weights):
    c, s = x.shape[-1], self.stride
    if c != self.features:
      raise ValueError(f'MixedOp maps C to C channels; got {c} for {self.features}.')
    index = {name: i for i, name in enumerate(self.primitives)}
    mul = weighting(self.impl)
    out = 0.0

    # Sep convs first: their first block's output continues into the second block.
    convs = sorted((p for p in self.primitives if p in CONV_OPS),
                   key=lambda p: -CONV_OPS[p][2])
    seps = [p for p in convs if CONV_OPS[p][2] == 2]
    if convs:
      # The convs read x through their ReLU (no rectified copy, per edge or at all).
      y = self._pointwise_bn(jnp.stack([self._depthwise(x, p, 0, s) for p in convs]),
                             'pw0', 'bn0')
      # Weighted sums over the group axis unroll into one elementwise loop each.
      out = out + sum(mul(y[g], weights[index[p]])
                      for g, p in enumerate(convs) if p not in seps)
      if seps:
        second = [self._depthwise(y[g], p, 1, 1) for g, p in enumerate(seps)]
        z = self._pointwise_bn(jnp.stack(second), 'pw1', 'bn1')
        out = out + sum(mul(z[g], weights[index[p]]) for g, p in enumerate(seps))

    pools = [p for p in self.primitives if p in POOL_OPS]
    if pools:
      y = jnp.stack([POOL_OPS[p](x, 3, s, 1, impl=self.impl) for p in pools])
      y = ops.BatchNorm(self.train, grouped=True, batch_groups=self.bn_groups,
                        name='pool_bn')(y)
      out = out + sum(mul(y[g], weights[index[p]]) for g, p in enumerate(pools))

    if 'skip_connect' in index:
      skip = x if s == 1 else ops.FactorizedReduce(c, bn_groups=self.bn_groups,
                                                   name='skip_connect')(x, self.train)
      out = out + mul(skip, weights[index['skip_connect']])
    unknown = set(self.primitives) - set(CONV_OPS) - set(POOL_OPS) - {'skip_connect', 'none'}
    if unknown:
      raise ValueError(f'Unknown primitives {sorted(unknown)} in the DARTS space.')
    return out

  def _depthwise(self, x, op, block, stride):
    """The op's depthwise conv ``block`` of relu(x)."""
    k, dilation, _ = CONV_OPS[op]
    return ops.DepthwiseConv(k, stride, dilation if block == 0 else 1, impl=self.impl,
                             relu=True, name=f'{op}_dw{block}')(x)

  def _pointwise_bn(self, y, pw_name, bn_name):
    """Per-group 1x1 convs (G, c, c) as one batched matmul, then one grouped BN."""
    g, c = y.shape[0], y.shape[-1]
    kernel = self.param(pw_name, ops.torch_init_stacked, (g, c, c))
    y = ops.pointwise(y, kernel)
    return ops.BatchNorm(self.train, grouped=True, batch_groups=self.bn_groups,
                         name=bn_name)(y)


class EdgeOutputs(NamedTuple):
  mixed: jax.Array            # (E, B, H', W', C/K): the mixed op on the selected channels
  bypass: jax.Array | None    # channels that skip the mixed op (pooled on stride-2 edges)
  channels: jax.Array | None  # (E, C/K) selected channel indices ('random' sampling)


class EdgeGroup(nn.Module):
  """The ``num_edges`` mixed ops that read the same state, as one vmapped mixed op."""
  num_edges: int
  features: int
  stride: int
  k: int
  sampling: str
  primitives: tuple[str, ...]
  train: bool
  impl: str = 'auto'
  bn_groups: int = 1

  @nn.compact
  def __call__(self, s, weights) -> EdgeOutputs:
    c = self.features // self.k
    pool = ops.max_pool_2x2 if self.stride == 2 else (lambda t: t)
    bypass = channels = None
    if self.k == 1:
      x, x_axis = s, None
    elif self.sampling == 'shuffle':
      # Reference: the first C/K channels go through the mixed op.
      by_matmul = matmul_channels(self.impl)
      x, x_axis = pc.take_channels(s, 0, c, by_matmul), None
      bypass = pool(pc.take_channels(s, c, self.features, by_matmul))
    else:
      # Fixed-size gather of C/K channels per edge: static shapes, fresh every call.
      channels = pc.sample_channels(self.make_rng('channels'), self.num_edges, self.features,
                                    self.k)
      x, x_axis = jax.vmap(lambda idx: jnp.take(s, idx, axis=-1))(channels), 0
      bypass = pool(s)
    # x is shared by all edges in the group (in_axes None) unless channels differ per edge.
    mixed = nn.vmap(
        MixedOp, in_axes=(x_axis, 0), out_axes=0,
        variable_axes={'params': 0, 'batch_stats': 0}, split_rngs={'params': True},
        axis_size=self.num_edges)(c, self.stride, self.primitives, self.train, self.impl,
                                  self.bn_groups, name='mixed')(x, weights)
    return EdgeOutputs(mixed, bypass, channels)


@functools.cache
def preprocessing(cls, recompute: bool):
  """``cls`` (ReLUConvBN or FactorizedReduce) as a module class called with the input
  alone, its ``train`` flag an attribute; recomputed in the backward pass when
  ``recompute``. The parameter and statistics paths are those of ``cls``."""

  class Preprocess(cls):
    train: bool = False

    def __call__(self, x):
      return super().__call__(x, self.train)

  Preprocess.__name__ = cls.__name__
  return recompute_lib.recompute(Preprocess) if recompute else Preprocess


class SearchCell(nn.Module):
  """A DARTS search cell; ``op_weights`` (14, num_ops), ``edge_weights`` (14,) or None
  (every edge weighs 1)."""
  features: int
  reduction: bool
  reduction_prev: bool
  train: bool
  steps: int = 4
  multiplier: int = 4
  k: int = 1
  sampling: str = 'shuffle'
  primitives: tuple[str, ...] = PRIMITIVES
  impl: str = 'auto'
  bn_groups: int = 1
  recompute_preprocessing: bool = False

  @nn.compact
  def __call__(self, s0, s1, op_weights, edge_weights):
    C = self.features
    s0, s1 = self._preprocess(s0, s1)
    states = [s0, s1]
    # Per node: (mixed op output, bypass, selected channels, edge index) of each edge in.
    incoming: list[list[tuple[jax.Array, jax.Array | None, jax.Array | None, int]]] = [
        [] for _ in range(self.steps)]

    def emit(source):
      targets = edges_from(source, self.steps)
      rows = np.array([e for _, e in targets])
      stride = 2 if self.reduction and source < 2 else 1
      out = EdgeGroup(len(targets), C, stride, self.k, self.sampling, self.primitives,
                      self.train, self.impl, self.bn_groups, name=f'edges_from_{source}')(
                          states[source], op_weights[rows])
      # One split of the stacked outputs (its gradient is one concatenation, not a
      # zero-padded copy per edge).
      mixed = [m[0] for m in jnp.split(out.mixed, len(targets))]
      for pos, (node, e) in enumerate(targets):
        channels = None if out.channels is None else out.channels[pos]
        incoming[node].append((mixed[pos], out.bypass, channels, e))

    emit(0)
    emit(1)
    for i in range(self.steps):
      states.append(self._node(incoming[i], edge_weights))
      if i + 2 <= self.steps:
        emit(i + 2)
    return jnp.concatenate(states[-self.multiplier:], axis=-1)

  def _preprocess(self, s0, s1):
    """The two inputs brought to ``features`` channels at this cell's resolution."""
    C, g, again = self.features, self.bn_groups, self.recompute_preprocessing
    # Recomputed, the preprocessing keeps only its input (the previous cell's output, kept
    # anyway) for the backward pass, not the rectified input and the 1x1 conv's output.
    first = preprocessing(ops.FactorizedReduce if self.reduction_prev else ops.ReLUConvBN,
                          again)
    s0 = first(C, affine=False, bn_groups=g, train=self.train, name='preprocess0')(s0)
    s1 = preprocessing(ops.ReLUConvBN, again)(C, affine=False, bn_groups=g, train=self.train,
                                             name='preprocess1')(s1)
    return s0, s1

  def _node(self, parts, edge_weights):
    """sum_j beta_j * edge_j; partial-channel edges are combined with their bypass."""
    C, k = self.features, self.k
    scale = weighting(self.impl)

    def mul(x, e):  # x times the weight of edge e
      return x if edge_weights is None else scale(x, edge_weights[e])

    if k == 1:
      return sum(mul(mixed, e) for mixed, _, _, e in parts)
    if self.sampling == 'shuffle':
      # The shuffle is a fixed permutation, so summing before it is exact and cheaper.
      mixed = sum(mul(m, e) for m, _, _, e in parts)
      bypass = sum(mul(b, e) for _, b, _, e in parts)
      return pc.shuffle_concat([mixed, bypass], k, matmul_channels(self.impl))
    total = 0.0
    for mixed, bypass, idx, e in parts:
      keep = 1.0 - jnp.zeros((C,), bypass.dtype).at[idx].set(1.0)
      edge = bypass * keep + pc.scatter_channels(mixed, idx, C)
      total = total + mul(edge, e)
    return total


def inner_schedule(steps: int) -> tuple[int, list[list[tuple[int, int]]]]:
  """The edges between intermediate nodes as ``steps - 1`` rounds of equal width, for
  ``ScannedCell``: round t starts once node t is complete and computes the edge node t ->
  t + 1 and, earliest deadline first, edges j -> i with j <= t < i (each before node i is
  needed). Returns (width, rounds of (source node, target node)); a target of ``steps``
  pads a round (its output is discarded). Four nodes: three rounds of two edges, no
  padding."""
  rounds = [[(t, t + 1)] for t in range(steps - 1)]
  others = sorted(((j, i) for i in range(steps) for j in range(i - 1)), key=lambda e: e[1])
  width = 1 + -(-len(others) // max(steps - 1, 1))
  for j, i in others:
    t = next(t for t in range(j, i) if len(rounds[t]) < width)
    rounds[t].append((j, i))
  for t, edges in enumerate(rounds):
    edges += [(t, steps)] * (width - len(edges))
  return width, rounds


class ScannedCell(SearchCell):
  """A DARTS search cell whose program holds two mixed ops where ``SearchCell``'s holds
  one per source state (five): the edges leaving the two inputs as one mixed op vmapped
  over 2 x ``steps`` edges, and the edges between intermediate nodes as a ``lax.scan``
  over ``steps - 1`` rounds of one mixed op vmapped over the round's edges
  (``inner_schedule``: three rounds of two edges for four nodes). It computes what
  ``SearchCell`` computes, edge for edge, up to the order of the sums
  (``scanned_variables`` maps a ``SearchCell``'s variables to this layout): a smaller
  program for GPU and TPU, whose compilers take minutes over the unrolled cells. Node
  sums are kept per node in a buffer (a last slot takes the padding edges, if any)."""

  @nn.compact
  def __call__(self, s0, s1, op_weights, edge_weights):
    C, n = self.features, self.steps
    s0, s1 = self._preprocess(s0, s1)
    if edge_weights is None:  # every edge weighs 1
      edge_weights = jnp.ones(op_weights.shape[:1], op_weights.dtype)

    def edges(name, num_groups, num_edges, stride):
      """``num_groups`` edge groups of ``num_edges`` edges, one vmapped mixed op."""
      return nn.vmap(EdgeGroup, in_axes=(0, 0), out_axes=0,
                     variable_axes={'params': 0, 'batch_stats': 0},
                     split_rngs={'params': True, 'channels': True}, axis_size=num_groups)(
                         num_edges, C, stride, self.k, self.sampling, self.primitives,
                         self.train, self.impl, self.bn_groups, name=name)

    # The edges from the inputs, [input][node]: every node reads both inputs.
    rows = np.array([[edge_index(i, source) for i in range(n)] for source in (0, 1)])
    out = edges('input_edges', 2, n, 2 if self.reduction else 1)(jnp.stack([s0, s1]),
                                                                  op_weights[rows])
    sums = _Sums(C, self.k, self.sampling, self.impl, n + 1)
    spatial = out.mixed.shape[3:-1]
    acc = sums.add(sums.empty(s0.shape[0], spatial, s0.dtype), out, edge_weights[rows],
                   np.broadcast_to(np.arange(n), rows.shape))

    width, rounds = inner_schedule(n)
    # A padding edge (target n) reads the round's node with some edge's weights; its
    # output lands in the discarded slot.
    xs = (np.arange(n - 1), np.array([[j for j, _ in r] for r in rounds]),
          np.array([[i for _, i in r] for r in rounds]),
          np.array([[edge_index(min(i, n - 1), j + 2) for j, i in r] for r in rounds]))
    nodes = jnp.zeros((n,) + s0.shape[:1] + spatial + (C,), s0.dtype)

    def round_(inner, carry, x):
      acc, nodes = carry
      t, src, tgt, e = x
      nodes = jax.lax.dynamic_update_index_in_dim(nodes, sums.node(acc, t), t, 0)
      out = inner(nodes[src], op_weights[e][:, None])
      return (sums.add(acc, out, edge_weights[e][:, None], tgt[:, None]), nodes), None

    scan = nn.scan(round_, variable_axes={'params': 0, 'batch_stats': 0},
                   split_rngs={'params': True, 'channels': True}, length=n - 1)
    (acc, nodes), _ = scan(edges('inner_edges', width, 1, 1), (acc, nodes), xs)
    nodes = nodes.at[n - 1].set(sums.node(acc, n - 1))
    return jnp.concatenate([nodes[i] for i in range(n - self.multiplier, n)], axis=-1)



class _Sums(NamedTuple):
  """How ``ScannedCell`` keeps its per-node sums (static: the cell's channel layout)."""
  features: int
  k: int
  sampling: str
  impl: str
  slots: int  # steps + 1: a last slot takes the padding edges

  def empty(self, batch, spatial, dtype):
    """The mixed ops' outputs and, with shuffled partial channels, the bypassed channels
    apart (so the shuffle runs once per node, as in ``SearchCell``)."""
    c = self.features // self.k
    widths = (c, self.features - c) if self.shuffled else (self.features,)
    return tuple(jnp.zeros((self.slots, batch) + spatial + (w,), dtype) for w in widths)

  @property
  def shuffled(self):
    return self.k > 1 and self.sampling == 'shuffle'

  def add(self, acc, out: EdgeOutputs, weights, targets):
    """Adds each edge of ``out`` (axes [group, edge]) times its weight to the sums of
    its target node."""
    w = weights[..., None, None, None, None]
    if self.k == 1:
      parts = (w * out.mixed,)
    elif self.shuffled:
      parts = (w * out.mixed, w * out.bypass[:, None])
    else:  # random channels: the edge's full output, the bypass where not selected
      def full(mixed, bypass, idx):
        keep = 1.0 - jnp.zeros((self.features,), bypass.dtype).at[idx].set(1.0)
        return bypass * keep + pc.scatter_channels(mixed, idx, self.features)
      per_edge = jax.vmap(jax.vmap(full, (0, None, 0)), (0, 0, 0))
      parts = (w * per_edge(out.mixed, out.bypass, out.channels),)
    flat = jnp.asarray(targets).reshape(-1)
    return tuple(a.at[flat].add(p.reshape((-1,) + p.shape[2:])) for a, p in zip(acc, parts))

  def node(self, acc, t):
    """Node ``t`` (static or traced) from its sums."""
    parts = [jax.lax.dynamic_index_in_dim(a, t, 0, keepdims=False) for a in acc]
    if not self.shuffled:
      return parts[0]
    return pc.shuffle_concat(parts, self.k, matmul_channels(self.impl))


def scanned_variables(variables: dict, steps: int = 4) -> dict:
  """Variables of ``SearchCell``s (a cell's, or a whole ``SearchNetwork``'s, any
  collections) in ``ScannedCell``'s layout: every dict holding ``edges_from_0`` is a cell.
  The padding edges of ``inner_schedule`` (none for four nodes) get zeros."""

  def edge(cell, j, i):  # node j -> node i: a slice of the edges leaving state j + 2
    group = cell[f'edges_from_{j + 2}']
    if i == steps:
      return jax.tree.map(lambda a: jnp.zeros_like(a[:1]), group)
    return jax.tree.map(lambda a: a[i - j - 1][None], group)

  def convert(tree):
    if not isinstance(tree, dict):
      return tree
    if 'edges_from_0' not in tree:
      return {k: convert(v) for k, v in tree.items()}
    out = {k: v for k, v in tree.items() if not k.startswith('edges_from_')}
    out['input_edges'] = jax.tree.map(lambda a, b: jnp.stack([a, b]), tree['edges_from_0'],
                                      tree['edges_from_1'])
    rounds = [jax.tree.map(lambda *e: jnp.stack(e), *[edge(tree, j, i) for j, i in r])
              for r in inner_schedule(steps)[1]]
    out['inner_edges'] = jax.tree.map(lambda *r: jnp.stack(r), *rounds)
    return out

  return convert(dict(variables))


class SearchNetwork(nn.Module):
  """The DARTS supernet. Architecture parameters live in the ``arch`` collection:
  ``alphas_{normal,reduce}`` (14, num_ops) and, with edge normalization,
  ``betas_{normal,reduce}`` (14,).

  ``bn_groups`` > 1 gives every BatchNorm per-device statistics over that many equal
  slices of the batch (``parallel.batch_norm = 'per_device'``); 1 is one BN over the
  whole (global) batch."""
  num_classes: int
  C: int = 16
  layers: int = 8
  steps: int = 4
  multiplier: int = 4
  stem_multiplier: int = 3
  stem: str = 'cifar'
  k: int = 1
  sampling: str = 'shuffle'
  edge_normalization: bool = False
  primitives: tuple[str, ...] = PRIMITIVES
  impl: str = 'auto'
  remat: bool = False  # cells recomputed in the backward pass (ops.recompute)
  # The cells' preprocessing recomputed in the backward pass (implied by ``remat``).
  recompute_preprocessing: bool = True
  bn_groups: int = 1
  # 'unrolled': SearchCell (one mixed op per source state); 'scanned': ScannedCell (two
  # per cell, the inner edges in a scan): the same function, a smaller program.
  cell_form: str = 'unrolled'

  def arch_shapes(self) -> dict[str, tuple[int, ...]]:
    e = num_edges(self.steps)
    shapes = {'alphas_normal': (e, len(self.primitives)),
              'alphas_reduce': (e, len(self.primitives))}
    if self.edge_normalization:
      shapes.update(betas_normal=(e,), betas_reduce=(e,))
    return shapes

  def mixing_weights(self, arch) -> dict[str, tuple[jax.Array, jax.Array]]:
    """(op weights, edge weights) per cell type from the arch params."""
    out = {}
    for kind in ('normal', 'reduce'):
      op_w = jax.nn.softmax(arch[f'alphas_{kind}'], axis=-1)
      if self.edge_normalization:
        edge_w = pc.edge_normalization(arch[f'betas_{kind}'], self.steps)
      else:
        edge_w = jnp.ones((num_edges(self.steps),), op_w.dtype)
      out[kind] = (op_w, edge_w)
    return out

  @nn.compact
  def __call__(self, x, train: bool):
    arch = {}
    for name, shape in self.arch_shapes().items():
      # 1e-3 * N(0, 1), as the reference initializes alphas and betas.
      arch[name] = self.variable(
          'arch', name, lambda s=shape: 1e-3 * jax.random.normal(self.make_rng('params'), s)
      ).value
    weights = self.mixing_weights(arch)

    s0, s1 = stem_layers(x, train, self.stem, self.C, self.stem_multiplier, self.bn_groups)
    C_curr = self.C
    reduction_prev = self.stem == 'imagenet'
    if self.cell_form not in CELL_FORMS:
      raise ValueError(f'cell_form is {self.cell_form!r}; choose one of {tuple(CELL_FORMS)}.')
    cell_cls = CELL_FORMS[self.cell_form]
    cell_cls = recompute_lib.recompute(cell_cls) if self.remat else cell_cls
    for i in range(self.layers):
      reduction = i in (self.layers // 3, 2 * self.layers // 3)
      if reduction:
        C_curr *= 2
      cell = cell_cls(C_curr, reduction, reduction_prev, train, self.steps, self.multiplier,
                      self.k, self.sampling, self.primitives, self.impl,
                      bn_groups=self.bn_groups,
                      recompute_preprocessing=self.recompute_preprocessing and not self.remat,
                      name=f'cell_{i}')
      op_w, edge_w = weights['reduce' if reduction else 'normal']
      # Without edge normalization every edge weighs 1: the nodes are plain sums.
      s0, s1 = s1, cell(s0, s1, op_w, edge_w if self.edge_normalization else None)
      reduction_prev = reduction
    out = jnp.mean(s1, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=ops.torch_init,
                    bias_init=torch_bias_init(out.shape[-1]), name='classifier')(out)


CELL_FORMS = {'unrolled': SearchCell, 'scanned': ScannedCell}


def resolve_cell_form(form: str = 'auto') -> str:
  """'auto': 'unrolled' on the CPU (its native kernels, its measured speed), 'scanned'
  on GPU and TPU (half the program to compile)."""
  if form == 'auto':
    return 'unrolled' if jax.default_backend() == 'cpu' else 'scanned'
  return form


def stem_layers(x, train: bool, kind: str, C: int, stem_multiplier: int = 3,
                bn_groups: int = 1):
  """The network stem, built inside the calling module; returns the first cell's two
  inputs. 'cifar': a 3x3 conv to stem_multiplier*C + BN (both inputs). 'imagenet': three
  stride-2 3x3 convs, 224 -> 28 (s0 after two, s1 after three)."""
  conv = lambda f, stride, name: nn.Conv(  # noqa: E731
      f, (3, 3), (stride, stride), padding=1, use_bias=False, kernel_init=ops.torch_init,
      name=name)
  bn = lambda name: ops.batch_norm(train, affine=True, name=name,  # noqa: E731
                                   batch_groups=bn_groups)
  if kind == 'cifar':
    x = bn('stem_bn')(conv(stem_multiplier * C, 1, 'stem_conv')(x))
    return x, x
  if kind == 'imagenet':
    s0 = conv(C // 2, 2, 'stem0_conv0')(x)
    s0 = nn.relu(bn('stem0_bn0')(s0))
    s0 = bn('stem0_bn1')(conv(C, 2, 'stem0_conv1')(s0))
    s1 = bn('stem1_bn')(conv(C, 2, 'stem1_conv')(nn.relu(s0)))
    return s0, s1
  raise ValueError(f"Unknown stem {kind!r}; use 'cifar' or 'imagenet'.")


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init of a linear layer: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                   bound)


@functools.lru_cache(maxsize=None)
def op_params(primitive: str, C: int, stride: int = 1) -> int:
  """The weights of ``primitive`` on one edge of ``C`` channels (BN without affine, as
  in the search), counted from the op's own init."""
  op = ops.make_op(primitive, C, stride, affine=False)
  shapes = jax.eval_shape(lambda: op.init(jax.random.key(0), jnp.zeros((1, 8, 8, C)),
                                          train=False))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes.get('params', {}))))


def op_costs(primitives: tuple[str, ...], C: int, stride: int = 1) -> np.ndarray:
  """Each primitive's weights on an edge of ``C`` channels at ``stride``, as a fraction
  of the heaviest primitive's at stride 1 (so sep_conv_5x5 is 1, the pools 0)."""
  heaviest = max(op_params(p, C) for p in primitives)
  return np.array([op_params(p, C, stride) for p in primitives], np.float64) / max(heaviest, 1)


def derive_genotype(arch: dict[str, Any], steps: int = 4,
                    primitives: tuple[str, ...] = PRIMITIVES, *,
                    cost_penalty: float = 0.0, C: int = 16) -> genotypes.Genotype:
  """The discrete cell of the reference: for each node keep the two incoming edges with
  the largest non-'none' weight, each with its strongest non-'none' op. With betas, each
  edge's op weights are first scaled by its normalized beta (PC-DARTS).

  ``cost_penalty`` > 0 makes the choice cost-aware: an op's score is its log weight less
  ``cost_penalty`` times its weights as a fraction of the heaviest op's
  (:func:`op_costs` at ``C`` channels; a reduction cell's edges from its inputs at
  stride 2); ops and edges are ranked by score. 0 is the reference's rule.
  """
  if not (cost_penalty >= 0 and np.isfinite(cost_penalty)):
    raise ValueError(f'cost_penalty must be a finite number >= 0, got {cost_penalty}.')
  arch = {k: np.asarray(v, np.float64) for k, v in arch.items()}
  costs = {s: cost_penalty * op_costs(tuple(primitives), C, s) if cost_penalty else 0.0
           for s in (1, 2)}  # per stride

  scores = {}
  for kind in ('normal', 'reduce'):
    a = arch[f'alphas_{kind}']
    w = np.exp(a - a.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    if f'betas_{kind}' in arch:
      w = w * np.asarray(pc.edge_normalization(jnp.asarray(arch[f'betas_{kind}']), steps))[:, None]
    with np.errstate(divide='ignore'):
      score = np.log(w)
    # Edge by edge, in row order; a reduction cell's edges from its inputs at stride 2.
    scores[kind] = np.stack([score[edge_index(i, j)]
                             - costs[2 if kind == 'reduce' and j < 2 else 1]
                             for i in range(steps) for j in range(i + 2)])
  return genotype_from_scores(scores, steps, primitives)


def genotype_from_scores(op_scores: dict[str, Any], steps: int,
                         primitives: tuple[str, ...] = PRIMITIVES,
                         edge_scores: dict[str, Any] | None = None) -> genotypes.Genotype:
  """The cell that per-edge scores select: for each node the two incoming edges of
  highest score, each with its highest-scoring non-'none' op. ``op_scores[kind]`` is
  [edges, ops]; an edge's score is ``edge_scores[kind][edge]`` where given, else its
  best op's."""
  candidates = [k for k, p in enumerate(primitives) if p != 'none']

  def parse(kind):
    ops = np.asarray(op_scores[kind])
    edges = (edge_scores or {}).get(kind)
    gene = []
    for i in range(steps):
      rows = [edge_index(i, j) for j in range(i + 2)]
      strength = [edges[e] if edges is not None else max(ops[e, k] for k in candidates)
                  for e in rows]
      for j in sorted(range(i + 2), key=lambda j: -strength[j])[:2]:
        best = max(candidates, key=lambda k: ops[rows[j], k])
        gene.append((primitives[best], j))
    return gene

  concat = list(range(2, 2 + steps))
  return genotypes.Genotype(parse('normal'), concat, parse('reduce'), concat)
