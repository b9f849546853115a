"""The sampled DARTS-like cell space of UNAS (Vahdat et al. 2020; NVlabs/unas), the
discrete cell that PARSEC / FP-NAS sample as well.

A cell has two inputs (the previous two cells' outputs, preprocessed as in the DARTS
search cell), ``steps`` intermediate nodes and an output that concatenates the last
``multiplier`` nodes. Unlike the DARTS supernet, where a node sums all its incoming
edges, intermediate node i has two input *slots* j in {0, 1}; each slot has a
categorical over its source (states 0 .. i+1) and one over its op, so a one-hot sample
is a discrete cell, like a genotype. A sample's weights mix the choices as

    node_i = sum_j sum_s sum_o w_in[j, s] * w_op[j, o] * op_{s->i, o}(state_s).

The candidate ops' parameters live on the edges s -> i, as in the DARTS supernet: the
two slots of a node share them, so both slots picking the same (source, op) pick the
same parameters. In a reduction cell the edges from the cell inputs have stride 2.

Architecture logits are held by the caller (a method's state, not a collection of this
module): ``inputs_{normal,reduce}`` (steps, 2, steps + 1) and ``ops_{normal,reduce}``
(steps, 2, num_ops), zeros at the start (`arch_shapes`). Sources a node cannot read are
invalid (`valid_masks`); `mask_logits` pushes their logits to -1e9 so that a softmax, a
categorical draw or a Gumbel argmax never picks them.

The network takes the *weights* of a sample, each with a leading sample axis S: one
architecture per example (S = batch) or one for the whole batch (S = 1). Two paths,
named by the static argument ``path``:

* ``'mixed'``: every (edge, op) is computed and weighted per example, with the memory
  of the supernet. This is UNAS's relaxed Gumbel-softmax sample, and, with one-hot
  weights per example, the masked "all ops" computation of a discrete sample per
  example. As in `jaxnas.spaces.darts`, the edges that read one state are one
  ``jax.vmap`` over their stacked parameters, and the like stages of an edge's ops are
  grouped (the 1x1 convs as one batched matmul, the BatchNorms as one grouped BN).
* ``'discrete'``: S = 1 and one-hot weights. Each slot runs only the op of its chosen
  (source, op), through ``lax.switch`` on a scalar index: the compiled program holds
  conditionals, and the ops not chosen are not computed. The op's output is multiplied
  by its (one-hot) weight, so a straight-through gradient reaches the chosen entries.
  A switch index that is batched (under ``vmap``, or one architecture per example)
  lowers to ``select`` and runs every branch; so one architecture per example is the
  mixed path with one-hot weights, not this one. A slot's switch has a branch per op,
  not per (edge, op): the sources of a node whose edges share a stride and whose
  states share a shape are stacked (states, edge parameters and statistics on a new
  leading axis), and the branch picks the chosen source by a dynamic index. That is
  num_ops branches in a normal cell; in a reduction cell the cell inputs (stride 2)
  and the intermediate nodes (stride 1) are two such groups, so 2 x num_ops branches
  for the nodes that read an intermediate node (num_ops for node 0). Slot 1 has one
  more branch, which reuses slot 0's output when both pick the same (source, op). So
  the program holds each op once or twice per slot while a run executes one op per
  slot; where the weights are constants of the jitted function rather than arguments,
  XLA folds the switches and compiles only the chosen ops.

Weights of sources a node cannot read are ignored by both paths.

Both paths read the same variables (one tree serves both): ``edges_from_{s}`` holds
the candidate ops of the edges leaving state s, each array stacked on a leading edge
axis in the order of `darts.edges_from`: ``{op}_dw{b}`` (E, k, k, 1, C) depthwise and
``{op}_pw{b}`` (E, C, C) 1x1 kernels of block b of a conv op, ``skip_connect_pw{0,1}``
(E, C, C/2) of FactorizedReduce (stride 2 only), and the running statistics ``mean``,
``var`` (E, C) of the non-affine BatchNorms ``{op}_bn{b}``, ``{pool}_bn`` and
``skip_connect_bn``. The mixed path vmaps over the edge axis; the discrete path stacks
the edges into a node and indexes the chosen one. In training mode the mixed path
updates the BatchNorm statistics of every op (each sees the data), the discrete path
only those of the chosen ops on the chosen edges.
"""

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnas import genotypes
from jaxnas.ops import depthwise as depthwise_lib
from jaxnas.ops import primitives as ops
from jaxnas.spaces import darts

# UNAS's op order (NVlabs/unas); its ImageNet cell keeps the first 5.
UNAS_PRIMITIVES = ('skip_connect', 'sep_conv_3x3', 'max_pool_3x3', 'dil_conv_3x3',
                   'sep_conv_5x5', 'avg_pool_3x3', 'sep_conv_7x7')
PATHS = ('mixed', 'discrete')
ARCH_NAMES = ('inputs_normal', 'inputs_reduce', 'ops_normal', 'ops_reduce')
# The logit of a source a node cannot read: finite, so log-probabilities stay finite
# (0 * log q = 0 for the one-hot entries of a sample), and exp() of it is exactly 0.
MASKED_LOGIT = -1e9

# (kernel size, dilation, stacked blocks) of the conv ops; the DARTS ones plus UNAS's 7x7.
CONV_OPS = {**darts.CONV_OPS, 'sep_conv_7x7': (7, 1, 2)}
POOL_OPS = darts.POOL_OPS


# --- architecture parameters and samples ---------------------------------------------


def arch_shapes(steps: int = 4, num_ops: int = len(UNAS_PRIMITIVES)
                ) -> dict[str, tuple[int, ...]]:
  """Shapes of the architecture logits (and of one sample's weights, without its
  leading sample axis): per node and input slot, a categorical over the source states
  0 .. steps (``inputs_*``; node i may read 0 .. i+1) and one over the ops (``ops_*``)."""
  inputs, op_shape = (steps, 2, steps + 1), (steps, 2, num_ops)
  return {'inputs_normal': inputs, 'inputs_reduce': inputs,
          'ops_normal': op_shape, 'ops_reduce': op_shape}


def valid_masks(steps: int = 4, num_ops: int = len(UNAS_PRIMITIVES)
                ) -> dict[str, np.ndarray]:
  """Per name of `arch_shapes`, a bool array of its shape: True where the entry may be
  chosen (node i reads sources 0 .. i+1; every op is valid)."""
  source = np.arange(steps + 1)[None, None, :] <= np.arange(steps)[:, None, None] + 1
  inputs = np.broadcast_to(source, (steps, 2, steps + 1))
  op_mask = np.ones((steps, 2, num_ops), bool)
  return {'inputs_normal': inputs, 'inputs_reduce': inputs,
          'ops_normal': op_mask, 'ops_reduce': op_mask}


def mask_logits(arch_logits: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The logits with the sources a node cannot read set to `MASKED_LOGIT` (any leading
  axes are kept; ``ops_*`` are returned unchanged). No gradient reaches masked entries."""
  out = {}
  for name, logits in arch_logits.items():
    logits = jnp.asarray(logits)
    if name.startswith('inputs_'):
      steps = logits.shape[-1] - 1
      if logits.ndim < 3 or logits.shape[-3:] != (steps, 2, steps + 1):
        raise ValueError(f'{name} must end in (steps, 2, steps + 1); got {logits.shape}.')
      valid = valid_masks(steps, 1)[name]
      logits = jnp.where(valid, logits, jnp.asarray(MASKED_LOGIT, logits.dtype))
    out[name] = logits
  return out


def random_architecture(key: jax.Array, steps: int = 4,
                        num_ops: int = len(UNAS_PRIMITIVES), num_samples: int = 1,
                        arch_logits: Mapping[str, Any] | None = None
                        ) -> dict[str, jax.Array]:
  """``num_samples`` architectures drawn from the categoricals of ``arch_logits``
  (uniform over the valid choices when None), as index choices: per name of
  `arch_shapes`, int32 (num_samples, steps, 2) source or op indices."""
  shapes = arch_shapes(steps, num_ops)
  if arch_logits is None:
    arch_logits = {name: jnp.zeros(shape) for name, shape in shapes.items()}
  masked = mask_logits(arch_logits)
  out = {}
  for n, name in enumerate(ARCH_NAMES):
    logits = masked[name]
    if logits.shape != shapes[name]:
      raise ValueError(f'arch_logits[{name!r}] has shape {logits.shape}; steps={steps}, '
                       f'num_ops={num_ops} need {shapes[name]}.')
    out[name] = jax.random.categorical(jax.random.fold_in(key, n), logits,
                                       shape=(num_samples,) + logits.shape[:-1])
  return out


def one_hot(choices: Mapping[str, Any], steps: int = 4,
            num_ops: int = len(UNAS_PRIMITIVES), dtype=jnp.float32
            ) -> dict[str, jax.Array]:
  """The weights of index choices (`random_architecture`'s form, (S, steps, 2) each):
  one-hot (S, steps, 2, steps + 1) per ``inputs_*`` and (S, steps, 2, num_ops) per
  ``ops_*``."""
  sizes = {name: shape[-1] for name, shape in arch_shapes(steps, num_ops).items()}
  return {name: jax.nn.one_hot(jnp.asarray(choices[name]), sizes[name], dtype=dtype)
          for name in ARCH_NAMES}


def choices_from_genotype(genotype, primitives: tuple[str, ...] = UNAS_PRIMITIVES
                          ) -> dict[str, np.ndarray]:
  """A genotype as index choices of one architecture ((1, steps, 2) each): node i's two
  edges are its slots 0 and 1."""
  g = genotypes.validate(genotype)
  out = {}
  for kind, edges in (('normal', g.normal), ('reduce', g.reduce)):
    unknown = sorted({op for op, _ in edges} - set(primitives))
    if unknown:
      raise ValueError(f'genotype {kind} cell uses {unknown}, which are not among the '
                       f'primitives {primitives}.')
    out[f'inputs_{kind}'] = np.array([j for _, j in edges], np.int32).reshape(1, -1, 2)
    out[f'ops_{kind}'] = np.array([primitives.index(op) for op, _ in edges],
                                  np.int32).reshape(1, -1, 2)
  return out


def derive_genotype(arch_logits: Mapping[str, Any], steps: int = 4,
                    primitives: tuple[str, ...] = UNAS_PRIMITIVES) -> genotypes.Genotype:
  """The most likely cell: per node and slot the argmax source (among those it may
  read) and the argmax op, as the slot's (op, source) pair; concat 2 .. steps+1."""
  shapes = arch_shapes(steps, len(primitives))
  for name, shape in shapes.items():
    if name not in arch_logits or np.shape(arch_logits[name]) != shape:
      got = np.shape(arch_logits[name]) if name in arch_logits else 'nothing'
      raise ValueError(f'derive_genotype needs arch_logits[{name!r}] of shape {shape} '
                       f'(steps={steps}, {len(primitives)} primitives); got {got}.')
  masked = {k: np.asarray(v) for k, v in mask_logits(
      {k: arch_logits[k] for k in ARCH_NAMES}).items()}

  def parse(kind):
    source = masked[f'inputs_{kind}'].argmax(-1)
    op = masked[f'ops_{kind}'].argmax(-1)
    return [(primitives[op[i, j]], int(source[i, j])) for i in range(steps) for j in (0, 1)]

  concat = list(range(2, steps + 2))
  return genotypes.validate(genotypes.Genotype(parse('normal'), concat, parse('reduce'),
                                               concat), steps=steps)


def check_weights(weights: Mapping[str, Any], batch: int, steps: int, num_ops: int,
                  path: str) -> int:
  """Raises a ValueError unless ``weights`` fit the network; returns the sample count."""
  if path not in PATHS:
    raise ValueError(f"path must be one of {PATHS}; got {path!r}.")
  samples = set()
  for name, shape in arch_shapes(steps, num_ops).items():
    if name not in weights:
      raise ValueError(f'weights has no {name!r}; it needs {", ".join(ARCH_NAMES)}.')
    got = np.shape(weights[name])
    if len(got) != len(shape) + 1 or got[1:] != shape or got[0] not in (1, batch):
      raise ValueError(f'weights[{name!r}] must be (S,) + {shape} with S = 1 or the '
                       f'batch size {batch}; got {got}.')
    samples.add(got[0])
  if len(samples) > 1:
    raise ValueError(f'All weights need the same sample axis; got sizes {sorted(samples)}.')
  (s,) = samples
  if path == 'discrete' and s != 1:
    raise ValueError(f"path='discrete' runs one architecture for the batch (S = 1); got "
                     f"S = {s}. One architecture per example is path='mixed'.")
  return s


# --- the candidate ops of one edge, as pure functions of explicit variables ----------


def _variable_shapes(primitives, c: int, stride: int):
  """(params {name: shape}, BatchNorm names) of one edge's candidate ops."""
  params, bns = {}, []
  for op in primitives:
    if op in CONV_OPS:
      k, _, blocks = CONV_OPS[op]
      for b in range(blocks):
        params[f'{op}_dw{b}'] = (k, k, 1, c)
        params[f'{op}_pw{b}'] = (c, c)
        bns.append(f'{op}_bn{b}')
    elif op in POOL_OPS:
      bns.append(f'{op}_bn')
    elif op == 'skip_connect':
      if stride == 2:
        if c % 2:
          raise ValueError(f'skip_connect at stride 2 (FactorizedReduce) needs an even '
                           f'channel count, got {c}.')
        params['skip_connect_pw0'] = params['skip_connect_pw1'] = (c, c // 2)
        bns.append('skip_connect_bn')
    else:
      known = ('skip_connect',) + tuple(POOL_OPS) + tuple(CONV_OPS)
      raise ValueError(f'Unknown primitive {op!r} in the sampled DARTS space; known: '
                       f'{", ".join(known)}.')
  return params, bns


def _stateful_apply(module, variables, train, *args):
  """``module.apply`` as a pure function of its variables: (output, batch_stats). The
  module is built with ``parent=None``: inside a module's method it would otherwise
  become that module's child."""
  if not train:
    return module.apply(variables, *args), variables['batch_stats']
  out, state = module.apply(variables, *args, mutable=['batch_stats'])
  return out, state['batch_stats']


def _grouped_bn(stats, names, y, train, bn_groups):
  """One non-affine grouped BN (ops.BatchNorm) of y (G, B, ..., C) whose G groups are
  the BNs ``names`` (their (C,) statistics stacked); returns y and their new stats."""
  variables = {'batch_stats': {'mean': jnp.stack([stats[n][0] for n in names]),
                               'var': jnp.stack([stats[n][1] for n in names])}}
  bn = ops.BatchNorm(train, grouped=True, batch_groups=bn_groups, parent=None)
  y, new = _stateful_apply(bn, variables, train, y)
  return y, {n: (new['mean'][g], new['var'][g]) for g, n in enumerate(names)}


def _depthwise(params, x, op, block, stride, impl):
  """Block ``block``'s depthwise conv of relu(x)."""
  k, dilation, _ = CONV_OPS[op]
  return depthwise_lib.depthwise_conv(
      x, params[f'{op}_dw{block}'][:, :, 0, :], stride=stride,
      dilation=dilation if block == 0 else 1, impl=impl, relu=True)


def _pointwise_bn(params, stats, y, conv_ops, block, train, bn_groups):
  """The 1x1 convs of ``conv_ops``'s block on y (G, B, H, W, C) as one batched matmul,
  then one grouped BN."""
  kernel = jnp.stack([params[f'{op}_pw{block}'] for op in conv_ops])
  return _grouped_bn(stats, [f'{op}_bn{block}' for op in conv_ops],
                     ops.pointwise(y, kernel), train, bn_groups)


def _factorized_reduce(params, stats, x, train, bn_groups):
  """skip_connect at stride 2: ops.FactorizedReduce (search mode) on these variables."""
  mean, var = stats['skip_connect_bn']
  variables = {'params': {'Conv1x1_0': {'kernel': params['skip_connect_pw0']},
                          'Conv1x1_1': {'kernel': params['skip_connect_pw1']}},
               'batch_stats': {'BatchNorm_0': {'mean': mean, 'var': var}}}
  module = ops.FactorizedReduce(x.shape[-1], bn_groups=bn_groups, parent=None)
  y, new = _stateful_apply(module, variables, train, x, train)
  return y, {'skip_connect_bn': (new['BatchNorm_0']['mean'], new['BatchNorm_0']['var'])}


def mixed_edge(params, stats, x, weights, *, stride, primitives, train, impl='auto',
               bn_groups=1):
  """sum_o weights[:, o] * op_o(x) of one edge, per example: x (B, H, W, C), weights
  (S, num_ops) with S = 1 (one architecture) or B. Like stages of the ops are grouped
  as in `darts.MixedOp`. Returns the sum and the edge's new BN statistics."""
  index = {op: o for o, op in enumerate(primitives)}
  scale = darts.weighting(impl)

  def mul(y, op):  # the op's output times its weight (per example where S = B)
    w = weights[:, index[op]]
    if weights.shape[0] == 1:
      return scale(y, w[0])
    return y * w.reshape((-1,) + (1,) * (y.ndim - 1))

  new, out = dict(stats), 0.0
  # Sep convs first: their first block's output continues into the second block.
  convs = sorted((op for op in primitives if op in CONV_OPS),
                 key=lambda op: -CONV_OPS[op][2])
  seps = [op for op in convs if CONV_OPS[op][2] == 2]
  if convs:
    y = jnp.stack([_depthwise(params, x, op, 0, stride, impl) for op in convs])
    y, update = _pointwise_bn(params, stats, y, convs, 0, train, bn_groups)
    new.update(update)
    out = out + sum(mul(y[g], op) for g, op in enumerate(convs) if op not in seps)
    if seps:
      z = jnp.stack([_depthwise(params, y[g], op, 1, 1, impl) for g, op in enumerate(seps)])
      z, update = _pointwise_bn(params, stats, z, seps, 1, train, bn_groups)
      new.update(update)
      out = out + sum(mul(z[g], op) for g, op in enumerate(seps))
  pools = [op for op in primitives if op in POOL_OPS]
  if pools:
    y = jnp.stack([POOL_OPS[op](x, 3, stride, 1, impl=impl) for op in pools])
    y, update = _grouped_bn(stats, [f'{op}_bn' for op in pools], y, train, bn_groups)
    new.update(update)
    out = out + sum(mul(y[g], op) for g, op in enumerate(pools))
  if 'skip_connect' in index:
    skip = x
    if stride == 2:
      skip, update = _factorized_reduce(params, stats, x, train, bn_groups)
      new.update(update)
    out = out + mul(skip, 'skip_connect')
  return out, new


def single_op(params, stats, x, op, *, stride, train, impl='auto', bn_groups=1):
  """op(x) of one edge alone (the same variables as `mixed_edge`); returns the output
  and the edge's statistics with this op's updated."""
  new = dict(stats)
  if op in CONV_OPS:
    y = x
    for block in range(CONV_OPS[op][2]):
      y = _depthwise(params, y, op, block, stride if block == 0 else 1, impl)
      y, update = _pointwise_bn(params, stats, y[None], [op], block, train, bn_groups)
      y = y[0]
      new.update(update)
    return y, new
  if op in POOL_OPS:
    y = POOL_OPS[op](x, 3, stride, 1, impl=impl)
    y, update = _grouped_bn(stats, [f'{op}_bn'], y[None], train, bn_groups)
    new.update(update)
    return y[0], new
  if op == 'skip_connect':
    if stride == 1:
      return x, new
    y, update = _factorized_reduce(params, stats, x, train, bn_groups)
    new.update(update)
    return y, new
  raise ValueError(f'Unknown primitive {op!r} in the sampled DARTS space.')


# --- modules ---------------------------------------------------------------------------


class CandidateOps(nn.Module):
  """The variables of the candidate ops on the ``num_edges`` edges that leave one state,
  stacked on a leading edge axis (see the module docstring for names and shapes).

  Calling it returns ``(params, stats)``: params {name: array}, stats {bn name: (mean,
  var)}; ``new_stats`` (that form) are written first. The computation is the cell's,
  with `mixed_edge` / `single_op`, so that both paths read the same arrays."""
  num_edges: int
  features: int
  stride: int
  primitives: tuple[str, ...]

  @nn.compact
  def __call__(self, new_stats=None):
    e, c = self.num_edges, self.features
    shapes, bns = _variable_shapes(self.primitives, c, self.stride)
    # fan_in of a depthwise kernel is k*k, of a 1x1 kernel C (the edge axis is a batch
    # axis), as in ops.DepthwiseConv and ops.Conv1x1.
    params = {name: self.param(name, ops.torch_init_stacked, (e,) + shape)
              for name, shape in shapes.items()}
    stats = {bn: _RunningStats((e, c), name=bn)(new_stats and new_stats[bn]) for bn in bns}
    return params, stats


class _RunningStats(nn.Module):
  """A BatchNorm's running ``mean`` and ``var`` (the names of ops.BatchNorm's), without
  the BatchNorm: returns them, after writing ``new`` (mean, var) if given."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, new=None):
    mean = self.variable('batch_stats', 'mean', jnp.zeros, self.shape, jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, self.shape, jnp.float32)
    if new is not None:
      mean.value, var.value = new
    return mean.value, var.value


def _edge(tree, pos):
  return jax.tree_util.tree_map(lambda a: a[pos], tree)


class SampledCell(nn.Module):
  """One cell of the sampled space; ``w_in`` (S, steps, 2, steps + 1) and ``w_op``
  (S, steps, 2, num_ops) are the weights of this cell type."""
  features: int
  reduction: bool
  reduction_prev: bool
  train: bool
  steps: int = 4
  multiplier: int = 4
  primitives: tuple[str, ...] = UNAS_PRIMITIVES
  impl: str = 'auto'
  bn_groups: int = 1

  @nn.compact
  def __call__(self, s0, s1, w_in, w_op, path: str = 'mixed'):
    C, g = self.features, self.bn_groups
    first = darts.preprocessing(
        ops.FactorizedReduce if self.reduction_prev else ops.ReLUConvBN, False)
    s0 = first(C, affine=False, bn_groups=g, train=self.train, name='preprocess0')(s0)
    s1 = darts.preprocessing(ops.ReLUConvBN, False)(
        C, affine=False, bn_groups=g, train=self.train, name='preprocess1')(s1)
    # State steps + 1 (the last node) feeds no edge.
    groups = [CandidateOps(len(darts.edges_from(s, self.steps)), C, self._stride(s),
                           self.primitives, name=f'edges_from_{s}')
              for s in range(self.steps + 1)]
    if path == 'mixed':
      states = self._mixed(groups, [s0, s1], w_in, w_op)
    elif path == 'discrete':
      states = self._discrete(groups, [s0, s1], w_in, w_op)
    else:
      raise ValueError(f'path must be one of {PATHS}; got {path!r}.')
    return jnp.concatenate(states[-self.multiplier:], axis=-1)

  def _stride(self, source):
    return 2 if self.reduction and source < 2 else 1

  def _op_config(self, source):
    # Init may run on one example; the statistics it computes are not kept.
    bn_groups = 1 if self.is_initializing() else self.bn_groups
    return dict(stride=self._stride(source), train=self.train, impl=self.impl,
                bn_groups=bn_groups)

  def _keep_stats(self):
    return self.train and not self.is_initializing()

  def _mixed(self, groups, states, w_in, w_op):
    """Every (edge, op), weighted per example; one vmap per group of edges."""
    # The weight of op o on edge s -> i: sum over the node's slots of w_in * w_op.
    edge_w = jnp.einsum('bijs,bijo->biso', w_in, w_op)
    incoming = [[] for _ in range(self.steps)]

    def emit(source):
      targets = darts.edges_from(source, self.steps)
      nodes = [i for i, _ in targets]
      params, stats = groups[source]()
      fn = functools.partial(mixed_edge, primitives=self.primitives,
                             **self._op_config(source))
      out, new = jax.vmap(fn, in_axes=(0, 0, None, 1))(params, stats, states[source],
                                                      edge_w[:, nodes, source])
      if self._keep_stats():
        groups[source](new)
      for pos, m in enumerate(jnp.split(out, len(nodes))):
        incoming[nodes[pos]].append(m[0])

    emit(0)
    emit(1)
    for i in range(self.steps):
      states.append(sum(incoming[i]))
      if i + 2 <= self.steps:
        emit(i + 2)
    return states

  def _discrete(self, groups, states, w_in, w_op):
    """Per slot, only the chosen op on the chosen source, under lax.switch (scalar
    index): a branch per (part of the sources, op), the branch picking its edge within
    the part by a dynamic index (see `_source_parts` and `_branch`)."""
    scale = darts.weighting(self.impl)
    keep = self._keep_stats()  # the switches return the edges' BN statistics
    read = [group() for group in groups]
    params = [p for p, _ in read]
    stats = [s for _, s in read]
    stack = lambda ts: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ts)  # noqa: E731
    # With ``keep``, the new statistics of edge s -> i (row pos of group s), each written
    # once, by node i's switches; stacked back into their groups at the end.
    rows = [{} for _ in groups]
    for i in range(self.steps):
      pos = [i - max(0, s - 1) for s in range(i + 2)]  # edge s -> i in group s
      parts = self._source_parts(states[:i + 2])
      # Per part, its sources' states and the variables of their edges into node i,
      # stacked on a leading axis in source order.
      operands = tuple(
          (jnp.stack([states[s] for s in part]),
           stack([_edge(params[s], pos[s]) for s in part]),
           stack([_edge(stats[s], pos[s]) for s in part])) for part in parts)
      # Branch k * num_ops + o runs op o on the chosen edge of part k.
      branches = [functools.partial(_branch, k, part[0], op, self._op_config(part[0]),
                                    keep)
                  for k, part in enumerate(parts) for op in self.primitives]
      part_of = np.array([k for k, part in enumerate(parts) for _ in part], np.int32)
      # Slot 1 with slot 0's (source, op): the same parameters and input, so its output
      # is reused (and the op's BN statistics move once, as in the mixed path).
      reuse = lambda _, operands, y: (y, tuple(st for _, _, st in operands)  # noqa: E731
                                      if keep else ())
      outputs, chosen = [], []
      for j in (0, 1):
        # Only the sources node i may read; invalid entries cannot be picked.
        source = jnp.argmax(w_in[0, i, j, :i + 2])
        op = jnp.argmax(w_op[0, i, j])
        index = jnp.asarray(part_of)[source] * len(self.primitives) + op
        if j == 0:
          y, new = lax.switch(index, branches, source, operands, None)
        else:
          same = (source == chosen[0][0]) & (op == chosen[0][1])
          y, new = lax.switch(jnp.where(same, len(branches), index), branches + [reuse],
                              source, operands, outputs[0])
        if keep:
          operands = tuple((x, p, st) for (x, p, _), st in zip(operands, new))
        outputs.append(y)
        chosen.append((source, op))
      # Times the chosen (one-hot) weight, so that a straight-through gradient flows.
      states.append(sum(scale(y, w_in[0, i, j, s] * w_op[0, i, j, o])
                        for j, (y, (s, o)) in enumerate(zip(outputs, chosen))))
      if keep:
        for part, (_, _, part_stats) in zip(parts, operands):
          for k, s in enumerate(part):
            rows[s][pos[s]] = jax.tree_util.tree_map(lambda a, k=k: a[k], part_stats)
    if keep:
      for group, new in zip(groups, rows):
        group(stack([new[p] for p in range(len(new))]))
    return states

  def _source_parts(self, states):
    """The sources 0 .. len(states)-1 of a node as runs of consecutive sources whose
    edges share a stride and whose states share a shape, so that one copy of an op
    serves a run: one run in a normal cell; in a reduction cell the cell inputs
    (stride 2) and the intermediate nodes (stride 1)."""
    parts = []
    for s, x in enumerate(states):
      if parts and (self._stride(s), x.shape) == (self._stride(parts[-1][0]),
                                                   states[parts[-1][0]].shape):
        parts[-1].append(s)
      else:
        parts.append([s])
    return parts


def _branch(part, first, op, config, keep, source, operands, y_prev):
  """A switch branch of the discrete path: op alone on the edge from ``source`` (the
  first source of part ``part`` is ``first``), its input state and the op's variables
  taken from the part's stacked ones by a dynamic index; with ``keep``, also every
  part's stacked statistics, this op's on this edge updated."""
  del y_prev
  x, params, stats = operands[part]
  local = source - first
  take = lambda a: lax.dynamic_index_in_dim(a, local, keepdims=False)  # noqa: E731
  # The op's variables: ``{op}_dw0``, ``{op}_bn``, ... (`_variable_shapes`).
  mine = lambda t: {k: v for k, v in t.items() if k.rsplit('_', 1)[0] == op}  # noqa: E731
  edge_stats = jax.tree_util.tree_map(take, mine(stats))
  y, new = single_op(jax.tree_util.tree_map(take, mine(params)), edge_stats, take(x), op,
                     **config)
  if not keep:
    return y, ()
  # ``new`` holds just this op's statistics (those of ``edge_stats``).
  put = lambda full, e: lax.dynamic_update_index_in_dim(full, e, local, 0)  # noqa: E731
  updated = {**stats, **{name: jax.tree_util.tree_map(put, stats[name], value)
                         for name, value in new.items()}}
  return y, tuple(updated if k == part else st for k, (_, _, st) in enumerate(operands))


class SampledNetwork(nn.Module):
  """The network of the sampled space: stem, ``layers`` cells (reduction cells, channels
  x2, at L//3 and 2L//3), global average pool, linear classifier.

  ``apply(variables, x, weights, train=..., path='mixed' | 'discrete')``: ``weights``
  has the names of `arch_shapes`, each with a leading sample axis S = batch or 1
  (see the module docstring); ``path`` is static.

  ``bn_groups`` > 1 gives every BatchNorm per-device statistics over that many equal
  slices of the batch, as in `darts.SearchNetwork`."""
  num_classes: int
  C: int = 16
  layers: int = 8
  steps: int = 4
  multiplier: int = 4
  stem_multiplier: int = 3
  stem: str = 'cifar'
  primitives: tuple[str, ...] = UNAS_PRIMITIVES
  impl: str = 'auto'
  bn_groups: int = 1

  def arch_shapes(self) -> dict[str, tuple[int, ...]]:
    return arch_shapes(self.steps, len(self.primitives))

  @nn.compact
  def __call__(self, x, weights, train: bool, path: str = 'mixed'):
    if not 1 <= self.multiplier <= self.steps:
      raise ValueError(f'multiplier (the nodes concatenated into a cell output) must be in '
                       f'1..steps={self.steps}; got {self.multiplier}.')
    check_weights(weights, x.shape[0], self.steps, len(self.primitives), path)
    s0, s1 = darts.stem_layers(x, train, self.stem, self.C, self.stem_multiplier,
                               self.bn_groups)
    C_curr = self.C
    reduction_prev = self.stem == 'imagenet'
    for i in range(self.layers):
      reduction = i in (self.layers // 3, 2 * self.layers // 3)
      if reduction:
        C_curr *= 2
      kind = 'reduce' if reduction else 'normal'
      cell = SampledCell(C_curr, reduction, reduction_prev, train, self.steps,
                         self.multiplier, self.primitives, self.impl, self.bn_groups,
                         name=f'cell_{i}')
      s0, s1 = s1, cell(s0, s1, weights[f'inputs_{kind}'], weights[f'ops_{kind}'], path)
      reduction_prev = reduction
    out = jnp.mean(s1, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=ops.torch_init,
                    bias_init=darts.torch_bias_init(out.shape[-1]), name='classifier')(out)
