"""Evaluation networks of the DARTS space: a found cell stacked and trained from scratch.

Each cell applies the genotype's two ops per node (affine BN, no BN after pools) and
concatenates its ``concat`` nodes. During training every op output except identity goes
through drop path (Zoph et al. 2018; DARTS section 3.2): a whole sample's output is
zeroed with probability ``drop_rate`` and the rest scaled by 1 / (1 - drop_rate). An
auxiliary classifier reads the output of cell 2L//3 (the second reduction cell).

``apply(..., train=True)`` returns ``(logits, aux_logits)`` (``aux_logits`` is None
without the auxiliary head); ``train=False`` returns ``(logits, None)``.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnas import genotypes
from jaxnas.ops import primitives as ops
from jaxnas.spaces import darts

Edges = tuple[tuple[str, int], ...]


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
  """Zeroes whole samples of x with probability ``rate``, scales the others by
  1/(1-rate). ``rate`` may be traced (it ramps over training), so one program serves
  every epoch; at rate 0 every sample is kept and x is returned unchanged."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0)


def _cell_edges(edges: Sequence) -> Edges:
  return tuple((str(op), int(j)) for op, j in edges)


class EvalCell(nn.Module):
  """A discrete cell: node i sums op(state) over its two genotype edges."""
  edges: Edges
  concat: tuple[int, ...]
  features: int
  reduction: bool
  reduction_prev: bool
  impl: str = 'auto'

  @nn.compact
  def __call__(self, s0, s1, train: bool, drop_rate=None):
    C = self.features
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(C, affine=True, name='preprocess0')(s0, train)
    else:
      s0 = ops.ReLUConvBN(C, affine=True, name='preprocess0')(s0, train)
    s1 = ops.ReLUConvBN(C, affine=True, name='preprocess1')(s1, train)
    states = [s0, s1]
    for node in range(len(self.edges) // 2):
      total = 0.0
      for e in (2 * node, 2 * node + 1):
        op_name, source = self.edges[e]
        stride = 2 if self.reduction and source < 2 else 1
        op = ops.make_op(op_name, C, stride, affine=True, impl=self.impl,
                         module_name=f'edge_{e}_{op_name}')
        h = op(states[source], train)
        if train and drop_rate is not None and not isinstance(op, ops.Identity):
          h = drop_path(h, drop_rate, self.make_rng('drop_path'))
        total = total + h
      states.append(total)
    return jnp.concatenate([states[i] for i in self.concat], axis=-1)


class AuxiliaryHead(nn.Module):
  """The auxiliary classifier on the 8x8 (CIFAR) or 7x7 (ImageNet) maps of cell 2L//3:
  ReLU, 5x5 average pool (stride 3 CIFAR, 2 ImageNet), 1x1 conv to 128 + BN + ReLU, a
  conv over the whole pooled map (2x2 in both references) to 768 [+ BN] + ReLU, linear.
  The ImageNet head has no BN after the 768-conv, as in the reference's experiments."""
  num_classes: int
  kind: str  # 'cifar' | 'imagenet'

  @nn.compact
  def __call__(self, x, train: bool):
    stride = 3 if self.kind == 'cifar' else 2
    x = ops.avg_pool(nn.relu(x), 5, stride, 0)
    x = nn.relu(ops.batch_norm(train, affine=True)(ops.Conv1x1(128)(x)))
    x = nn.Conv(768, x.shape[1:3], padding='VALID', use_bias=False,
                kernel_init=ops.torch_init)(x)
    if self.kind == 'cifar':
      x = ops.batch_norm(train, affine=True)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, kernel_init=ops.torch_init,
                    bias_init=darts.torch_bias_init(x.shape[-1]))(x)


class EvalNetwork(nn.Module):
  """L cells of a genotype; reduction cells (channels x2) at L//3 and 2L//3.

  ``stem='cifar'``: a 3x3 conv to stem_multiplier*C + BN (NetworkCIFAR). ``'imagenet'``:
  three stride-2 3x3 convs, 224 -> 28, the first cell reading them as a reduced input
  (NetworkImageNet).
  """
  genotype: genotypes.Genotype
  num_classes: int
  C: int = 36
  layers: int = 20
  auxiliary: bool = True
  stem: str = 'cifar'
  stem_multiplier: int = 3
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool, drop_rate=None):
    g = self.genotype
    s0, s1 = darts.stem_layers(x, train, self.stem, self.C, self.stem_multiplier)
    C_curr = self.C
    reduction_prev = self.stem == 'imagenet'
    aux_logits = None
    for i in range(self.layers):
      reduction = i in (self.layers // 3, 2 * self.layers // 3)
      if reduction:
        C_curr *= 2
      edges, concat = (g.reduce, g.reduce_concat) if reduction else (g.normal, g.normal_concat)
      cell = EvalCell(_cell_edges(edges), tuple(concat), C_curr, reduction, reduction_prev,
                      self.impl, name=f'cell_{i}')
      s0, s1 = s1, cell(s0, s1, train, drop_rate)
      reduction_prev = reduction
      if i == 2 * self.layers // 3 and self.auxiliary and train:
        aux_logits = AuxiliaryHead(self.num_classes, self.stem, name='auxiliary_head')(
            s1, train)
    out = jnp.mean(s1, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=ops.torch_init,
                      bias_init=darts.torch_bias_init(out.shape[-1]), name='classifier')(out)
    return logits, aux_logits


def count_params(params, exclude: str | None = 'auxiliary') -> int:
  """Number of weights, without the subtrees whose name contains ``exclude`` (the
  reference's count_parameters_in_MB leaves the auxiliary head out)."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(p, 'key', '') for p in path]
    if exclude and any(exclude in str(n) for n in names):
      continue
    total += leaf.size
  return int(total)


def freeze(genotype) -> genotypes.Genotype:
  """The genotype with tuples only (module attributes must be hashable)."""
  g = genotypes.validate(genotype)
  return genotypes.Genotype(_cell_edges(g.normal), tuple(g.normal_concat),
                            _cell_edges(g.reduce), tuple(g.reduce_concat))


def from_config(model_config, genotype, num_classes: int, impl: str | None = None
                ) -> EvalNetwork:
  """The evaluation network of ``config.model`` (see base_config.train_config)."""
  m = model_config
  return EvalNetwork(freeze(genotype), num_classes, C=m.C, layers=m.layers,
                     auxiliary=m.auxiliary, stem=m.stem, stem_multiplier=m.stem_multiplier,
                     impl=impl or m.depthwise_impl)


def auxiliary_input_size(image_shape, stem: str) -> int:
  """Side of the maps the auxiliary head reads: after the stem (stride 1, or 8 for the
  ImageNet stem) and the two reduction cells (ceil halving)."""
  h = image_shape[0]
  for _ in range(5 if stem == 'imagenet' else 2):
    h = -(-h // 2)
  return h


class EvalSpace:
  """Training a genotype from scratch (``jaxnas.train``): the adapter
  ``jaxnas.spaces.EVAL_SPACES['darts']``. Model fields: ``C``, ``layers``, ``stem``,
  ``stem_multiplier``, ``auxiliary``, ``auxiliary_weight``, ``drop_path``,
  ``depthwise_impl``."""
  name = 'darts'
  drop_path = True  # the network takes a (traced) drop_rate
  sources = (f'a published genotype ({", ".join(genotypes.PUBLISHED)}), a genotype.json '
             'file or a search workdir')

  def validate(self, m, image_shape, fail):
    if m.C % 2:
      fail('model.C', f'= {m.C} must be even (FactorizedReduce halves it).')
    if m.layers < 3:
      fail('model.layers', f'= {m.layers} must be at least 3 (two reduction cells + one).')
    if m.stem not in ('cifar', 'imagenet'):
      fail('model.stem', f"is {m.stem!r}; choose 'cifar' or 'imagenet'.")
    if not 0 <= m.drop_path < 1:
      fail('model.drop_path', f'must be in [0, 1), got {m.drop_path}.')
    if m.auxiliary_weight < 0:
      fail('model.auxiliary_weight', f'must be >= 0, got {m.auxiliary_weight}.')
    if m.auxiliary:
      size = auxiliary_input_size(image_shape, m.stem)
      if size < 5:
        fail('model.auxiliary', f'needs maps of at least 5x5 after cell {2 * m.layers // 3}, '
             f'but these images give {size}x{size}; use larger images or set it to False.')

  def load(self, spec, m):
    del m
    return genotypes.load(spec)

  def from_json(self, d, source, m):
    del m
    return genotypes.from_json(d, source=source)

  def build(self, m, genotype, num_classes, impl=None):
    return from_config(m, genotype, num_classes, impl)

  def to_json(self, genotype):
    return genotypes.to_json(genotype)

  def format(self, m, genotype):
    del m
    return genotypes.format_genotype(genotype)

  def count_params(self, params):
    return {'params': count_params(params),
            'params_with_auxiliary': count_params(params, exclude=None)}


EVAL_SPACE = EvalSpace()
